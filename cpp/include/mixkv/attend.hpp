// Attention of new queries over the varlen store (SPEC §8), GQA-aware.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

// q [B, Hq, T, D] (strided, last dim contiguous), Hq = G * Hkv where Hkv = offsets.size / B;
// query head qh reads segment s = b * Hkv + qh / G. Segment s holds lengths[s] tokens at offsets[s]
// of k_buf/v_buf [slots, D] (contiguous, dtype of q); offsets/lengths int32 [B * Hkv] (contiguous).
// Its last T tokens are the ones appended with these queries, so query t sees the first
// clamp(lengths[s] - T + t + 1, 0, lengths[s]) tokens (causal over the new tokens; T = 1 is plain
// decoding). A query that sees no token (e.g. an empty segment) gets an output of zeros.
// out [B, Hq, T, D] same dtype as q (strided, last dim contiguous). Scores, softmax and the
// weighted sum accumulate in fp32 or wider (numerically stable: the maximum score is subtracted).
// scale: 0 means 1/sqrt(D).
// max_length: host-side upper bound of every lengths[s]; it sizes the split grid of the CUDA
// kernel (tokens beyond it would not be attended there). The CPU entry point checks the bound.
// total_length: optional host-side sum of lengths[s] over all segments (-1: unknown, taken as
// S * max_length); a hint only, used by the CUDA kernel to size its splits to the total work, so
// that uneven segments still fill the device. Any value gives the same result.
// workspace: uint8 [>= attend_workspace_bytes(...)] on q's device; may be absent when that is 0.
std::size_t attend_workspace_bytes(int64_t B, int64_t Hq, int64_t T, int64_t D, int64_t max_length);
// Checks `workspace` for an attention of q [B, Hq, T, D] over segments of up to max_length tokens:
// present, uint8, contiguous, large enough and on q's device where q is on CUDA and the size is
// not 0 (the CPU twin takes none). Raises naming "workspace".
void check_attend_workspace(const Tensor& workspace, const Tensor& q, int64_t max_length);
// Smallest number of tokens of one segment handled by one block of the CUDA kernel (the split
// size) for `rows` = B * Hq * T query rows: a multiple of 64 such that rows * splits partial results
// fit a bounded workspace (at most 512 splits, and about 16384 partial rows in all). The workspace
// holds rows * ceil(max_length / attend_split_tokens(rows, max_length)) partials of D + 2 floats
// when that split count exceeds 1. The kernel may use larger splits (fewer of them) when the total
// work is small compared with the device.
int64_t attend_split_tokens(int64_t rows, int64_t max_length);
void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, int64_t max_length, float scale, const Tensor& out,
            const Tensor& workspace, std::uintptr_t stream, int64_t total_length = -1);

namespace cpu {
void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, float scale, const Tensor& out);
}  // namespace cpu

#ifdef MIXKV_WITH_CUDA
namespace cuda {
void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, int64_t max_length, float scale, const Tensor& out,
            const Tensor& workspace, std::uintptr_t stream, int64_t total_length);
}  // namespace cuda
#endif

}  // namespace mixkv
