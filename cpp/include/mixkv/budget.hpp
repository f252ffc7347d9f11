// Budget policies (SPEC §7): how many prefix tokens each (sequence, kv head) keeps.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixkv/tensor.hpp"

namespace mixkv {

enum class Policy : int { snapkv = 0, pyramidkv = 1, adakv = 2, sparsemm = 3 };

struct BudgetOptions {
  Policy policy = Policy::snapkv;
  int64_t budget = 64;   // tokens per head including the window, >= 1
  int64_t window = 32;   // W, >= 1
  int64_t layer_idx = 0;   // in [0, num_layers)
  int64_t num_layers = 1;  // L, >= 1
  double pyramid_beta = 20.0;  // > 0
  double ada_floor = 0.2;      // alpha, in [0, 1]
  bool ada_normalize = true;
  int64_t ada_skip = 0;        // >= 0; layers below this use c = base
  double sparsemm_ratio = 0.1;  // in [0, 1)
};

// importance float32 [B, Hkv, P] with P = N - W, contiguous last dimension: the pooled attention
//   importance A (padding -inf). Its shape gives P for every policy; AdaKV alone reads values, and
//   only those of each sequence's valid prefix (the last P_b columns), which must be finite.
// valid_lengths int32 [B] (optional): tokens n_b of each left-padded sequence, in [1, P + W];
//   the prefix of sequence b is P_b = max(n_b - W, 0) (absent: P_b = P).
// head_scores float32 [Hkv] (SparseMM only, required there): this layer's normalised,
//   group-summed head scores.
// out int32 [B, Hkv]: capacities c, always within [0, P_b] (c = P_b keeps the whole prefix).
//
// With base = max(budget - W, 0), every c is finally clamped to [0, P_b]:
//   snapkv:    c = base.
//   pyramidkv: mn = floor(base / beta); mx = 2 base - mn; if mx >= P_b { mx = P_b; mn = 2 base - mx };
//              step = (mx - mn) div (L - 1) (floor; 0 when L = 1); c = mx - layer_idx * step.
//   sparsemm:  mn = floor(base * ratio); pool = (base - mn) * L * Hkv;
//              c_h = round_half_even(head_scores[h] * pool + mn)   (float64 arithmetic).
//   adakv:     layer_idx < skip: c = base. Otherwise, per sequence with P_b > base: per head,
//              f_h = (sum of its top-base A) / (sum of all its A) if normalize (f_h = 1 when the
//              sum is 0, or without normalize); s = A * f_h; the global top Hkv * base of s over
//              all heads (ties to the lower flat index (h, rank of A within head h, descending)) gives a_h
//              slots to head h; c_h = round_half_even(a_h * (1 - floor) + floor(floor * base)).
// Precision of AdaKV: the CPU twin computes the sums, f_h and s in float64 and ranks the float64
//   s. The CUDA path computes the sums (in a tree order) and f_h in float64, rounds each
//   s = double(A) * f_h to float32 and ranks those float32 values, ties (including ties created
//   by that rounding) to the lower flat index. The two paths agree unless two scaled scores
//   straddling the k-th place lie within float32 rounding of each other. The final c_h formula
//   is evaluated in float64 on both paths.
// workspace: capacities_workspace_bytes(...) bytes on the device (CUDA only). stream: a
//   cudaStream_t as an integer (CUDA only). The CUDA path does not synchronise; it cannot check
//   valid_lengths or NaN values (callers validate) and clamps n_b to [0, P + W]. The workspace
//   holds float64 partial sums, counts and float32 candidate scores: about 4 * B * Hkv * (P + 65)
//   bytes.
std::size_t capacities_workspace_bytes(int64_t B, int64_t Hkv, int64_t P);

// The largest capacity `capacities` can give any (sequence, head) of a layer of Hkv heads and P prefix
// columns under `options`, whatever the importance and valid lengths: a column count for the positions of
// the selection that follows (P where no smaller bound holds). With base = max(budget - W, 0):
//   snapkv min(base, P); pyramidkv min(2 base - floor(base / beta), P); adakv min(Hkv base, P) (layers
//   below skip: min(base, P)); sparsemm P (its capacities follow the head scores).
int64_t capacity_bound(const BudgetOptions& options, int64_t Hkv, int64_t P);
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
