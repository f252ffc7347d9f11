// CPU twin of the scoring operation against brute-force double-precision loops (SPEC §1–5).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "mixkv/half.hpp"
#include "mixkv/score.hpp"

namespace {

using mixkv_test::view;

struct Case {
  int64_t B, Hq, Hkv, N, W, D;
  std::vector<int32_t> valid;
  mixkv::Method method;
  mixkv::Pooling pooling;
  int kernel;
  mixkv::GqaReduce gqa;
  bool bf16;
};

// Brute force in double: returns scores and importance [B, Hkv, P] and r [B, Hkv].
void brute(const Case& c, const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
           std::vector<double>& S, std::vector<double>& A, std::vector<double>& R) {
  const int64_t P = c.N - c.W, G = c.Hq / c.Hkv;
  const double inf = std::numeric_limits<double>::infinity();
  S.assign(c.B * c.Hkv * P, -inf);
  A.assign(c.B * c.Hkv * P, -inf);
  R.assign(c.B * c.Hkv, 0.0);
  auto K = [&](int64_t b, int64_t h, int64_t j, int64_t d) { return k[((b * c.Hkv + h) * c.N + j) * c.D + d]; };
  auto V = [&](int64_t b, int64_t h, int64_t j, int64_t d) { return v[((b * c.Hkv + h) * c.N + j) * c.D + d]; };
  auto Q = [&](int64_t b, int64_t hq, int64_t i, int64_t d) { return q[((b * c.Hq + hq) * c.W + i) * c.D + d]; };
  auto norm_k = [&](int64_t b, int64_t h, int64_t j) {
    double s = 0;
    for (int64_t d = 0; d < c.D; ++d) s += K(b, h, j, d) * K(b, h, j, d);
    return std::sqrt(s);
  };
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t n = c.valid.empty() ? c.N : c.valid[b], s0 = c.N - n;
    for (int64_t h = 0; h < c.Hkv; ++h) {
      std::vector<double> m(c.D, 0.0);
      for (int64_t j = s0; j < c.N; ++j) {
        const double nk = std::max(norm_k(b, h, j), 1e-12);
        for (int64_t d = 0; d < c.D; ++d) m[d] += K(b, h, j, d) / nk / n;
      }
      double m2 = 0;
      for (double x : m) m2 += x * x;
      const double r = n < 2 ? 0.0 : std::min(1.0, std::max(0.0, (n * m2 - 1) / (n - 1)));
      R[b * c.Hkv + h] = r;
      if (s0 >= P) continue;
      std::vector<double> raw(c.N, 0.0);  // by absolute position
      for (int64_t j = s0; j < P; ++j) raw[j] = c.gqa == mixkv::GqaReduce::max ? -inf : 0.0;
      for (int64_t g = 0; g < G; ++g) {
        std::vector<double> col(c.N, 0.0);
        for (int64_t i = 0; i < c.W; ++i) {
          std::vector<double> l(c.N, -inf);
          double mx = -inf;
          for (int64_t j = s0; j <= P + i; ++j) {
            double dot = 0;
            for (int64_t d = 0; d < c.D; ++d) dot += Q(b, h * G + g, i, d) * K(b, h, j, d);
            l[j] = dot / std::sqrt(double(c.D));
            mx = std::max(mx, l[j]);
          }
          double sum = 0;
          for (int64_t j = s0; j <= P + i; ++j) sum += std::exp(l[j] - mx);
          for (int64_t j = s0; j < P; ++j) col[j] += std::exp(l[j] - mx) / sum / c.W;
        }
        for (int64_t j = s0; j < P; ++j)
          raw[j] = c.gqa == mixkv::GqaReduce::max ? std::max(raw[j], col[j]) : raw[j] + col[j] / G;
      }
      std::vector<double> pooled(c.N, 0.0);
      double mean_a = 0;
      for (int64_t j = s0; j < P; ++j) {
        double acc = c.pooling == mixkv::Pooling::avg ? 0.0 : -inf;
        for (int64_t u = j - c.kernel / 2; u <= j + c.kernel / 2; ++u) {
          if (u < s0 || u >= P) continue;
          acc = c.pooling == mixkv::Pooling::avg ? acc + raw[u] : std::max(acc, raw[u]);
        }
        pooled[j] = c.pooling == mixkv::Pooling::avg ? acc / c.kernel : acc;
        mean_a += pooled[j] / double(P - s0);
      }
      auto align = [&](std::vector<double> x) {  // x by absolute position, valid on [s0, P)
        double lo = inf, hi = -inf, mean = 0;
        for (int64_t j = s0; j < P; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
        for (int64_t j = s0; j < P; ++j) x[j] = (x[j] - lo) / (hi - lo + 1e-8), mean += x[j] / double(P - s0);
        for (int64_t j = s0; j < P; ++j) x[j] *= mean_a / (mean + 1e-8);
        return x;
      };
      std::vector<double> vn(c.N), kn(c.N), dv(c.N);
      for (int64_t j = s0; j < P; ++j) {
        double s = 0, dot = 0;
        for (int64_t d = 0; d < c.D; ++d) s += V(b, h, j, d) * V(b, h, j, d), dot += K(b, h, j, d) * m[d];
        vn[j] = std::sqrt(s);
        kn[j] = -norm_k(b, h, j);
        dv[j] = -dot / std::max(norm_k(b, h, j), 1e-12);
      }
      vn = align(vn);
      kn = align(kn);
      dv = align(dv);
      for (int64_t j = s0; j < P; ++j) {
        const double a = pooled[j];
        double s = 0;
        switch (c.method) {
          case mixkv::Method::attn: s = a; break;
          case mixkv::Method::keydiff: s = dv[j]; break;
          case mixkv::Method::vnorm: s = a + vn[j]; break;
          case mixkv::Method::knorm: s = a + kn[j]; break;
          case mixkv::Method::uniform_mix: s = (a + dv[j] + vn[j]) / 3; break;
          case mixkv::Method::mixkv: s = r * dv[j] + (1 - r) * (a + vn[j]); break;
        }
        S[(b * c.Hkv + h) * P + j] = s;
        A[(b * c.Hkv + h) * P + j] = a;
      }
    }
  }
}

bool close(double got, double want, double scale) {
  if (std::isinf(want)) return std::isinf(got) && got < 0;
  return std::fabs(got - want) <= 1e-4 * std::fabs(want) + 1e-5 * scale;
}

void run(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t P = c.N - c.W;
  const auto dt = c.bf16 ? mixkv::DType::bf16 : mixkv::DType::f32;
  auto fill = [&](int64_t count, float gain, std::vector<double>& exact, std::vector<float>& f32,
                  std::vector<uint16_t>& h16) {
    f32.resize(count);
    for (auto& x : f32) x = gain * nd(rng);
    h16.resize(count);
    if (c.bf16) mixkv_test::round_to_bf16(f32, h16);
    exact.assign(f32.begin(), f32.end());
  };
  std::vector<double> qe, ke, ve;
  std::vector<float> qf, kf, vf;
  std::vector<uint16_t> qh, kh, vh;
  fill(c.B * c.Hq * c.W * c.D, 2.0f, qe, qf, qh);
  fill(c.B * c.Hkv * c.N * c.D, 1.0f, ke, kf, kh);
  fill(c.B * c.Hkv * c.N * c.D, 1.0f, ve, vf, vh);
  void* qp = c.bf16 ? static_cast<void*>(qh.data()) : qf.data();
  void* kp = c.bf16 ? static_cast<void*>(kh.data()) : kf.data();
  void* vp = c.bf16 ? static_cast<void*>(vh.data()) : vf.data();

  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> S(c.B * c.Hkv * P, nan), A(c.B * c.Hkv * P, nan), R(c.B * c.Hkv, nan);
  std::vector<int32_t> valid = c.valid;
  mixkv::ScoreOptions o;
  o.method = c.method;
  o.pooling = c.pooling;
  o.kernel_size = c.kernel;
  o.gqa = c.gqa;
  mixkv::Tensor none;
  mixkv::score(view(qp, dt, {c.B, c.Hq, c.W, c.D}), view(kp, dt, {c.B, c.Hkv, c.N, c.D}),
               view(vp, dt, {c.B, c.Hkv, c.N, c.D}),
               valid.empty() ? none : view(valid.data(), mixkv::DType::i32, {c.B}), none, o,
               view(S.data(), mixkv::DType::f32, {c.B, c.Hkv, P}), view(A.data(), mixkv::DType::f32, {c.B, c.Hkv, P}),
               view(R.data(), mixkv::DType::f32, {c.B, c.Hkv}), none, 0);

  std::vector<double> Sw, Aw, Rw;
  brute(c, qe, ke, ve, Sw, Aw, Rw);
  for (int64_t row = 0; row < c.B * c.Hkv; ++row) {
    double smax = 0, amax = 0;
    for (int64_t j = 0; j < P; ++j) {
      if (!std::isinf(Sw[row * P + j])) smax = std::max(smax, std::fabs(Sw[row * P + j]));
      if (!std::isinf(Aw[row * P + j])) amax = std::max(amax, std::fabs(Aw[row * P + j]));
    }
    for (int64_t j = 0; j < P; ++j) {
      CHECK(close(S[row * P + j], Sw[row * P + j], smax));
      CHECK(close(A[row * P + j], Aw[row * P + j], amax));
    }
    if (c.method == mixkv::Method::mixkv) {
      CHECK(std::fabs(R[row] - Rw[row]) <= 1e-5);
    } else {
      CHECK(std::isnan(R[row]));  // only mixkv uses an r
    }
  }

  // head_redundancy alone gives the r that mixkv reports.
  std::vector<float> R2(c.B * c.Hkv, nan);
  mixkv::head_redundancy(view(kp, dt, {c.B, c.Hkv, c.N, c.D}),
                         valid.empty() ? none : view(valid.data(), mixkv::DType::i32, {c.B}),
                         view(R2.data(), mixkv::DType::f32, {c.B, c.Hkv}), none, 0);
  for (int64_t i = 0; i < c.B * c.Hkv; ++i) CHECK(std::fabs(R2[i] - Rw[i]) <= 1e-5);
  if (c.method == mixkv::Method::mixkv)
    for (int64_t i = 0; i < c.B * c.Hkv; ++i) CHECK(R2[i] == R[i]);
}

void bad_arguments() {
  std::vector<float> q(1 * 2 * 4 * 8), k(1 * 1 * 10 * 8), v(k.size()), s(6);
  mixkv::Tensor none;
  mixkv::ScoreOptions o;
  o.kernel_size = 4;
  CHECK(mixkv_test::throws_invalid(
      [&] {
        mixkv::score(view(q.data(), mixkv::DType::f32, {1, 2, 4, 8}), view(k.data(), mixkv::DType::f32, {1, 1, 10, 8}),
                     view(v.data(), mixkv::DType::f32, {1, 1, 10, 8}), none, none, o,
                     view(s.data(), mixkv::DType::f32, {1, 1, 6}), none, none, none, 0);
      },
      "kernel_size"));
}

}  // namespace

int main() {
  using M = mixkv::Method;
  using Pl = mixkv::Pooling;
  using Gq = mixkv::GqaReduce;
  const M methods[] = {M::attn, M::keydiff, M::vnorm, M::knorm, M::uniform_mix, M::mixkv};
  unsigned seed = 1;
  for (bool bf16 : {false, true}) {
    for (M m : methods) {
      run({2, 4, 2, 23, 5, 16, {23, 14}, m, Pl::avg, 3, Gq::mean, bf16}, seed++);
      run({3, 3, 1, 17, 4, 8, {17, 9, 3}, m, Pl::max, 5, Gq::max, bf16}, seed++);
      run({1, 2, 2, 12, 11, 8, {}, m, Pl::avg, 1, Gq::mean, bf16}, seed++);
    }
  }
  bad_arguments();
  return mixkv_test::finish("test_score");
}
