// CPU twin of attend against a brute-force double-precision loop.
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "mixkv/attend.hpp"
#include "mixkv/half.hpp"

using mixkv::DType;
using mixkv::Tensor;

using mixkv_test::view;

int main() {
  std::mt19937 rng(99);
  std::normal_distribution<float> nd;
  for (int trial = 0; trial < 60; ++trial) {
    const bool half = trial % 2 == 1;
    const DType dt = half ? DType::bf16 : DType::f32;
    const int B = 1 + rng() % 3, Hkv = 1 + rng() % 3, G = 1 + rng() % 5, T = 1 + rng() % 3, D = 1 + rng() % 40;
    const int Hq = Hkv * G, S = B * Hkv;
    std::vector<int32_t> off(S), len(S);
    int slots = 0, maxlen = 0;
    for (int s = 0; s < S; ++s) {
      len[s] = (rng() % 5 == 0) ? 0 : static_cast<int>(1 + rng() % (trial % 7 == 0 ? 3000 : 40));
      off[s] = slots;
      slots += len[s] + static_cast<int>(rng() % 3);
      maxlen = std::max(maxlen, len[s]);
    }
    // element storage as float for f32, as uint16 bf16 bits otherwise; `val` keeps the exact values
    std::vector<float> kval(slots * D), vval(slots * D), qval(B * Hq * T * D);
    mixkv_test::fill(kval, nd, rng);
    mixkv_test::fill(vval, nd, rng);
    mixkv_test::fill(qval, nd, rng);
    std::vector<float> kf = kval, vf = vval, qf = qval, of(qval.size(), NAN);
    std::vector<uint16_t> kh(kval.size()), vh(vval.size()), qhv(qval.size()), oh(qval.size(), 0x7fc0);
    if (half) {
      mixkv_test::round_to_bf16(kval, kh);
      mixkv_test::round_to_bf16(vval, vh);
      mixkv_test::round_to_bf16(qval, qhv);
    }
    const float scale = trial % 3 == 0 ? 0.25f : 0.0f;
    Tensor q = half ? view(qhv, dt, {B, Hq, T, D}) : view(qf, dt, {B, Hq, T, D});
    Tensor kb = half ? view(kh, dt, {slots, D}) : view(kf, dt, {slots, D});
    Tensor vb = half ? view(vh, dt, {slots, D}) : view(vf, dt, {slots, D});
    Tensor out = half ? view(oh, dt, {B, Hq, T, D}) : view(of, dt, {B, Hq, T, D});
    mixkv::attend(q, kb, vb, view(off, DType::i32, {S}), view(len, DType::i32, {S}), maxlen, scale, out, Tensor{}, 0);
    const double sc = scale == 0.0f ? 1.0 / std::sqrt(static_cast<double>(D)) : scale;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hq; ++h)
        for (int t = 0; t < T; ++t) {
          const int s = b * Hkv + h / G;
          const int vis = std::min(std::max(len[s] - T + t + 1, 0), len[s]);
          std::vector<double> logit(vis);
          double mx = -INFINITY;
          for (int j = 0; j < vis; ++j) {
            double dot = 0;
            for (int d = 0; d < D; ++d)
              dot += static_cast<double>(qval[((b * Hq + h) * T + t) * D + d]) * kval[(off[s] + j) * D + d];
            logit[j] = dot * sc;
            mx = std::max(mx, logit[j]);
          }
          double sum = 0;
          for (int j = 0; j < vis; ++j) sum += std::exp(logit[j] - mx);
          for (int d = 0; d < D; ++d) {
            double acc = 0;
            for (int j = 0; j < vis; ++j) acc += std::exp(logit[j] - mx) / sum * vval[(off[s] + j) * D + d];
            const size_t i = ((b * Hq + h) * T + t) * D + d;
            const double got = half ? mixkv::bf16_to_float(oh[i]) : of[i];
            const double tol = half ? 1e-2 * std::max(1.0, std::fabs(acc)) : 2e-5;
            CHECK(std::isfinite(got));
            CHECK(std::fabs(got - acc) <= tol);
            if (vis == 0) CHECK(got == 0.0);
          }
        }
  }
  // bad input: Hq not a multiple of Hkv
  {
    std::vector<float> q(3 * 4), kb(8), o(3 * 4);
    std::vector<int32_t> off(2, 0), len(2, 1);
    CHECK(mixkv_test::throws_invalid([&] {
      mixkv::attend(view(q, DType::f32, {1, 3, 1, 4}), view(kb, DType::f32, {2, 4}), view(kb, DType::f32, {2, 4}),
                    view(off, DType::i32, {2}), view(len, DType::i32, {2}), 1, 0.0f, view(o, DType::f32, {1, 3, 1, 4}),
                    Tensor{}, 0);
    }));
  }
  return mixkv_test::finish("test_attend");
}
