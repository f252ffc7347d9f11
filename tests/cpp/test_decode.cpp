// The decode step entry (CPU) against store_append followed by attend, and its up-front checks.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "mixkv/attend.hpp"
#include "mixkv/decode.hpp"
#include "mixkv/store.hpp"

using mixkv::DType;
using mixkv::Tensor;
using mixkv_test::view;

namespace {

// A store of B * H segments of random lengths with `room` free rows each.
struct Store {
  int B, H, D, slots;
  std::vector<int32_t> offsets, lengths;
  std::vector<float> k, v;
};

Store make_store(std::mt19937& rng, int B, int H, int D, int room) {
  std::normal_distribution<float> nd;
  Store s{B, H, D, 0, {}, {}, {}, {}};
  for (int i = 0; i < B * H; ++i) {
    s.offsets.push_back(s.slots);
    const int len = static_cast<int>(rng() % 7);
    s.lengths.push_back(len);
    s.slots += len + room;
  }
  s.k.resize(static_cast<size_t>(s.slots) * D);
  s.v.resize(s.k.size());
  mixkv_test::fill(s.k, nd, rng);
  mixkv_test::fill(s.v, nd, rng);
  return s;
}

}  // namespace

int main() {
  std::mt19937 rng(77);
  std::normal_distribution<float> nd;
  for (int trial = 0; trial < 40; ++trial) {
    const int B = 1 + rng() % 3, H = 1 + rng() % 3, G = 1 + rng() % 3, D = 1 + rng() % 24, T = 1 + rng() % 3;
    const int Hq = H * G;
    Store fused = make_store(rng, B, H, D, T + static_cast<int>(rng() % 3));
    Store split = fused;
    std::vector<float> kn(B * H * T * D), vn(kn.size()), q(B * Hq * T * D);
    mixkv_test::fill(kn, nd, rng);
    mixkv_test::fill(vn, nd, rng);
    mixkv_test::fill(q, nd, rng);
    int64_t max_len = 0, total = 0;
    for (int32_t len : fused.lengths) {
      max_len = std::max<int64_t>(max_len, len + T);
      total += len + T;
    }
    const float scale = trial % 2 ? 0.0f : 0.37f;
    std::vector<float> out_bthd(B * T * Hq * D, -7777.0f), out_bhtd(B * Hq * T * D, -7777.0f);
    mixkv::store_append_attend(view(kn, DType::f32, {B, H, T, D}), view(vn, DType::f32, {B, H, T, D}),
                               view(q, DType::f32, {B, Hq, T, D}), view(fused.offsets, DType::i32, {B * H}),
                               view(fused.lengths, DType::i32, {B * H}), view(fused.k, DType::f32, {fused.slots, D}),
                               view(fused.v, DType::f32, {fused.slots, D}), max_len, scale,
                               view(out_bthd, DType::f32, {B, T, Hq, D}), Tensor{}, 0, total);
    mixkv::store_append(view(kn, DType::f32, {B, H, T, D}), view(vn, DType::f32, {B, H, T, D}),
                        view(split.offsets, DType::i32, {B * H}), view(split.lengths, DType::i32, {B * H}),
                        view(split.k, DType::f32, {split.slots, D}), view(split.v, DType::f32, {split.slots, D}), 0);
    mixkv::attend(view(q, DType::f32, {B, Hq, T, D}), view(split.k, DType::f32, {split.slots, D}),
                  view(split.v, DType::f32, {split.slots, D}), view(split.offsets, DType::i32, {B * H}),
                  view(split.lengths, DType::i32, {B * H}), max_len, scale, view(out_bhtd, DType::f32, {B, Hq, T, D}),
                  Tensor{}, 0, total);
    CHECK(fused.lengths == split.lengths);
    CHECK(fused.k == split.k);
    CHECK(fused.v == split.v);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hq; ++h)
        for (int t = 0; t < T; ++t)
          for (int d = 0; d < D; ++d) {
            const float a = out_bthd[((b * T + t) * Hq + h) * D + d];
            const float e = out_bhtd[((b * Hq + h) * T + t) * D + d];
            CHECK(a == e);  // same CPU twin on the same data: bit-equal
          }
  }
  // A refused call writes nothing: every check runs before the append.
  {
    const int B = 2, H = 2, D = 8, T = 1;
    Store s = make_store(rng, B, H, D, 2);
    const Store before = s;
    std::vector<float> kn(B * H * T * D, 1.0f), q(B * 2 * H * T * D, 1.0f), out(B * T * 2 * H * D);
    int64_t max_len = 0;
    for (int32_t len : s.lengths) max_len = std::max<int64_t>(max_len, len + T);
    auto call = [&](const Tensor& qv, const Tensor& ov, float scale, int64_t ml) {
      mixkv::store_append_attend(view(kn, DType::f32, {B, H, T, D}), view(kn, DType::f32, {B, H, T, D}), qv,
                                 view(s.offsets, DType::i32, {B * H}), view(s.lengths, DType::i32, {B * H}),
                                 view(s.k, DType::f32, {s.slots, D}), view(s.v, DType::f32, {s.slots, D}), ml, scale,
                                 ov, Tensor{}, 0, -1);
    };
    const Tensor good_q = view(q, DType::f32, {B, 2 * H, T, D});
    const Tensor good_out = view(out, DType::f32, {B, T, 2 * H, D});
    CHECK(mixkv_test::throws_invalid([&] { call(view(q, DType::f32, {B, 2 * H * T * D}), good_out, 0, max_len); }, "q"));
    CHECK(mixkv_test::throws_invalid([&] { call(view(q, DType::f32, {B, 3, T, D}), good_out, 0, max_len); }, "kv heads"));
    CHECK(mixkv_test::throws_invalid([&] { call(view(q, DType::f32, {B, H, 2 * T, D}), good_out, 0, max_len); }, "q must have shape"));
    CHECK(mixkv_test::throws_invalid([&] { call(good_q, view(out, DType::f32, {B, 2 * H, T, D}), 0, max_len); }, "out"));
    CHECK(mixkv_test::throws_invalid([&] { call(good_q, good_out, NAN, max_len); }, "scale"));
    CHECK(mixkv_test::throws_invalid([&] { call(good_q, good_out, 0, -1); }, "max_length"));
    CHECK(s.lengths == before.lengths);
    CHECK(s.k == before.k);
    call(good_q, good_out, 0, max_len);  // the same call with good arguments goes through
    for (int i = 0; i < B * H; ++i) CHECK(s.lengths[i] == before.lengths[i] + T);
  }
  return mixkv_test::finish("test_decode");
}
