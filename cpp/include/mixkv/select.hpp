// Per-(sequence, head) top-c selection (SPEC §6).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

// scores float32 [B, H, P] contiguous (no NaN); -inf entries are never selected.
// capacities int32 [B, H], each in [0, P].
// positions int32 [B, H, C] with C >= max capacity: the top-c positions by score, ties to the
//   lower position, written in ascending order, the rest of the row filled with -1.
// counts int32 [B, H]: min(c, number of entries above -inf).
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
