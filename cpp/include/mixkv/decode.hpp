// One decode step of a layer over the varlen store: append the step's keys and values, then attend
// the step's queries, in a single entry (one call per layer and step instead of two).
#pragma once

#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

// store_append(k_new, v_new, offsets, lengths, k_buf, v_buf) followed by
// attend(q, k_buf, v_buf, offsets, lengths, max_length, scale, out^T, workspace, total_length) on the
// same stream, with the contracts of those two ops (store.hpp, attend.hpp), except:
// - q [B, Hq, T, D] holds the queries of the T tokens appended by this call: its B and T must be
//   those of k_new (Hq a multiple of k_new's Hkv, same dtype and device);
// - out is [B, T, Hq, D] (strided, last dim contiguous): the layout attention modules return, so
//   that no transpose copy follows; out[b, t, h, :] is attend's out[b, h, t, :];
// - max_length and total_length bound and sum the segment lengths AFTER the append.
// Every argument is checked before anything is written (shapes, dtypes, devices, the workspace size
// for max_length), so a refused call leaves the store unchanged. The CPU path also checks the
// reservation and, after the append, that every length is at most max_length.
void store_append_attend(const Tensor& k_new, const Tensor& v_new, const Tensor& q, const Tensor& offsets,
                         const Tensor& lengths, const Tensor& k_buf, const Tensor& v_buf, int64_t max_length,
                         float scale, const Tensor& out, const Tensor& workspace, std::uintptr_t stream,
                         int64_t total_length = -1);

}  // namespace mixkv
