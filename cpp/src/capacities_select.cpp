// Capacities and selection in one call: argument checks, device dispatch and the CPU twin (the two
// operations one after the other).
#include "mixkv/capacities_select.hpp"

#include <algorithm>

#include "mixkv/dispatch.hpp"
#include "mixkv/error.hpp"
#include "mixkv/select.hpp"
#include "arg_checks.hpp"

namespace mixkv {

namespace {

void check_args(const BudgetOptions& o, const Tensor& importance, const Tensor& scores, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& capacities, const Tensor& positions, const Tensor& counts) {
  detail::check_capacity_args(o, importance, valid_lengths, head_scores, capacities);
  detail::check_select_args(scores, capacities, positions, counts);
  require(scores.shape[2] == importance.shape[2], "scores must have the shape of importance [", importance.shape[0],
          ", ", importance.shape[1], ", ", importance.shape[2], "], got [", scores.shape[0], ", ", scores.shape[1],
          ", ", scores.shape[2], "]");
  check_same_device(importance, "importance", scores, "scores");
}

std::size_t round256(std::size_t x) { return (x + 255) / 256 * 256; }

}  // namespace

std::size_t capacities_select_workspace_bytes(const BudgetOptions& options, int64_t B, int64_t Hkv, int64_t P) {
  // capacities' own workspace, then for the fused AdaKV path the candidate counts [B, Hkv] and each
  // row's m candidate positions and keys (4 bytes each), every part rounded up to 256 bytes
  const std::size_t own = capacities_workspace_bytes(B, Hkv, P);
  const int64_t m = fused_candidates(options, Hkv, P);
  if (m == 0) return own;
  const std::size_t cells = static_cast<std::size_t>(std::max<int64_t>(B * Hkv, 1));
  return own + round256(4 * cells) + 2 * round256(4 * cells * static_cast<std::size_t>(m));
}

void capacities_select(const BudgetOptions& options, const Tensor& importance, const Tensor& scores,
                       const Tensor& valid_lengths, const Tensor& head_scores, const Tensor& capacities,
                       const Tensor& positions, const Tensor& counts, const Tensor& workspace,
                       std::uintptr_t stream) {
  check_args(options, importance, scores, valid_lengths, head_scores, capacities, positions, counts);
  if (importance.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    const int64_t B = importance.shape[0], H = importance.shape[1], P = importance.shape[2];
    const std::size_t need = capacities_select_workspace_bytes(options, B, H, P);
    if (options.policy == Policy::adakv) {
      require(workspace.present, "workspace is required on CUDA (capacities_select_workspace_bytes bytes)");
      check_same_device(importance, "importance", workspace, "workspace");
      require(workspace.numel() * dtype_size(workspace.dtype) >= static_cast<int64_t>(need),
              "workspace must hold at least ", need, " bytes");
    }
    cuda::capacities_select(options, importance, scores, valid_lengths, head_scores, capacities, positions, counts,
                            workspace, stream);
#else
    (void)workspace;
    (void)stream;
    no_cuda("capacities_select");
#endif
    return;
  }
  cpu::capacities_select(options, importance, scores, valid_lengths, head_scores, capacities, positions, counts);
}

namespace cpu {

void capacities_select(const BudgetOptions& options, const Tensor& importance, const Tensor& scores,
                       const Tensor& valid_lengths, const Tensor& head_scores, const Tensor& capacities,
                       const Tensor& positions, const Tensor& counts) {
  check_args(options, importance, scores, valid_lengths, head_scores, capacities, positions, counts);
  cpu::capacities(options, importance, valid_lengths, head_scores, capacities);
  cpu::select(scores, capacities, positions, counts);
}

}  // namespace cpu
}  // namespace mixkv
