// CPU twins of the store kernels against brute-force loops.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "mixkv/store.hpp"

using mixkv::DType;
using mixkv::Tensor;

using mixkv_test::view;

int main() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd;
  for (int trial = 0; trial < 50; ++trial) {
    const int B = 1 + rng() % 3, H = 1 + rng() % 3, N = 1 + rng() % 30, D = 1 + rng() % 20, W = rng() % 8;
    std::vector<float> keys(B * H * N * D), values(B * H * N * D);
    mixkv_test::fill(keys, nd, rng);
    mixkv_test::fill(values, nd, rng);
    std::vector<int32_t> valid(B);
    for (auto& n : valid) n = 1 + rng() % N;
    // brute force: choose each prefix position with probability 1/2
    std::vector<std::vector<int>> sel(B * H);
    int C = 1;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        const int lo = N - valid[b], hi = std::max(N - W, N - valid[b]);
        for (int p = lo; p < hi; ++p)
          if (rng() % 2) sel[b * H + h].push_back(p);
        C = std::max<int>(C, static_cast<int>(sel[b * H + h].size()));
      }
    std::vector<int32_t> positions(B * H * C, -1), counts(B * H), offsets(B * H), lengths(B * H, -7777);
    std::vector<std::vector<int>> expect(B * H);
    int slots = 0;
    for (int s = 0; s < B * H; ++s) {
      const int b = s / H;
      for (size_t i = 0; i < sel[s].size(); ++i) positions[s * C + i] = sel[s][i];
      counts[s] = static_cast<int32_t>(sel[s].size());
      expect[s] = sel[s];
      for (int p = std::max(N - W, N - valid[b]); p < N; ++p) expect[s].push_back(p);
      offsets[s] = slots;
      slots += static_cast<int>(expect[s].size()) + 5;  // 5 rows of headroom each
    }
    const int T = 1 + rng() % 3;
    slots += 1;
    std::vector<float> kbuf(slots * D, NAN), vbuf(slots * D, NAN);
    mixkv::store_build(view(keys, DType::f32, {B, H, N, D}), view(values, DType::f32, {B, H, N, D}),
                       view(positions, DType::i32, {B, H, C}), view(counts, DType::i32, {B, H}),
                       view(valid, DType::i32, {B}), W, view(offsets, DType::i32, {B * H}),
                       view(kbuf, DType::f32, {slots, D}), view(vbuf, DType::f32, {slots, D}),
                       view(lengths, DType::i32, {B * H}), 0);
    std::vector<float> kn(B * H * T * D), vn(B * H * T * D);
    mixkv_test::fill(kn, nd, rng);
    mixkv_test::fill(vn, nd, rng);
    mixkv::store_append(view(kn, DType::f32, {B, H, T, D}), view(vn, DType::f32, {B, H, T, D}),
                        view(offsets, DType::i32, {B * H}), view(lengths, DType::i32, {B * H}),
                        view(kbuf, DType::f32, {slots, D}), view(vbuf, DType::f32, {slots, D}), 0);
    for (int s = 0; s < B * H; ++s) {
      const int b = s / H, h = s % H;
      CHECK(lengths[s] == static_cast<int>(expect[s].size()) + T);
      for (size_t i = 0; i < expect[s].size(); ++i)
        for (int d = 0; d < D; ++d) {
          const int src = ((b * H + h) * N + expect[s][i]) * D + d;
          CHECK(kbuf[(offsets[s] + i) * D + d] == keys[src]);
          CHECK(vbuf[(offsets[s] + i) * D + d] == values[src]);
        }
      for (int t = 0; t < T; ++t)
        for (int d = 0; d < D; ++d) {
          const size_t row = offsets[s] + expect[s].size() + t;
          CHECK(kbuf[row * D + d] == kn[((b * H + h) * T + t) * D + d]);
          CHECK(vbuf[row * D + d] == vn[((b * H + h) * T + t) * D + d]);
        }
    }
    // copy segments in reverse order into a fresh store
    const int S = B * H;
    std::vector<int32_t> index(S), dst_off(S), dst_len(S, -7777);
    int dslots = 0;
    for (int i = 0; i < S; ++i) {
      index[i] = S - 1 - i;
      dst_off[i] = dslots;
      dslots += lengths[index[i]] + 1;
    }
    std::vector<float> dk(dslots * D, NAN), dv(dslots * D, NAN);
    mixkv::store_copy_segments(view(kbuf, DType::f32, {slots, D}), view(vbuf, DType::f32, {slots, D}),
                               view(offsets, DType::i32, {S}), view(lengths, DType::i32, {S}),
                               view(index, DType::i32, {S}), view(dst_off, DType::i32, {S}),
                               view(dk, DType::f32, {dslots, D}), view(dv, DType::f32, {dslots, D}),
                               view(dst_len, DType::i32, {S}), 0);
    for (int i = 0; i < S; ++i) {
      const int j = index[i];
      CHECK(dst_len[i] == lengths[j]);
      for (int r = 0; r < lengths[j]; ++r)
        for (int d = 0; d < D; ++d) {
          CHECK(dk[(dst_off[i] + r) * D + d] == kbuf[(offsets[j] + r) * D + d]);
          CHECK(dv[(dst_off[i] + r) * D + d] == vbuf[(offsets[j] + r) * D + d]);
        }
      CHECK(std::isnan(dk[(dst_off[i] + lengths[j]) * D]));  // the gap row stays untouched
    }
  }
  // invalid input raises std::invalid_argument
  {
    std::vector<float> k(16), kb(8);
    std::vector<int32_t> off(2, 0), len(2, 3);
    CHECK(mixkv_test::throws_invalid([&] {
      mixkv::store_append(view(k, DType::f32, {1, 2, 2, 4}), view(k, DType::f32, {1, 2, 2, 4}),
                          view(off, DType::i32, {2}), view(len, DType::i32, {2}), view(kb, DType::f32, {2, 4}),
                          view(kb, DType::f32, {2, 4}), 0);
    }));
  }
  return mixkv_test::finish("test_store");
}
