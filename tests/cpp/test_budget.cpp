// CPU twin of the budget policies against direct loops over the SPEC formulas.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "mixkv/budget.hpp"

namespace {

using mixkv_test::view;

int64_t clampi(int64_t v, int64_t hi) { return std::max<int64_t>(0, std::min(v, hi)); }

// Expected capacity of head h of a sequence with prefix Pb. `A` holds that sequence's [H, P] rows.
std::vector<int64_t> expected(const mixkv::BudgetOptions& o, const std::vector<float>& A, int64_t H, int64_t P,
                              int64_t Pb, const std::vector<float>& head_scores) {
  const int64_t base = std::max<int64_t>(o.budget - o.window, 0);
  std::vector<int64_t> c(static_cast<std::size_t>(H), base);
  if (o.policy == mixkv::Policy::pyramidkv) {
    int64_t mn = static_cast<int64_t>(std::floor(base / o.pyramid_beta)), mx = 2 * base - mn;
    if (mx >= Pb) mx = Pb, mn = 2 * base - mx;
    const int64_t step = o.num_layers > 1 ? (mx - mn) / (o.num_layers - 1) : 0;  // mx >= mn here
    for (auto& v : c) v = mx - o.layer_idx * step;
  } else if (o.policy == mixkv::Policy::sparsemm) {
    const int64_t mn = static_cast<int64_t>(std::floor(base * o.sparsemm_ratio));
    const double pool = static_cast<double>((base - mn) * o.num_layers * H);
    for (int64_t h = 0; h < H; ++h) c[h] = static_cast<int64_t>(std::nearbyint(head_scores[h] * pool + mn));
  } else if (o.policy == mixkv::Policy::adakv && o.layer_idx >= o.ada_skip && Pb > base) {
    // scaled[h][r]: head h's r-th largest valid score times f_h; the winners are ranked by
    // counting, for every element, how many beat it (higher, or equal at a lower flat index).
    std::vector<std::vector<double>> scaled(static_cast<std::size_t>(H));
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> v(A.begin() + h * P + (P - Pb), A.begin() + (h + 1) * P);
      std::sort(v.rbegin(), v.rend());
      double top = 0, all = 0;
      for (int64_t r = 0; r < Pb; ++r) all += v[r], top += r < base ? v[r] : 0.0;
      const double f = o.ada_normalize && all != 0.0 ? top / all : 1.0;
      for (auto& x : v) x *= f;
      scaled[h] = v;
    }
    for (int64_t h = 0; h < H; ++h) {
      int64_t won = 0;
      for (int64_t r = 0; r < Pb; ++r) {
        int64_t beaten_by = 0;
        for (int64_t g = 0; g < H; ++g)
          for (int64_t q = 0; q < Pb; ++q)
            if (scaled[g][q] > scaled[h][r] || (scaled[g][q] == scaled[h][r] && g * Pb + q < h * Pb + r)) ++beaten_by;
        if (beaten_by < H * base) ++won;
      }
      c[h] = static_cast<int64_t>(std::nearbyint(won * (1.0 - o.ada_floor) + std::floor(o.ada_floor * base)));
    }
  }
  for (auto& v : c) v = clampi(v, Pb);
  return c;
}

