// The flattened varlen KV store (SPEC §8): kernels over caller-owned buffers.
// A layer's store is K and V buffers [slots, D]; segment s = b * Hkv + h starts at offsets[s],
// holds lengths[s] tokens and may grow to its reservation (tracked by the caller).
#pragma once

#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

// Prefill gather. keys/values [B, Hkv, N, D] (strided, last dim contiguous); positions int32
// [B, Hkv, C] ascending, -1 padded; counts int32 [B, Hkv]; valid_lengths int32 [B] (optional).
// Segment s receives its counts[s] selected positions, then the window tokens
// max(N - window, N - n_b) .. N - 1, in that (ascending) order, at offsets[s].
// offsets int32 [B*Hkv]; k_buf/v_buf [slots, D] same dtype as keys (contiguous); lengths int32
// [B*Hkv] is set to counts[s] + min(window, n_b). Index tensors are contiguous.
// Value checks (counts in [0, C], positions strictly ascending prefix positions in
// [N - n_b, max(N - window, N - n_b)), room in the buffers) run on the CPU path; on CUDA the caller
// (the Python layer) validates them, and the kernel writes zeros for an out-of-range position and
// never writes outside the buffers.
void store_build(const Tensor& keys, const Tensor& values, const Tensor& positions, const Tensor& counts,
                 const Tensor& valid_lengths, int64_t window, const Tensor& offsets, const Tensor& k_buf,
                 const Tensor& v_buf, const Tensor& lengths, std::uintptr_t stream);

// Append T tokens to every segment: k_new/v_new [B, Hkv, T, D]. Token t of segment s goes to slot
// offsets[s] + lengths[s] + t; then lengths[s] += T. The caller guarantees the reservation
// (checked on the CPU path; on CUDA rows past the buffer end are dropped). One launch for K and V.
void store_append(const Tensor& k_new, const Tensor& v_new, const Tensor& offsets, const Tensor& lengths,
                  const Tensor& k_buf, const Tensor& v_buf, std::uintptr_t stream);

// Segment copy (growth, reorder, batch filtering): destination segment i receives the
// src_lengths[src_index[i]] tokens of source segment src_index[i], at dst_offsets[i];
// dst_lengths[i] is set. All index arrays int32, contiguous; dst buffers must not alias the source
// (src_index may repeat entries, e.g. for beam search).
void store_copy_segments(const Tensor& src_k, const Tensor& src_v, const Tensor& src_offsets,
                         const Tensor& src_lengths, const Tensor& src_index, const Tensor& dst_offsets,
                         const Tensor& dst_k, const Tensor& dst_v, const Tensor& dst_lengths,
                         std::uintptr_t stream);

namespace cpu {
void store_build(const Tensor& keys, const Tensor& values, const Tensor& positions, const Tensor& counts,
                 const Tensor& valid_lengths, int64_t window, const Tensor& offsets, const Tensor& k_buf,
                 const Tensor& v_buf, const Tensor& lengths);
void store_append(const Tensor& k_new, const Tensor& v_new, const Tensor& offsets, const Tensor& lengths,
                  const Tensor& k_buf, const Tensor& v_buf);
void store_copy_segments(const Tensor& src_k, const Tensor& src_v, const Tensor& src_offsets,
                         const Tensor& src_lengths, const Tensor& src_index, const Tensor& dst_offsets,
                         const Tensor& dst_k, const Tensor& dst_v, const Tensor& dst_lengths);
}  // namespace cpu

#ifdef MIXKV_WITH_CUDA
namespace cuda {
void store_build(const Tensor& keys, const Tensor& values, const Tensor& positions, const Tensor& counts,
                 const Tensor& valid_lengths, int64_t window, const Tensor& offsets, const Tensor& k_buf,
                 const Tensor& v_buf, const Tensor& lengths, std::uintptr_t stream);
void store_append(const Tensor& k_new, const Tensor& v_new, const Tensor& offsets, const Tensor& lengths,
                  const Tensor& k_buf, const Tensor& v_buf, std::uintptr_t stream);
void store_copy_segments(const Tensor& src_k, const Tensor& src_v, const Tensor& src_offsets,
                         const Tensor& src_lengths, const Tensor& src_index, const Tensor& dst_offsets,
                         const Tensor& dst_k, const Tensor& dst_v, const Tensor& dst_lengths,
                         std::uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace mixkv
