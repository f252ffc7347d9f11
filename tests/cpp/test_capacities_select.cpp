// CPU twin of capacities_select: the capacities of every policy, then the top-c positions by a
// second score, against capacities() and a brute-force rank count; argument errors name the argument.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.hpp"
#include "select_reference.hpp"
#include "mixkv/budget.hpp"
#include "mixkv/capacities_select.hpp"

namespace {

using mixkv_test::view;

const float kNegInf = -std::numeric_limits<float>::infinity();

void random_case(std::mt19937& rng, mixkv::Policy policy, int64_t B, int64_t H, int64_t P, int64_t budget) {
  std::uniform_real_distribution<float> real(0.f, 1.f);
  std::uniform_int_distribution<int> small(0, 3);
  const int64_t W = 4;
  std::vector<float> imp(static_cast<std::size_t>(B * H * P)), scores(imp.size());
  for (auto& v : imp) v = real(rng);
  const bool ties = small(rng) < 2;
  for (auto& v : scores) v = ties ? static_cast<float>(small(rng)) : real(rng);
  std::vector<int32_t> valid(static_cast<std::size_t>(B));
  std::uniform_int_distribution<int32_t> len(1, static_cast<int32_t>(P + W));
  for (int64_t b = 0; b < B; ++b) {
    valid[static_cast<std::size_t>(b)] = len(rng);
    const int64_t pad = P - std::max<int64_t>(valid[static_cast<std::size_t>(b)] - W, 0);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < pad; ++j) {
        imp[static_cast<std::size_t>((b * H + h) * P + j)] = kNegInf;
        scores[static_cast<std::size_t>((b * H + h) * P + j)] = kNegInf;
      }
  }
  std::vector<float> table(static_cast<std::size_t>(H), 1.0f / static_cast<float>(H));
  mixkv::BudgetOptions o;
  o.policy = policy;
  o.budget = budget;
  o.window = W;
  o.layer_idx = 1;
  o.num_layers = 3;
  const mixkv::Tensor imp_t = view(imp.data(), mixkv::DType::f32, {B, H, P});
  const mixkv::Tensor valid_t = view(valid.data(), mixkv::DType::i32, {B});
  const mixkv::Tensor table_t =
      policy == mixkv::Policy::sparsemm ? view(table.data(), mixkv::DType::f32, {H}) : mixkv::Tensor{};
  std::vector<int32_t> want_caps(static_cast<std::size_t>(B * H), -7777);
  mixkv::cpu::capacities(o, imp_t, valid_t, table_t, view(want_caps.data(), mixkv::DType::i32, {B, H}));
  const int64_t C = P + 2;
  std::vector<int32_t> caps(want_caps.size(), -7777), pos(static_cast<std::size_t>(B * H * C), -7777),
      cnt(want_caps.size(), -7777);
  mixkv::capacities_select(o, imp_t, view(scores.data(), mixkv::DType::f32, {B, H, P}), valid_t, table_t,
                           view(caps.data(), mixkv::DType::i32, {B, H}), view(pos.data(), mixkv::DType::i32, {B, H, C}),
                           view(cnt.data(), mixkv::DType::i32, {B, H}), mixkv::Tensor{}, 0);
  for (int64_t r = 0; r < B * H; ++r) {
    const std::size_t rs = static_cast<std::size_t>(r);
    CHECK(caps[rs] == want_caps[rs]);
    int32_t count = 0;
    const std::vector<int32_t> want = mixkv_test::brute_force_select(scores.data() + r * P, P, want_caps[rs], C, count);
    CHECK(cnt[rs] == count);
    for (int64_t i = 0; i < C; ++i) CHECK(pos[static_cast<std::size_t>(r * C + i)] == want[static_cast<std::size_t>(i)]);
  }
}

void bad_arguments() {
  std::vector<float> imp(2 * 3 * 20, 0.5f), scores(2 * 3 * 19, 0.5f);
  std::vector<int32_t> caps(6), pos(2 * 3 * 20), cnt(6);
  mixkv::BudgetOptions o;
  o.policy = mixkv::Policy::adakv;
  o.budget = 10;
  o.window = 4;
  const auto imp_t = view(imp.data(), mixkv::DType::f32, {2, 3, 20});
  const auto caps_t = view(caps.data(), mixkv::DType::i32, {2, 3});
  const auto pos_t = view(pos.data(), mixkv::DType::i32, {2, 3, 20});
  const auto cnt_t = view(cnt.data(), mixkv::DType::i32, {2, 3});
  CHECK(mixkv_test::throws_invalid(
      [&] {
        mixkv::capacities_select(o, imp_t, view(scores.data(), mixkv::DType::f32, {2, 3, 19}), mixkv::Tensor{},
                                 mixkv::Tensor{}, caps_t, pos_t, cnt_t, mixkv::Tensor{}, 0);
      },
      "scores"));
  CHECK(mixkv_test::throws_invalid(
      [&] {
        mixkv::capacities_select(o, imp_t, imp_t, mixkv::Tensor{}, mixkv::Tensor{}, caps_t,
                                 view(pos.data(), mixkv::DType::i32, {2, 2, 20}), cnt_t, mixkv::Tensor{}, 0);
      },
      "positions"));
  CHECK(mixkv_test::throws_invalid(
      [&] {
        mixkv::capacities_select(o, imp_t, imp_t, mixkv::Tensor{}, mixkv::Tensor{}, caps_t,
                                 view(pos.data(), mixkv::DType::i32, {2, 3, 2}), cnt_t, mixkv::Tensor{}, 0);
      },
      "columns"));
  o.budget = 0;
  CHECK(mixkv_test::throws_invalid(
      [&] {
        mixkv::capacities_select(o, imp_t, imp_t, mixkv::Tensor{}, mixkv::Tensor{}, caps_t, pos_t, cnt_t,
                                 mixkv::Tensor{}, 0);
      },
      "budget"));
}

void fused_workspace_sizes() {
  mixkv::BudgetOptions o;
  o.policy = mixkv::Policy::adakv;
  o.budget = 96;
  o.window = 32;
  // m = 4 * 64 = 256 candidates per row below P = 2000: capacities' bytes + counts + positions + keys
  CHECK(mixkv::fused_candidates(o, 4, 2000) == 256);
  CHECK(mixkv::capacities_select_workspace_bytes(o, 1, 4, 2000) ==
        mixkv::capacities_workspace_bytes(1, 4, 2000) + 256 + 2 * 4096);
  CHECK(mixkv::fused_candidates(o, 4, 256) == 0);  // m = P: nothing to fuse
  CHECK(mixkv::capacities_select_workspace_bytes(o, 1, 4, 256) == mixkv::capacities_workspace_bytes(1, 4, 256));
  o.ada_skip = 2;  // layer 0 below skip: c = base, no ranking
  CHECK(mixkv::fused_candidates(o, 4, 2000) == 0);
  o.ada_skip = 0;
  o.policy = mixkv::Policy::snapkv;
  CHECK(mixkv::fused_candidates(o, 4, 2000) == 0);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const mixkv::Policy policies[] = {mixkv::Policy::snapkv, mixkv::Policy::pyramidkv, mixkv::Policy::adakv,
                                    mixkv::Policy::sparsemm};
  for (int trial = 0; trial < 60; ++trial) {
    std::uniform_int_distribution<int64_t> b(1, 3), h(1, 5), p(1, 90), budget(1, 60);
    random_case(rng, policies[trial % 4], b(rng), h(rng), p(rng), budget(rng));
  }
  bad_arguments();
  fused_workspace_sizes();
  return mixkv_test::finish("test_capacities_select");
}
