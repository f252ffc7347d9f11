// Token scoring (SPEC §1–5): window-attention importance, value/key norms, key diversity,
// head redundancy, and the mixing of every variant, in one operation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

enum class Method : int { attn = 0, keydiff = 1, vnorm = 2, knorm = 3, uniform_mix = 4, mixkv = 5 };
enum class Pooling : int { avg = 0, max = 1 };
enum class GqaReduce : int { mean = 0, max = 1 };

struct ScoreOptions {
  Method method = Method::mixkv;
  Pooling pooling = Pooling::avg;
  int kernel_size = 5;  // odd, >= 1; 1 means no pooling
  GqaReduce gqa = GqaReduce::mean;
  float scale = 0.0f;  // logit scale; 0 means 1/sqrt(D)
};

// Inputs (float32 / float16 / bfloat16, one dtype for all three; any strides with a contiguous
// last dimension):
//   q_window [B, Hq, W, D]   the last W prompt queries (after RoPE)
//   keys     [B, Hkv, N, D]  values [B, Hkv, N, D]; Hq % Hkv == 0, query head q reads kv head q / G
//   valid_lengths int32 [B] (optional): non-padding tokens of each left-padded sequence; the valid
//                 tokens of sequence b are positions N - n_b .. N - 1. Absent: all N valid.
//   redundancy float32 [B or 1, Hkv] (optional): offline r, replacing the online estimate.
// Outputs (float32, contiguous, written in full):
//   scores     [B, Hkv, N - W]  S for the prefix positions; padding positions get -inf.
//   importance [B, Hkv, N - W]  (optional) pooled attention importance A; padding -inf.
//   redundancy_out [B, Hkv]     (optional) the r that was used: method mixkv only (the offline value
//                               when given, else the online estimate); NaN for the methods that use none.
// workspace: uint8 bytes on the same device, 256-byte aligned, at least score_workspace_bytes(...)
// (a function of the shape only; CUDA only, the CPU path ignores it). stream: a cudaStream_t as an
// integer (CUDA only). The CUDA kernels take head dimensions up to 256.
// Definitions: P = N − W; the valid prefix of sequence b is [N − n_b, P) (empty when n_b <= W);
// window row i (position P + i) attends to valid keys j <= P + i; pooling runs over the valid
// prefix only (avg counts the zero padding, max ignores it); the means, minima and maxima of
// SPEC §2–3 are taken over the valid prefix; m averages the unit keys of all n_b valid tokens.
std::size_t score_workspace_bytes(int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t W, int64_t D);
void score(const Tensor& q_window, const Tensor& keys, const Tensor& values, const Tensor& valid_lengths,
           const Tensor& redundancy, const ScoreOptions& options, const Tensor& scores,
           const Tensor& importance, const Tensor& redundancy_out, const Tensor& workspace,
           std::uintptr_t stream);

// Online head redundancy (SPEC §4): r = (n·|m|² − 1) / (n − 1) clamped to [0, 1], m the mean of
// the unit-normalised valid keys; 0 when n < 2. keys [B, Hkv, N, D]; out float32 [B, Hkv].
std::size_t head_redundancy_workspace_bytes(int64_t B, int64_t Hkv, int64_t N, int64_t D);
void head_redundancy(const Tensor& keys, const Tensor& valid_lengths, const Tensor& out,
                     const Tensor& workspace, std::uintptr_t stream);

namespace cpu {
void score(const Tensor& q_window, const Tensor& keys, const Tensor& values, const Tensor& valid_lengths,
           const Tensor& redundancy, const ScoreOptions& options, const Tensor& scores,
           const Tensor& importance, const Tensor& redundancy_out);
void head_redundancy(const Tensor& keys, const Tensor& valid_lengths, const Tensor& out);
}  // namespace cpu

#ifdef MIXKV_WITH_CUDA
namespace cuda {
void score(const Tensor& q_window, const Tensor& keys, const Tensor& values, const Tensor& valid_lengths,
           const Tensor& redundancy, const ScoreOptions& options, const Tensor& scores,
           const Tensor& importance, const Tensor& redundancy_out, const Tensor& workspace,
           std::uintptr_t stream);
void head_redundancy(const Tensor& keys, const Tensor& valid_lengths, const Tensor& out,
                     const Tensor& workspace, std::uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace mixkv
