// Budget policies (SPEC §7): how many prefix tokens each (sequence, kv head) keeps.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

enum class Policy : int { snapkv = 0, pyramidkv = 1, adakv = 2, sparsemm = 3 };

struct BudgetOptions {
  Policy policy = Policy::snapkv;
  int64_t budget = 64;   // tokens per head including the window
  int64_t window = 32;   // W
  int64_t layer_idx = 0;
  int64_t num_layers = 1;
  double pyramid_beta = 20.0;
  double ada_floor = 0.2;      // alpha
  bool ada_normalize = true;
  int64_t ada_skip = 0;        // layers below this use c = base
  double sparsemm_ratio = 0.1;
};

// importance float32 [B, Hkv, P] with P = N - W: the pooled attention importance (padding -inf);
//   its shape gives P for every policy, its values are read by AdaKV only.
// valid_lengths int32 [B] (optional): tokens of each left-padded sequence (prefix P_b = n_b - W).
// head_scores float32 [Hkv] (SparseMM only): this layer's normalised, group-summed scores.
// out int32 [B, Hkv]: capacities c, always within [0, P_b] (c = P_b keeps the whole prefix).
std::size_t capacities_workspace_bytes(int64_t B, int64_t Hkv, int64_t P);
void capacities(const BudgetOptions& options, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out, const Tensor& workspace,
                std::uintptr_t stream);

namespace cpu {
void capacities(const BudgetOptions& options, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out);
}  // namespace cpu

#ifdef MIXKV_WITH_CUDA
namespace cuda {
void capacities(const BudgetOptions& options, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out, const Tensor& workspace,
                std::uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace mixkv
