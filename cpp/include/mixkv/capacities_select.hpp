// Capacities and selection in one call (SPEC §6-7): the budget policy's capacities from the
// importance A, then each (sequence, kv head)'s top-c positions by the selection score S.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "mixkv/budget.hpp"
#include "mixkv/tensor.hpp"

namespace mixkv {

// importance, valid_lengths, head_scores, options: as capacities() (budget.hpp), which writes
//   `capacities` (its `out`).
// scores float32 [B, Hkv, P] (the shape of importance; it may be the same tensor), positions int32
//   [B, Hkv, C], counts int32 [B, Hkv]: as select() (select.hpp) with those capacities.
// Results: exactly those of capacities() followed by select(), on every path. The CPU path and every
//   policy but AdaKV run the two. On CUDA, AdaKV at layers from `skip` on, with
//   m = min(Hkv * base, P) below P and at most kFusedMaxCandidates, keeps each row's top m scores of S
//   as candidates in the same launch that ranks A (no capacity exceeds m), then picks each row's top c
//   among its candidates: the full-row selection no longer waits for the capacities. That launch has
//   twice the rows of the ranking alone, so it is taken only where all of them fit one block per
//   multiprocessor (e.g. B = 1, Hkv = 4 up to 32k tokens); elsewhere the two operations run.
// workspace: capacities_select_workspace_bytes(...) bytes on the device (CUDA only; it covers
//   capacities_workspace_bytes and the fused path wherever fused_candidates allows it). stream: a cudaStream_t as an integer (CUDA only). The CUDA path does
//   not synchronise and clamps capacities to [0, min(P, C)] as select() does; the CPU path rejects a
//   capacity above C.
constexpr int64_t kFusedMaxCandidates = 4096;

// m of the fused CUDA path for these options and sizes, or 0 where it does not apply.
inline int64_t fused_candidates(const BudgetOptions& options, int64_t Hkv, int64_t P) {
  if (options.policy != Policy::adakv || options.layer_idx < options.ada_skip) return 0;
  const int64_t base = std::max<int64_t>(options.budget - options.window, 0);
  const int64_t m = std::min(base * Hkv, P);
  return m >= 1 && m < P && m <= kFusedMaxCandidates ? m : 0;
}

std::size_t capacities_select_workspace_bytes(const BudgetOptions& options, int64_t B, int64_t Hkv, int64_t P);
void capacities_select(const BudgetOptions& options, const Tensor& importance, const Tensor& scores,
                       const Tensor& valid_lengths, const Tensor& head_scores, const Tensor& capacities,
                       const Tensor& positions, const Tensor& counts, const Tensor& workspace,
                       std::uintptr_t stream);

namespace cpu {
void capacities_select(const BudgetOptions& options, const Tensor& importance, const Tensor& scores,
                       const Tensor& valid_lengths, const Tensor& head_scores, const Tensor& capacities,
                       const Tensor& positions, const Tensor& counts);
}  // namespace cpu

#ifdef MIXKV_WITH_CUDA
namespace cuda {
// The caller's workspace holds capacities_workspace_bytes(B, Hkv, P) bytes, then these arrays.
void capacities_select(const BudgetOptions& options, const Tensor& importance, const Tensor& scores,
                       const Tensor& valid_lengths, const Tensor& head_scores, const Tensor& capacities,
                       const Tensor& positions, const Tensor& counts, const Tensor& workspace,
                       std::uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace mixkv
