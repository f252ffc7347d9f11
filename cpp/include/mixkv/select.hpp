// Per-(sequence, head) top-c selection (SPEC §6).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

// scores float32 [B, H, P] with a contiguous last dimension (no NaN); -inf entries mark padding
//   and are never selected. +inf ranks above every finite score.
// capacities int32 [B, H], each in [0, P].
// positions int32 [B, H, C] with a contiguous last dimension and C >= every capacity: the top-c
//   positions by score (ties to the lower position), written in ascending order; the rest of the
//   row (columns counts[b, h] .. C - 1) is filled with -1.
// counts int32 [B, H]: min(c, number of entries above -inf) = the valid columns of each row.
// Every tensor may use any strides on its leading dimensions.
// The CPU path rejects capacities outside [0, min(P, C)]. The CUDA path cannot read them without
// a synchronisation: it clamps each capacity to [0, min(P, C)] instead (callers validate).
// workspace: select_workspace_bytes(...) bytes (currently 0: the CUDA kernel needs none).
// stream: a cudaStream_t as an integer (CUDA only). Deterministic on both paths.
std::size_t select_workspace_bytes(int64_t B, int64_t H, int64_t P);
void select(const Tensor& scores, const Tensor& capacities, const Tensor& positions, const Tensor& counts,
            const Tensor& workspace, std::uintptr_t stream);

namespace cpu {
void select(const Tensor& scores, const Tensor& capacities, const Tensor& positions, const Tensor& counts);
}  // namespace cpu

#ifdef MIXKV_WITH_CUDA
namespace cuda {
void select(const Tensor& scores, const Tensor& capacities, const Tensor& positions, const Tensor& counts,
            const Tensor& workspace, std::uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace mixkv
