// Attention of new queries over the varlen store (SPEC §8), GQA-aware.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

// q [B, Hq, T, D] (strided, last dim contiguous), Hq = G * Hkv; query head qh reads segment
// s = b * Hkv + qh / G. Segment s holds lengths[s] tokens at offsets[s] of k_buf/v_buf [slots, D];
// its last T tokens are the ones appended with these queries, so query t sees the first
// lengths[s] - T + t + 1 tokens (causal over the new tokens; T = 1 is plain decoding).
// out [B, Hq, T, D] same dtype as q (strided, last dim contiguous). fp32 accumulation.
// max_length: an upper bound of lengths (host value) used to size the split grid.
// scale: 0 means 1/sqrt(D).
std::size_t attend_workspace_bytes(int64_t B, int64_t Hq, int64_t T, int64_t D, int64_t max_length);
void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, int64_t max_length, float scale, const Tensor& out,
            const Tensor& workspace, std::uintptr_t stream);

namespace cpu {
void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, float scale, const Tensor& out);
}  // namespace cpu

#ifdef MIXKV_WITH_CUDA
namespace cuda {
void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, int64_t max_length, float scale, const Tensor& out,
            const Tensor& workspace, std::uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace mixkv