void random_case(std::mt19937& rng) {
  std::uniform_int_distribution<int> pick(0, 3), small(0, 4);
  std::uniform_int_distribution<int64_t> bdist(1, 3), hdist(1, 5), pdist(1, 40), wdist(1, 12), ldist(1, 6);
  mixkv::BudgetOptions o;
  o.policy = static_cast<mixkv::Policy>(pick(rng));
  const int64_t B = bdist(rng), H = hdist(rng), P = pdist(rng);
  o.window = wdist(rng);
  o.budget = std::uniform_int_distribution<int64_t>(1, P + o.window + 5)(rng);
  o.num_layers = ldist(rng);
  o.layer_idx = std::uniform_int_distribution<int64_t>(0, o.num_layers - 1)(rng);
  o.pyramid_beta = std::array<double, 3>{20.0, 3.0, 1.5}[pick(rng) % 3];
  o.ada_floor = std::array<double, 4>{0.0, 0.2, 0.5, 1.0}[pick(rng)];
  o.ada_normalize = pick(rng) < 2;
  o.ada_skip = pick(rng) == 0 ? 2 : 0;
  o.sparsemm_ratio = std::array<double, 4>{0.0, 0.1, 0.5, 0.75}[pick(rng)];
  std::vector<int32_t> lengths(static_cast<std::size_t>(B));
  const bool padded = pick(rng) < 2;
  for (auto& n : lengths) n = static_cast<int32_t>(std::uniform_int_distribution<int64_t>(1, P + o.window)(rng));
  std::vector<float> A(static_cast<std::size_t>(B * H * P));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Pb = padded ? std::max<int64_t>(lengths[b] - o.window, 0) : P;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < P; ++j)
        A[(b * H + h) * P + j] = j < P - Pb ? -std::numeric_limits<float>::infinity() : static_cast<float>(small(rng));
  }
  std::vector<float> hs(static_cast<std::size_t>(H));
  for (auto& x : hs) x = static_cast<float>(small(rng)) / 8.0f / static_cast<float>(o.num_layers * H);
  std::vector<int32_t> out(static_cast<std::size_t>(B * H), -7777);
  mixkv::Tensor vl = padded ? view(lengths.data(), mixkv::DType::i32, {B}) : mixkv::Tensor{};
  mixkv::cpu::capacities(o, view(A.data(), mixkv::DType::f32, {B, H, P}), vl,
                         view(hs.data(), mixkv::DType::f32, {H}), view(out.data(), mixkv::DType::i32, {B, H}));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Pb = padded ? std::max<int64_t>(lengths[b] - o.window, 0) : P;
    std::vector<float> rows(A.begin() + b * H * P, A.begin() + (b + 1) * H * P);
    const auto want = expected(o, rows, H, P, Pb, hs);
    for (int64_t h = 0; h < H; ++h) CHECK(out[b * H + h] == want[h]);
  }
  // no capacity exceeds the layer's bound (sparsemm's only when the head scores stay within [0, 1])
  const int64_t bound = mixkv::capacity_bound(o, H, P);
  CHECK(bound >= 0 && bound <= P);
  for (int64_t i = 0; i < B * H; ++i) CHECK(out[i] <= bound);
}

}  // namespace

int main() {
  std::mt19937 rng(99);
  for (int it = 0; it < 2000; ++it) random_case(rng);

  std::vector<float> A(2 * 8, 1.0f), hs(2, 0.5f);
  std::vector<int32_t> out(2), lengths{40};
  auto call = [&](mixkv::BudgetOptions o, bool with_lengths) {
    mixkv::cpu::capacities(o, view(A.data(), mixkv::DType::f32, {1, 2, 8}),
                           with_lengths ? view(lengths.data(), mixkv::DType::i32, {1}) : mixkv::Tensor{},
                           view(hs.data(), mixkv::DType::f32, {2}), view(out.data(), mixkv::DType::i32, {1, 2}));
  };
  mixkv::BudgetOptions o;
  o.window = 4;
  o.budget = 8;
  call(o, false);
  CHECK(out[0] == 4 && out[1] == 4);
  CHECK(mixkv_test::throws_invalid([&] { call(o, true); }));  // n_b above P + W
  auto bad = o;
  bad.budget = 0;
  CHECK(mixkv_test::throws_invalid([&] { call(bad, false); }));
  bad = o;
  bad.layer_idx = 1;
  CHECK(mixkv_test::throws_invalid([&] { call(bad, false); }));
  bad = o;
  bad.ada_floor = 1.5;
  CHECK(mixkv_test::throws_invalid([&] { call(bad, false); }));
  bad = o;
  bad.sparsemm_ratio = 1.0;
  CHECK(mixkv_test::throws_invalid([&] { call(bad, false); }));
  bad = o;
  bad.pyramid_beta = 0.0;
  CHECK(mixkv_test::throws_invalid([&] { call(bad, false); }));
  CHECK(mixkv_test::throws_invalid([&] { mixkv::capacity_bound(bad, 2, 8); }));
  CHECK(mixkv_test::throws_invalid([&] { mixkv::capacity_bound(o, 0, 8); }));
  CHECK(mixkv_test::throws_invalid([&] { mixkv::capacity_bound(o, 2, -1); }));
  CHECK(mixkv::capacity_bound(o, 2, 8) == 4 && mixkv::capacity_bound(o, 2, 3) == 3);
  bad = o;
  bad.policy = mixkv::Policy::adakv;
  A[5] = std::nanf("");
  CHECK(mixkv_test::throws_invalid([&] { call(bad, false); }));

  return mixkv_test::finish("test_budget");
}
