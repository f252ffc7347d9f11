// Token scoring on the GPU (SPEC §1–5).
//
// Per (sequence b, kv head h) the G query heads × W window rows form the rows of a small matrix
// (each head's rows padded to Wp, a multiple of 16). Keys stream in tiles of 64; every pass runs
// over (chunk of key tiles, b·h) blocks. Three kernels (after zeroing two arrival counters):
//   pass1     per chunk: logits (tensor cores for 16-bit inputs), per (row, chunk) running max /
//             sum-exp, and sums of unit keys. The last block of each b·h to finish merges the
//             chunks: row max / sum, the mean unit key m and the online r.
//   pass2     per chunk of prefix tiles: logits again -> probabilities summed over the window rows,
//             reduced over the group -> raw A; key norms, k̂·m and value norms of prefix tokens (on
//             sm_90 the key norms come from pass 1 and k·m from spare query rows holding m);
//             per chunk, the sum of pooled A and the minima / maxima / sums of the signals. The
//             last block of each b·h folds the chunks into the per-(b, h) mixing constants.
//   finalize  per column: pooling and mixing -> outputs.
// Every reduction has a fixed order, so results are identical from run to run.
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cuda_check.cuh"
#include "sm_count.cuh"
#include "device_guard.cuh"
#include "dtype.cuh"
#include "dynamic_smem.cuh"
#include "load_part.cuh"
#include "score_mma.cuh"
#include "stamps.cuh"
#include "tile_ring.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "mixkv/error.hpp"
#include "mixkv/score.hpp"

namespace mixkv {

namespace {

using cuda_detail::from_float;
using cuda_detail::to_float;
using score_detail::fast_exp2;

constexpr int kTile = 64;          // keys per tile
constexpr int kLds = kTile + 4;    // row stride of a warp's logit scratch (floats)
constexpr int kMinWarps = 4;
constexpr int kMaxWarps = 16;
constexpr int kFinalThreads = 256;  // finalize: one column per thread
constexpr int kStages = 3;         // key (and value) tiles in flight in tensor-core pass 2
// key tiles in flight in tensor-core pass 1 (its ring of tile_ring.cuh); 3 at head dimension 256 so
// that the ring fits sm_80's 163 KiB per block
template <int DK>
constexpr int kStages1 = DK <= 128 ? 4 : 3;
constexpr int kMaxStrips = 16;     // most 16-row strips (256 packed rows) the tensor-core passes take
constexpr int kRedTokens = 256;    // tokens per block in head_redundancy
constexpr int kReduceThreads = 256;
constexpr int kTargetBlocks = 264;  // chunks per pass: about two resident blocks per SM on a 132-SM GPU
constexpr int kCP = 11;            // per-chunk partials of pass 2
constexpr int kFin = 10;           // per-(b, h) mixing constants
constexpr float kMScale = 1024.0f;  // the mean unit key's scale on the tensor cores (pass 2)
constexpr int64_t kAlign = 256;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// ---- shapes and workspace layout (host) ----------------------------------------------------------

struct Dims {
  int64_t B, Hq, Hkv, N, W, D, G, P, Wp, Rp, Dp, tiles, tpb, chunks1, chunks2, strips;
};

Dims make_dims(int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t W, int64_t D) {
  Dims d{};
  d.B = B, d.Hq = Hq, d.Hkv = Hkv, d.N = N, d.W = W, d.D = D;
  d.G = Hkv > 0 ? Hq / Hkv : 0;
  d.P = N - W;
  d.Wp = round_up(W, 16);
  d.Rp = d.G * d.Wp;
  d.Dp = round_up(D, 16);
  d.tiles = cdiv(N, kTile);
  // Tiles per block: about two resident blocks per SM, each streaming many tiles on long sequences.
  d.tpb = std::max<int64_t>(1, cdiv(d.tiles * B * Hkv, kTargetBlocks));
  d.chunks1 = cdiv(d.tiles, d.tpb);
  d.chunks2 = cdiv(cdiv(d.P, kTile), d.tpb);
  d.strips = d.Rp / 16;
  return d;
}

struct Layout {
  int64_t counters, qpack, stats, rowstat, msum, mvec, ronline, raw_a, sdot, knorm, vnorm, cpart, fin, total;
};

Layout make_layout(const Dims& d) {
  Layout l{};
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += round_up(std::max<int64_t>(bytes, 1), kAlign);
    return at;
  };
  const int64_t bh = d.B * d.Hkv;
  l.counters = take(2 * bh * 4);
  l.qpack = take(bh * d.Rp * d.Dp * 4);  // 4 bytes: the widest input dtype
  l.stats = take(bh * d.Rp * d.chunks1 * 8);
  l.rowstat = take(bh * d.Rp * 8);
  l.msum = take(bh * d.chunks1 * d.Dp * 4);
  l.mvec = take(bh * d.Dp * 4);
  l.ronline = take(bh * 4);
  l.raw_a = take(bh * d.P * 4);
  l.sdot = take(bh * d.P * 4);
  l.knorm = take(bh * d.P * 4);
  l.vnorm = take(bh * d.P * 4);
  l.cpart = take(bh * d.chunks2 * kCP * 4);
  l.fin = take(bh * kFin * 4);
  l.total = off;
  return l;
}

// ---- kernel parameters ---------------------------------------------------------------------------

template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  int64_t qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2;
  const int32_t* valid;
  int64_t valid_stride;
  const float* red;  // offline redundancy or null
  int64_t red_s0, red_s1;
  int red_rows;
  float* scores;
  float* importance;  // may be null
  float* r_out;       // may be null
  unsigned* counters;  // [2][B·Hkv] arrival counters of pass 1 and pass 2, zero at the start
  T* qpack;
  float2* stats;    // [B·Hkv][chunks1][Rp] per-chunk (max, sum) of each row, base 2
  float2* rowstat;  // [B·Hkv][Rp]
  float* msum;      // [B·Hkv][chunks1][Dp]
  float* mvec;      // [B·Hkv][Dp]
  float* ronline;   // [B·Hkv]
  float* raw_a;
  float* sdot;
  float* knorm;
  float* vnorm;
  float* cpart;  // [B·Hkv][chunks2][kCP]
  float* fin;    // [B·Hkv][kFin]
  int B, Hkv, N, W, D, G, P, Wp, Rp, Dp, tpb, tiles, chunks1, chunks2, strips, nwarps, ldk, mma_warps;
  int method, pooling, kernel, gqa;
  float scale, scale2;  // logit scale, and the same times log2(e): softmax statistics are kept base 2
  bool vec_k, need_v, need_kn, need_d;
  // Key signals off pass 2's slab tasks (warpgroup passes with tensor-map tiles): pass 1 writes the
  // squared key norms (kn_pass1), and pass 2 takes k·m from three spare query rows that hold the mean key
  // (km_rows); pass2_finish turns them into norms and k̂·m in place.
  bool kn_pass1, km_rows;
  bool q_pairs;  // query rows 4-byte aligned: element pairs load as one word
  bool q_vec;    // query rows 16-byte aligned: 8-element pieces load as one vector
  // L2 eviction hints of pass 2's tile copies (tensor-core path): 0 none; 1 values evict first (read
  // once); 2 keys too (their last read), so that keys pass 1 left in L2 are not pushed out by values
  int l2;
  int tma_b, tma_h, tma_n;  // tensor-map copies (warpgroup passes): coordinate slots (1-3) of b, h and the key row
};

__device__ __forceinline__ int seq_length(const int32_t* valid, int64_t stride, int b, int N) {
  if (valid == nullptr) return N;
  return min(max(valid[b * stride], 1), N);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Merge two (max, sum of 2^(x - max)) pairs; symmetric, so butterfly merges agree in every lane.
__device__ __forceinline__ float2 merge_stat(float2 a, float2 b) {
  const float m = fmaxf(a.x, b.x);
  if (m == -INFINITY) return make_float2(-INFINITY, 0.0f);
  return make_float2(m, a.y * fast_exp2(a.x - m) + b.y * fast_exp2(b.x - m));
}

enum class Op { sum, min, max };

__device__ __forceinline__ float apply_rt(Op op, float a, float b) {
  return op == Op::sum ? a + b : (op == Op::min ? fminf(a, b) : fmaxf(a, b));
}

// Identity of a reduction: what lanes without a value contribute.
__device__ __forceinline__ float identity_of(Op op) {
  return op == Op::sum ? 0.0f : (op == Op::min ? INFINITY : -INFINITY);
}

// K values at once, value k reduced with ops[k] over the block (at most 32 warps); every thread gets the
// results. Fixed trees (warp butterflies, then each warp folds the warps' results by a butterfly over
// its lanes), so results are identical from run to run. `buf`: at least K × 32 floats.
template <int K>
__device__ void block_reduce_n(float (&v)[K], const Op (&ops)[K], float (*buf)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] = apply_rt(ops[k], v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
  __syncthreads();  // buf may still be read from a previous call
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) buf[k][warp] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = lane < nwarps ? buf[k][lane] : identity_of(ops[k]);
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] = apply_rt(ops[k], v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
}

// One value; `buf`: 32 floats.
template <Op op>
__device__ float block_reduce(float v, float* buf) {
  float one[1] = {v};
  const Op ops[1] = {op};
  block_reduce_n(one, ops, reinterpret_cast<float (*)[32]>(buf));
  return one[0];
}

// Called by every thread of every block of a (chunk, b·h) grid at its end, after the block's global
// writes: true in exactly one block per b·h, the last to arrive, which then sees every block's writes.
// (Release: the barrier orders the block's writes before thread 0's device-scope fence and arrival;
// acquire: the last block's thread 0 fences after the arrival, then the barrier.)
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

__device__ bool last_block(unsigned* counter) {
  __shared__ unsigned is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_acq_rel_gpu();
    const unsigned prev = atomicAdd(counter, 1u);
    is_last = prev == gridDim.x - 1 ? 1u : 0u;
    if (is_last) fence_acq_rel_gpu();
  }
  __syncthreads();
  return is_last != 0u;
}

// Pooled importance at prefix column j (avg counts the zero padding, max ignores it).
template <bool kCoherent>
__device__ __forceinline__ float pooled_at(const float* raw, int j, int s0, int P, int half, bool avg, int kernel) {
  const int lo = max(s0, j - half), hi = min(P - 1, j + half);
  constexpr int kBatch = 8;  // independent loads in flight (kernels up to 7 take one batch)
  float acc = avg ? 0.0f : -INFINITY;
  for (int u0 = lo; u0 <= hi; u0 += kBatch) {
    float x[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int u = u0 + q;
      x[q] = u <= hi ? (kCoherent ? __ldcg(raw + u) : raw[u]) : (avg ? 0.0f : -INFINITY);
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q) acc = avg ? acc + x[q] : fmaxf(acc, x[q]);
  }
  return avg ? acc / static_cast<float>(kernel) : acc;
}

// The valid prefix columns [a, e) that pass-2 chunk `chunk` scores (empty when a >= e).
template <typename T>
__device__ __forceinline__ void chunk_cols(const Params<T>& p, int chunk, int s0, int& a, int& e) {
  a = max(chunk * p.tpb * kTile, s0);
  e = min((chunk + 1) * p.tpb * kTile, p.P);
}

// Folds one column of per-chunk values (chunk c at col[c · stride], chunks [c_first, chunks)) in chunk
// order with `merge`, starting from `acc`; 32 loads in flight per thread.
template <typename V, typename Merge>
__device__ __forceinline__ V fold_chunks(const V* col, int64_t stride, int c_first, int chunks, V acc, Merge merge) {
  constexpr int U = 32;
  int c = c_first;
  for (; c + U <= chunks; c += U) {
    V x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = __ldcg(col + int64_t(c + u) * stride);
#pragma unroll
    for (int u = 0; u < U; ++u) acc = merge(acc, x[u]);
  }
  for (; c < chunks; ++c) acc = merge(acc, __ldcg(col + int64_t(c) * stride));
  return acc;
}

// End of pass 1 (every block): the last block of each b·h merges the chunks' row statistics and, for
// methods with the diversity signal (the only ones that read m or the online r), the unit-key sums:
// rowstat, mvec and the online r.
template <typename T>
__device__ void pass1_finish(const Params<T>& p) {
  __shared__ float buf[32];
  const int bh = blockIdx.y, b = bh / p.Hkv;
  if (!last_block(p.counters + bh)) return;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int c_first = (s0 / kTile) / p.tpb;  // chunks before it hold padding only and wrote nothing
  for (int r = threadIdx.x; r < p.Rp; r += blockDim.x) {
    if (r % p.Wp >= p.W) continue;
    const float2* st = p.stats + int64_t(bh) * p.chunks1 * p.Rp + r;
    p.rowstat[int64_t(bh) * p.Rp + r] = fold_chunks(st, p.Rp, c_first, p.chunks1, make_float2(-INFINITY, 0.0f),
                                                    [](float2 x, float2 y) { return merge_stat(x, y); });
  }
  if (!p.need_d) return;
  float sq = 0.0f;
  for (int d = threadIdx.x; d < p.Dp; d += blockDim.x) {
    const float* ms = p.msum + int64_t(bh) * p.chunks1 * p.Dp + d;
    const float acc = fold_chunks(ms, p.Dp, c_first, p.chunks1, 0.0f, [](float x, float y) { return x + y; });
    const float m = acc / static_cast<float>(n);
    p.mvec[int64_t(bh) * p.Dp + d] = m;
    sq = fmaf(m, m, sq);
  }
  sq = block_reduce<Op::sum>(sq, buf);
  if (threadIdx.x == 0) {
    const float r = n < 2 ? 0.0f : (static_cast<float>(n) * sq - 1.0f) / static_cast<float>(n - 1);
    p.ronline[bh] = fminf(1.0f, fmaxf(0.0f, r));
  }
}

// End of pass 2 (every block, after its raw_a / norm writes): the chunk's partials — the sum of the
// pooled importance over its columns whose pooling window lies inside the chunk, and for each signal
// (value norm, −key norm, −k̂·m) the minimum, maximum and Σ(x − minimum). The last block of each b·h
// adds the pooled importance of the remaining columns, folds the chunks in order and writes the
// mixing constants fin = {r, then (lo, range, factor) for each signal}.
template <typename T>
__device__ void pass2_finish(const Params<T>& p, cuda_detail::Stamps* stamp = nullptr) {
  __shared__ float buf[8][32];
  __shared__ float tot[10];
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int64_t col0 = int64_t(bh) * p.P;
  const float* raw = p.raw_a + col0;
  const int half = p.kernel / 2;
  const bool avg = p.pooling == static_cast<int>(Pooling::avg);
  const bool need[3] = {p.need_v, p.need_kn, p.need_d};
  const float* sig[3] = {p.vnorm + col0, p.knorm + col0, p.sdot + col0};
  float* sdot = p.sdot + col0;
  float* knorm = p.knorm + col0;
  const float sign[3] = {1.0f, -1.0f, -1.0f};
  int a, e;
  chunk_cols(p, chunk, s0, a, e);
  __syncthreads();  // the block's own raw_a / norm writes are visible to all its threads
  if (stamp) stamp->at(7);
  float sum_a = 0.0f, lo[3], hi[3], ref[3], rel[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) lo[s] = INFINITY, hi[s] = -INFINITY, ref[s] = 0.0f, rel[s] = 0.0f;
  int cnt = 0;
  for (int j = a + static_cast<int>(threadIdx.x); j < e; j += blockDim.x) {
    const bool inside = !((a > s0 && j - half < a) || (e < p.P && j + half >= e));
    if (inside) sum_a += pooled_at<false>(raw, j, s0, p.P, half, avg, p.kernel);
    float kn = 0.0f, dot = 0.0f;
    if (p.kn_pass1) {  // pass 1's squared key norms -> norms, pass 2's k·m -> k̂·m, in place
      kn = sqrtf(knorm[j]);
      knorm[j] = kn;
      if (p.km_rows) {
        dot = sdot[j] / fmaxf(kn, 1e-12f);
        sdot[j] = dot;
      }
    }
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      if (!need[s]) continue;
      const float x = sign[s] * (p.kn_pass1 && s > 0 ? (s == 1 ? kn : dot) : sig[s][j]);
      if (cnt == 0) ref[s] = x;
      lo[s] = fminf(lo[s], x), hi[s] = fmaxf(hi[s], x), rel[s] += x - ref[s];
    }
    ++cnt;
  }
  if (stamp) stamp->at(8);
  float r1[7] = {sum_a, lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]};
  const Op ops1[7] = {Op::sum, Op::min, Op::max, Op::min, Op::max, Op::min, Op::max};
  block_reduce_n(r1, ops1, buf);
  if (stamp) stamp->at(11);
  float r2[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) r2[s] = (need[s] && cnt > 0) ? rel[s] + static_cast<float>(cnt) * (ref[s] - r1[1 + 2 * s]) : 0.0f;
  const Op ops2[3] = {Op::sum, Op::sum, Op::sum};
  block_reduce_n(r2, ops2, buf);
  if (threadIdx.x == 0) {
    float* out = p.cpart + (int64_t(bh) * p.chunks2 + chunk) * kCP;
    out[0] = r1[0];
    out[1] = static_cast<float>(max(0, e - a));
#pragma unroll
    for (int s = 0; s < 3; ++s) out[2 + 3 * s] = r1[1 + 2 * s], out[3 + 3 * s] = r1[2 + 2 * s], out[4 + 3 * s] = r2[s];
  }
  if (stamp) stamp->at(9);
  if (!last_block(p.counters + p.B * p.Hkv + bh)) return;
  const int np = p.P - s0;
  // Pooled importance of the columns whose window reaches into a neighbouring chunk.
  float dsum = 0.0f;
  if (np > 0 && half > 0) {
    const int per = 2 * half;
    const int64_t total = int64_t(p.chunks2) * per;
    for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int c = static_cast<int>(idx / per), k = static_cast<int>(idx % per);
      int ca, ce;
      chunk_cols(p, c, s0, ca, ce);
      if (ca >= ce) continue;
      int j;
      bool deferred;
      if (k < half) {  // the chunk's first `half` columns
        j = ca + k;
        if (j >= ce) continue;
        deferred = ca > s0 || (ce < p.P && j + half >= ce);
      } else {  // its last `half` columns, unless counted above
        j = ce - half + (k - half);
        if (j < ca + half) continue;
        deferred = ce < p.P;
      }
      if (deferred) dsum += pooled_at<true>(raw, j, s0, p.P, half, avg, p.kernel);
    }
  }
  float r3[1] = {dsum};
  const Op ops3[1] = {Op::sum};
  block_reduce_n(r3, ops3, buf);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* cp = p.cpart + int64_t(bh) * p.chunks2 * kCP;
  if (warp == 0) {
    float acc = 0.0f;
    for (int c = lane; c < p.chunks2; c += 32) acc += __ldcg(cp + c * kCP);
    acc = warp_sum(acc);
    if (lane == 0) tot[0] = acc + r3[0];
  } else if (warp <= 3 && need[warp - 1]) {
    // This lane's chunks: minimum, maximum and Σ(x − minimum), re-based when the minimum drops.
    const int s = warp - 1;
    float l = INFINITY, u = -INFINITY, acc = 0.0f, cnt = 0.0f;
    for (int c = lane; c < p.chunks2; c += 32) {
      const float* q = cp + c * kCP;
      const float cn = __ldcg(q + 1), cl = __ldcg(q + 2 + 3 * s), ch = __ldcg(q + 3 + 3 * s), cs = __ldcg(q + 4 + 3 * s);
      if (cn == 0.0f) continue;
      if (cl < l) {
        if (cnt > 0.0f) acc += cnt * (l - cl);
        l = cl;
      }
      u = fmaxf(u, ch), acc += cs + cn * (cl - l), cnt += cn;
    }
    float lo_all = l, hi_all = u;
    for (int o = 16; o > 0; o >>= 1) {
      lo_all = fminf(lo_all, __shfl_xor_sync(0xffffffffu, lo_all, o));
      hi_all = fmaxf(hi_all, __shfl_xor_sync(0xffffffffu, hi_all, o));
    }
    acc = warp_sum(cnt > 0.0f ? acc + cnt * (l - lo_all) : 0.0f);
    if (lane == 0) tot[1 + 3 * s] = lo_all, tot[2 + 3 * s] = hi_all, tot[3 + 3 * s] = acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float* f = p.fin + int64_t(bh) * kFin;
    // r: the offline value, else the online one (merged by pass 1 for the methods that use it)
    f[0] = p.red != nullptr ? p.red[(p.red_rows == 1 ? 0 : b) * p.red_s0 + h * p.red_s1]
                            : (p.need_d ? __ldcg(p.ronline + bh) : 0.0f);
    for (int k = 1; k < kFin; ++k) f[k] = 0.0f;
    if (np > 0) {
      const float fnp = static_cast<float>(np), mean_a = tot[0] / fnp;
      for (int s = 0; s < 3; ++s) {
        if (!need[s]) continue;
        // mean of the min-max normalised signal: (mean(x) − lo) / range
        const float range = tot[2 + 3 * s] - tot[1 + 3 * s] + 1e-8f;
        const float mnorm = fmaxf(0.0f, tot[3 + 3 * s] / fnp / range);
        f[1 + 3 * s] = tot[1 + 3 * s], f[2 + 3 * s] = range, f[3 + 3 * s] = mean_a / (mnorm + 1e-8f);
      }
    }
  }
}

// Copy key rows j0 .. j0+63 of one (b, h) into shared memory, zero outside [lo, hi) and past D.
template <typename T>
__device__ void load_tile(const T* base, int64_t row_stride, int j0, int lo, int hi, int D, int Dp, bool vec,
                          T* tile, int ldk) {
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    const int per_row = Dp / V;
    for (int idx = threadIdx.x; idx < kTile * per_row; idx += blockDim.x) {
      const int r = idx / per_row, c = (idx % per_row) * V, j = j0 + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (j >= lo && j < hi && c < D) val = *reinterpret_cast<const uint4*>(base + j * row_stride + c);
      *reinterpret_cast<uint4*>(tile + r * ldk + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kTile * Dp; idx += blockDim.x) {
      const int r = idx / Dp, c = idx % Dp, j = j0 + r;
      tile[r * ldk + c] = (j >= lo && j < hi && c < D) ? base[j * row_stride + c] : from_float<T>(0.0f);
    }
  }
}

// Unscaled logits of one 16-row strip of packed queries against a 64-key tile -> scratch [16][kLds].
template <typename T>
__device__ void strip_logits(const T* qstrip, int Dp, const T* tile, int ldk, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    const int lane = threadIdx.x & 31;
    float acc0[16], acc1[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) acc0[r] = acc1[r] = 0.0f;
    for (int d = 0; d < Dp; ++d) {
      const float k0 = tile[lane * ldk + d], k1 = tile[(lane + 32) * ldk + d];
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const float qv = __ldg(qstrip + r * Dp + d);
        acc0[r] = fmaf(qv, k0, acc0[r]);
        acc1[r] = fmaf(qv, k1, acc1[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      scratch[r * kLds + lane] = acc0[r];
      scratch[r * kLds + lane + 32] = acc1[r];
    }
  } else {
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTile / 16];
#pragma unroll
    for (int t = 0; t < kTile / 16; ++t) wmma::fill_fragment(acc[t], 0.0f);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
    for (int kk = 0; kk < Dp; kk += 16) {
      wmma::load_matrix_sync(a, qstrip + kk, Dp);
#pragma unroll
      for (int t = 0; t < kTile / 16; ++t) {
        wmma::load_matrix_sync(b, tile + t * 16 * ldk + kk, ldk);
        wmma::mma_sync(acc[t], a, b, acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kTile / 16; ++t) wmma::store_matrix_sync(scratch + t * 16, acc[t], kLds, wmma::mem_row_major);
  }
}

// Shared-memory carving shared by host (sizes) and device (pointers).
struct Smem {
  int64_t tile, scratch, vec_a, vec_b, stripcol, rowstats, total;
};

__host__ __device__ inline int64_t align128(int64_t x) { return (x + 127) / 128 * 128; }

__host__ __device__ inline Smem smem_layout(int ldk, int elem, int nwarps, int Dp, int strips, bool second) {
  Smem s{};
  int64_t off = 0;
  s.tile = off, off += align128(int64_t(kTile) * ldk * elem);
  s.scratch = off, off += align128(int64_t(nwarps) * 16 * kLds * 4);
  s.vec_a = off, off += align128(int64_t(Dp > kTile ? Dp : kTile) * 4);  // pass1: key norms; pass2: m
  s.vec_b = off, off += align128(int64_t(Dp) * 4);                     // pass1: unit-key sums
  s.stripcol = off, off += second ? align128(int64_t(strips) * kTile * 4) : 0;
  s.rowstats = off, off += second ? align128(int64_t(nwarps) * 16 * 8) : 0;
  s.total = off;
  return s;
}

// Raw importance of one key tile: per column, the window-row sums of each query head's strips
// (stripcol [G * strips_per_head][kTile]) averaged over the W window rows, then reduced over the
// G heads of the group (mean or max). Called by every thread of the block. One division per column:
// the mean is Σ / (W·G); the max of the heads' sums divided by W equals the max of the quotients.
// The calling thread is number `index` of `count` threads sharing the columns (index < 0: none).
template <typename T>
__device__ void store_raw_importance(const Params<T>& p, const float* stripcol, int strips_per_head, int j0, int s0,
                                     int64_t col0, int index, int count) {
  const bool gmax = p.gqa == static_cast<int>(GqaReduce::max);
  const int S = p.G * strips_per_head;
  if (index < 0) return;
  for (int c = index; c < kTile; c += count) {
    const int j = j0 + c;
    if (j < s0 || j >= p.P) continue;
    const float* col = stripcol + c;
    float red;
    if (gmax) {
      red = -INFINITY;
      for (int g = 0; g < p.G; ++g) {
        float a = 0.0f;
        for (int u = 0; u < strips_per_head; ++u) a += col[(g * strips_per_head + u) * kTile];
        red = fmaxf(red, a);
      }
      red /= static_cast<float>(p.W);
    } else {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // independent chains over the strips
      int s = 0;
      for (; s + 4 <= S; s += 4)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] += col[(s + q) * kTile];
      for (; s < S; ++s) acc[0] += col[s * kTile];
      red = ((acc[0] + acc[1]) + (acc[2] + acc[3])) / static_cast<float>(p.W * p.G);
    }
    p.raw_a[col0 + j] = red;
  }
}

// ---- generic kernels (any dtype or alignment) -----------------------------------------------------

template <typename T>
__global__ void pack_q_kernel(Params<T> p) {
  const int r = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int g = r / p.Wp, i = r % p.Wp;
  T* dst = p.qpack + (int64_t(bh) * p.Rp + r) * p.Dp;
  const bool row_ok = i < p.W;
  const T* src = p.q + b * p.qs0 + int64_t(h * p.G + g) * p.qs1 + int64_t(i) * p.qs2;
  for (int d = threadIdx.x; d < p.Dp; d += blockDim.x)
    dst[d] = (row_ok && d < p.D) ? src[d] : from_float<T>(0.0f);
}

template <typename T>
__device__ void pass1_tiles(const Params<T>& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int tile_begin = chunk * p.tpb, tile_end = min(p.tiles, tile_begin + p.tpb);
  if (tile_end * kTile <= s0) return;  // padding only; the combine skips this chunk
  const Smem lay = smem_layout(p.ldk, sizeof(T), p.nwarps, p.Dp, p.strips, false);
  T* tile = reinterpret_cast<T*>(smem + lay.tile);
  float* scratch = reinterpret_cast<float*>(smem + lay.scratch);
  float* knorm = reinterpret_cast<float*>(smem + lay.vec_a);
  float* usum = reinterpret_cast<float*>(smem + lay.vec_b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* kbase = p.k + b * p.ks0 + h * p.ks1;
  for (int d = threadIdx.x; d < p.Dp; d += blockDim.x) usum[d] = 0.0f;
  float* wscratch = scratch + warp * 16 * kLds;
  bool first = true;
  for (int t = tile_begin; t < tile_end; ++t) {
    const int j0 = t * kTile;
    if (j0 + kTile <= s0) continue;
    __syncthreads();
    load_tile(kbase, p.ks2, j0, s0, p.N, p.D, p.Dp, p.vec_k, tile, p.ldk);
    __syncthreads();
    for (int r = warp; r < kTile; r += p.nwarps) {
      float ss = 0.0f;
      for (int d = lane; d < p.Dp; d += 32) {
        const float x = to_float(tile[r * p.ldk + d]);
        ss = fmaf(x, x, ss);
      }
      ss = warp_sum(ss);
      if (lane == 0) knorm[r] = sqrtf(ss);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
      float acc = usum[d];
      for (int r = 0; r < kTile; ++r) acc += to_float(tile[r * p.ldk + d]) / fmaxf(knorm[r], 1e-12f);
      usum[d] = acc;
    }
    for (int s = warp; s < p.strips; s += p.nwarps) {
      strip_logits(p.qpack + (int64_t(bh) * p.Rp + s * 16) * p.Dp, p.Dp, tile, p.ldk, wscratch);
      __syncwarp();
      const int row = lane >> 1, half = lane & 1, rloc = s * 16 + row, i = rloc % p.Wp;
      float2 st = make_float2(-INFINITY, 0.0f);
      if (i < p.W) {
        const int last = min(p.N - 1, p.P + i);  // causal: window row i sees keys up to P + i
        for (int cc = 0; cc < kTile / 2; ++cc) {
          const int c = 2 * cc + half, j = j0 + c;
          if (j < s0 || j > last) continue;
          const float l = wscratch[row * kLds + c] * p.scale2;
          if (l > st.x) {
            st.y = st.y * fast_exp2(st.x - l) + 1.0f;
            st.x = l;
          } else {
            st.y += fast_exp2(l - st.x);
          }
        }
      }
      const float2 other = make_float2(__shfl_xor_sync(0xffffffffu, st.x, 1), __shfl_xor_sync(0xffffffffu, st.y, 1));
      if (half == 0 && i < p.W) {
        float2* slot = p.stats + (int64_t(bh) * p.chunks1 + chunk) * p.Rp + rloc;
        const float2 here = merge_stat(st, other);
        *slot = first ? here : merge_stat(*slot, here);
      }
      __syncwarp();
    }
    first = false;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < p.Dp; d += blockDim.x)
    p.msum[(int64_t(bh) * p.chunks1 + chunk) * p.Dp + d] = d < p.D ? usum[d] : 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32) pass1_kernel(Params<T> p) {
  pass1_tiles(p);
  pass1_finish(p);
}

template <typename T>
__device__ void pass2_tiles(const Params<T>& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int ptiles = (p.P + kTile - 1) / kTile;
  const int tile_begin = chunk * p.tpb, tile_end = min(ptiles, tile_begin + p.tpb);
  if (tile_end * kTile <= s0) return;
  const Smem lay = smem_layout(p.ldk, sizeof(T), p.nwarps, p.Dp, p.strips, true);
  T* tile = reinterpret_cast<T*>(smem + lay.tile);
  float* scratch = reinterpret_cast<float*>(smem + lay.scratch);
  float* mean_key = reinterpret_cast<float*>(smem + lay.vec_a);
  float* stripcol = reinterpret_cast<float*>(smem + lay.stripcol);
  float2* rowstats = reinterpret_cast<float2*>(smem + lay.rowstats);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* kbase = p.k + b * p.ks0 + h * p.ks1;
  const T* vbase = p.v + b * p.vs0 + h * p.vs1;
  for (int d = threadIdx.x; d < p.Dp; d += blockDim.x) mean_key[d] = p.mvec[int64_t(bh) * p.Dp + d];
  float* wscratch = scratch + warp * 16 * kLds;
  float2* wstats = rowstats + warp * 16;
  const int strips_per_head = p.Wp / 16;
  const int64_t col0 = int64_t(bh) * p.P;
  for (int t = tile_begin; t < tile_end; ++t) {
    const int j0 = t * kTile;
    if (j0 + kTile <= s0) continue;
    __syncthreads();
    load_tile(kbase, p.ks2, j0, s0, p.P, p.D, p.Dp, p.vec_k, tile, p.ldk);
    __syncthreads();
    // Per prefix token: key norm, k̂·m, value norm.
    for (int r = warp; r < kTile; r += p.nwarps) {
      const int j = j0 + r;
      if (j < s0 || j >= p.P) continue;
      float ss = 0.0f, dm = 0.0f, vs = 0.0f;
      for (int d = lane; d < p.D; d += 32) {
        const float x = to_float(tile[r * p.ldk + d]);
        ss = fmaf(x, x, ss);
        dm = fmaf(x, mean_key[d], dm);
      }
      if (p.need_v) {
        const T* vrow = vbase + j * p.vs2;
        for (int d = lane; d < p.D; d += 32) {
          const float x = to_float(vrow[d]);
          vs = fmaf(x, x, vs);
        }
        vs = warp_sum(vs);
      }
      ss = warp_sum(ss);
      dm = warp_sum(dm);
      if (lane == 0) {
        const float norm = sqrtf(ss);
        p.knorm[col0 + j] = norm;
        p.sdot[col0 + j] = dm / fmaxf(norm, 1e-12f);
        if (p.need_v) p.vnorm[col0 + j] = sqrtf(vs);
      }
    }
    // Probabilities summed over each strip's window rows.
    for (int s = warp; s < p.strips; s += p.nwarps) {
      strip_logits(p.qpack + (int64_t(bh) * p.Rp + s * 16) * p.Dp, p.Dp, tile, p.ldk, wscratch);
      if (lane < 16) {
        const int rloc = s * 16 + lane;
        float2 st = make_float2(0.0f, 1.0f);
        if (rloc % p.Wp < p.W) {
          st = p.rowstat[int64_t(bh) * p.Rp + rloc];
          st.y = 1.0f / st.y;
        }
        wstats[lane] = st;
      }
      __syncwarp();
      const int i0 = (s * 16) % p.Wp;
      for (int c = lane; c < kTile; c += 32) {
        const int j = j0 + c;
        float acc = 0.0f;
        if (j >= s0 && j < p.P) {
          for (int row = 0; row < 16 && i0 + row < p.W; ++row) {
            const float2 st = wstats[row];
            acc += fast_exp2(fmaf(wscratch[row * kLds + c], p.scale2, -st.x)) * st.y;
          }
        }
        stripcol[s * kTile + c] = acc;
      }
      __syncwarp();
    }
    __syncthreads();
    store_raw_importance(p, stripcol, strips_per_head, j0, s0, col0, int(threadIdx.x), int(blockDim.x));
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32) pass2_kernel(Params<T> p) {
  score_detail::grid_dep_wait();
  pass2_tiles(p);
  pass2_finish(p);
}

// ---- tensor-core passes (16-bit inputs, 16-byte aligned rows, at most kMaxStrips strips) ---------
// One block per (chunk of key tiles, b·h). Warp w < mma_warps holds packed query rows
// NT·8·w .. NT·8·(w+1) − 1 as B fragments in registers for the whole chunk and computes, per 16-key
// slab of a tile, the transposed logits (keys × rows): a key's values of all the warp's rows sit in
// the four lanes of one lane group, so row statistics stay per lane across tiles and column sums
// need two shuffles. Key (and value) tiles stream through a kStages-deep cp.async ring; the other
// row-wise work (unit keys, norms) is shared by all warps. DK: the head dimension rounded up to 64,
// 128 or 256.

template <typename T, int DK, int NT>
__device__ __forceinline__ void load_q_fragments(const Params<T>& p, int b, int h, int warp, int lane,
                                                 uint32_t (&qb)[NT][DK / 16][2]) {
  using score_detail::pack_pair;
  const int g8 = lane >> 2, t = lane & 3;
  // One row pointer per n8 tile (rows outside the query window point at its first row, and a select
  // zeroes what they read), so that in the common case the loads issue back to back.
  const T* rows[NT];
  bool row_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = warp * 8 * NT + nt * 8 + g8, g = r / p.Wp, i = r - g * p.Wp;
    row_ok[nt] = r < p.Rp && i < p.W;
    rows[nt] = p.q + b * p.qs0 + int64_t(h * p.G + (row_ok[nt] ? g : 0)) * p.qs1 +
               int64_t(row_ok[nt] ? i : 0) * p.qs2;
  }
  if (p.q_pairs && p.D == DK) {  // whole rows of 4-byte pairs: fixed offsets from one pointer per row
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint32_t* at = reinterpret_cast<const uint32_t*>(rows[nt] + 2 * t);
#pragma unroll
      for (int ks = 0; ks < DK / 16; ++ks)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const uint32_t w = at[ks * 8 + 4 * u];
          qb[nt][ks][u] = row_ok[nt] ? w : 0u;
        }
    }
    return;
  }
  const T zero = from_float<T>(0.0f);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int ks = 0; ks < DK / 16; ++ks)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int c = ks * 16 + 2 * t + 8 * u;  // D % 8 == 0: both elements of a pair lie inside or outside
        const bool in = row_ok[nt] && c < p.D;
        if (p.q_pairs)
          qb[nt][ks][u] = in ? *reinterpret_cast<const uint32_t*>(rows[nt] + c) : 0u;
        else
          qb[nt][ks][u] = in ? pack_pair(rows[nt][c], rows[nt][c + 1]) : pack_pair(zero, zero);
      }
}

// Issue the cp.async copies of rows j0..j0+63 (zero outside [lo, hi) and past D) into `dst`, shared by
// `count` threads (a multiple of 32, hence of CH = DK / 8) of which this is number `index`.
// `hint`: L2 policy of the copies (score_detail::l2_policy). Thread i copies the 16-byte pieces
// i + u·count: its column is fixed and its rows step by count / CH — one pointer step per piece instead
// of a 64-bit index product.
template <typename T, int DK>
__device__ __forceinline__ void issue_tile(const T* base, int64_t row_stride, int j0, int lo, int hi, int D,
                                           T* dst, int hint, int index, int count) {
  constexpr int LDK = DK + 8, CH = DK / 8;  // 16-byte row padding: ldmatrix rows in distinct banks
  const int c = (index % CH) * 8, rstep = count / CH;
  int r = index / CH;
  const bool col_ok = c < D;
  const T* src = base + int64_t(j0 + r) * row_stride + c;
  const int64_t sstep = int64_t(rstep) * row_stride;
  T* out = dst + r * LDK + c;
  auto copy_all = [&](auto one) {
    for (; r < kTile; r += rstep, src += sstep, out += rstep * LDK) {
      const int j = j0 + r;
      const bool ok = col_ok && j >= lo && j < hi;
      one(out, ok ? src : base, ok);
    }
  };
  if (hint != 0) {
    const uint64_t pol = score_detail::l2_policy(hint);
    copy_all([pol](T* d, const T* s, bool ok) { score_detail::cp_async16_hint(d, s, ok, pol); });
  } else {
    copy_all([](T* d, const T* s, bool ok) { score_detail::cp_async16(d, s, ok); });
  }
}

// Ring set-up at the start of a tensor-core pass (every thread): barriers full (the filling warp's 32
// lanes, each through cp.async.mbarrier.arrive) and empty (`readers` threads, each when its reads of
// the slot are done), visible to the block.
template <int S>
__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty, int readers) {
  if (threadIdx.x == 0)
    for (int st = 0; st < S; ++st) {
      ring_detail::mbar_init(full + st, 32);
      ring_detail::mbar_init(empty + st, static_cast<unsigned>(readers));
    }
  __syncthreads();
}

template <int NT>
constexpr int mma_threads() {
  return NT == 4 ? 256 : 512;
}

template <typename T, int DK, int NT>
__global__ void __launch_bounds__(mma_threads<NT>(), 512 / mma_threads<NT>()) pass1_mma_kernel(Params<T> p) {
  constexpr int LDK = DK + 8, KS = DK / 16, RW = 8 * NT, S1 = kStages1<DK>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);                                          // [S1][64][LDK]
  float* usum = reinterpret_cast<float*>(smem + S1 * kTile * LDK * sizeof(T));   // [warps][4][32][4]
  uint64_t* full = reinterpret_cast<uint64_t*>(usum + (blockDim.x / 32) * 32 * 16);  // [S1]
  uint64_t* empty = full + S1;                                                   // [S1]
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int t_begin = max(chunk * p.tpb, s0 / kTile), t_end = min(p.tiles, (chunk + 1) * p.tpb);
  const int ntiles = t_end - t_begin;  // <= 0: padding only; the combine skips this chunk
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  if (ntiles > 0) {
    const T* kbase = p.k + b * p.ks0 + h * p.ks1;
    // Row work: LPR lanes per key row, lane part c owns columns 8c..8c+7 and 8(c+LPR)..8(c+LPR)+7.
    constexpr int LPR = DK / 16, RPS = 32 / LPR;
    const int slot = lane / LPR, part = lane % LPR;
    // This lane's 16 unit-key sums (its row slot, its columns) accumulate in shared memory as four
    // float4, laid out [warp][k / 4][lane] so that a quarter warp's 16-byte accesses hit distinct banks.
    float4* uacc = reinterpret_cast<float4*>(usum) + warp * 4 * 32 + lane;
#pragma unroll
    for (int k4 = 0; k4 < 4; ++k4) uacc[k4 * 32] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // Key tiles stream through a ring of S1 slots filled by the last warp's cp.async copies
    // (tile_ring.cuh): a warp waits only for the tile it reads; the filling warp waits until every
    // warp is done with a slot before refilling it, so warps drift instead of meeting once per tile.
    const int producer = nwarps - 1;
    init_ring<S1>(full, empty, nwarps * 32);
    auto fill = [&](int x) {  // tile x of the chunk into slot x % S1 (producer warp)
      issue_tile<T, DK>(kbase, p.ks2, (t_begin + x) * kTile, s0, p.N, p.D, ring + (x % S1) * kTile * LDK, 0,
                        lane, 32);
      ring_detail::cp_async_arrive(full + x % S1);
    };
    if (warp == producer)
      for (int x = 0; x < min(S1 - 1, ntiles); ++x) fill(x);
    const bool mma_warp = warp < p.mma_warps;
    // Groups of RPS key rows for the unit-key sums: with warps that hold no query rows, each query
    // warp takes one group (group = its index) and those warps the rest; otherwise round robin.
    const int nx = nwarps - p.mma_warps;
    const int ustep = nx > 0 ? (mma_warp ? kTile : nx) : nwarps;
    // bfloat16 with warps that hold no query rows: those warps take all the unit-key sums, on the
    // tensor cores (slab_unit_sums; fp16 cannot hold the inverse norm of a tiny key).
    constexpr bool kTcUnits = std::is_same_v<T, __nv_bfloat16>;
    const bool tc_units = kTcUnits && nx > 0;
    uint32_t qb[NT][KS][2];
    if (mma_warp) load_q_fragments<T, DK, NT>(p, b, h, warp, lane, qb);
    const int g8 = lane >> 2, t4 = lane & 3;
    const float s2 = p.scale2;
    // Per row: a reference ms (base 2, scaled) and rs = the sum of 2^(x·s2 − ms). The reference moves
    // only when a slab's two terms of the row add up to more than kBig (2^32; sums stay far from
    // overflow), so a slab costs one compare per row instead of a rescale. ms starts at −FLT_MAX: the
    // first finite logit moves it, a masked one (−inf) adds 2^−inf = 0.
    constexpr float kBig = 4294967296.0f;
    float ms[NT][2], rs[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) ms[nt][e] = -FLT_MAX, rs[nt][e] = 0.0f;
    // Tile it: wait until it is in; the producer then refills the slot of tile it - 1 once every warp
    // is done with it. done_tile(it) after the warp's last read of tile it.
    // (kFill: this warp may be the producer; the query warps' loop without it keeps clear of spills.)
    auto next_tile = [&](int it, auto kFill) {
      ring_detail::mbar_wait(full + it % S1, (it / S1) & 1);
      if (decltype(kFill)::value && warp == producer && it + S1 - 1 < ntiles) {
        if (it > 0) ring_detail::mbar_wait(empty + (it - 1) % S1, ((it - 1) / S1) & 1);
        fill(it + S1 - 1);
      }
      return static_cast<const T*>(ring + (it % S1) * kTile * LDK);
    };
    auto done_tile = [&](int it) { ring_detail::mbar_arrive(empty + it % S1); };  // every lane: its reads are done
    // Sums of unit keys on the CUDA cores (padding rows are zero: 0 · 1e12 = 0).
    auto unit_rows = [&](const T* tile) {
      for (int u = warp; u < kTile / RPS; u += ustep) {
        const int r = u * RPS + slot;
        float x[16];
        score_detail::load_eight(tile + r * LDK + 8 * part, x);
        score_detail::load_eight(tile + r * LDK + 8 * (part + LPR), x + 8);
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < 16; ++k) ss = fmaf(x[k], x[k], ss);
#pragma unroll
        for (int o = 1; o < LPR; o <<= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float inv = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
#pragma unroll
        for (int k4 = 0; k4 < 4; ++k4) {
          float4 u = uacc[k4 * 32];
          u.x = fmaf(x[4 * k4], inv, u.x), u.y = fmaf(x[4 * k4 + 1], inv, u.y);
          u.z = fmaf(x[4 * k4 + 2], inv, u.z), u.w = fmaf(x[4 * k4 + 3], inv, u.w);
          uacc[k4 * 32] = u;
        }
      }
    };
    auto query_loop = [&](auto kFill) {
      for (int it = 0; it < ntiles; ++it) {
        const T* tile = next_tile(it, kFill);
        const int j0 = (t_begin + it) * kTile;
        if (!tc_units) unit_rows(tile);
        const bool edge = j0 < s0 || j0 + kTile - 1 > p.P;
#pragma unroll
        for (int mt = 0; mt < kTile / 16; ++mt) {
          float acc[NT][4];
          score_detail::slab_logits<T, KS, LDK, NT>(qb, tile + mt * 16 * LDK, lane, acc);
          if (edge) {
#pragma unroll
            for (int kh = 0; kh < 2; ++kh) {
              const int j = j0 + mt * 16 + g8 + 8 * kh;
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const int last = p.P + (warp * RW + nt * 8 + 2 * t4 + e) % p.Wp;  // row i sees keys <= P + i
                  if (j < s0 || j > last) acc[nt][2 * kh + e] = -INFINITY;
                }
            }
          }
          // The slab's two terms of each row against its reference; a sum above 2^kBig (or +inf: the
          // reference is still -FLT_MAX, or a logit jumped) moves that row's reference to the slab's
          // larger logit first. Rare after the first tiles: one compare per row and slab.
          float add[NT][2];
          bool big = false;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              add[nt][e] = fast_exp2(fmaf(acc[nt][e], s2, -ms[nt][e])) + fast_exp2(fmaf(acc[nt][2 + e], s2, -ms[nt][e]));
              big |= add[nt][e] > kBig;
            }
          if (big) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if (add[nt][e] > kBig) {
                  const float tm = fmaxf(acc[nt][e], acc[nt][2 + e]) * s2;
                  rs[nt][e] *= fast_exp2(ms[nt][e] - tm);  // 0 while the old reference is -FLT_MAX
                  ms[nt][e] = tm;
                  add[nt][e] = fast_exp2(fmaf(acc[nt][e], s2, -tm)) + fast_exp2(fmaf(acc[nt][2 + e], s2, -tm));
                }
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) rs[nt][e] += add[nt][e];
        }
        done_tile(it);
      }
    };
    if (mma_warp) {
      if (warp == producer)  // every warp holds query rows
        query_loop(std::true_type{});
      else
        query_loop(std::false_type{});
    } else {
      // Warps without query rows: the unit-key sums, on the tensor cores for bfloat16 (the slabs of a
      // tile round robin over these warps, sums in registers), else the CUDA-core row groups.
      float us[KS][4];
#pragma unroll
      for (int ds = 0; ds < KS; ++ds) us[ds][0] = us[ds][1] = us[ds][2] = us[ds][3] = 0.0f;
      for (int it = 0; it < ntiles; ++it) {
        const T* tile = next_tile(it, std::true_type{});
        bool tc = false;
        if constexpr (kTcUnits) {
          if (tc_units) {
            for (int mt = warp - p.mma_warps; mt < kTile / 16; mt += nx)
              score_detail::slab_unit_sums<T, KS, LDK>(tile + mt * 16 * LDK, lane, us);
            tc = true;
          }
        }
        if (!tc) unit_rows(tile);
        done_tile(it);
      }
      if (tc_units) {
        float* mine = usum + (warp - p.mma_warps) * DK;
#pragma unroll
        for (int ds = 0; ds < KS; ++ds) {
          const float2 sum = score_detail::unit_sum_pair(us[ds]);
          if (t4 == 0) mine[16 * ds + g8] = sum.x, mine[16 * ds + g8 + 8] = sum.y;
        }
      }
    }
    score_detail::grid_dep_launch();
    if (mma_warp) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float2 st = make_float2(rs[nt][e] > 0.0f ? ms[nt][e] : -INFINITY, rs[nt][e]);
          for (int o = 4; o < 32; o <<= 1) {
            const float2 other =
                make_float2(__shfl_xor_sync(0xffffffffu, st.x, o), __shfl_xor_sync(0xffffffffu, st.y, o));
            st = merge_stat(st, other);
          }
          const int r = warp * RW + nt * 8 + 2 * t4 + e;
          if (g8 == 0 && r < p.Rp && r % p.Wp < p.W) p.stats[(int64_t(bh) * p.chunks1 + chunk) * p.Rp + r] = st;
        }
    }
    __syncthreads();
    for (int d = tid; d < p.Dp; d += nthreads) {
      float s = 0.0f;
      if (tc_units) {
        for (int x = 0; x < nx; ++x) s += usum[x * DK + d];  // zero past D: the copies zero-fill
      } else if (d < p.D) {
        // column d is value k = 8·(c / LPR) + d % 8 of lane part c % LPR, with c = d / 8
        const int c8 = d >> 3, k = (c8 / LPR) * 8 + (d & 7), pt = c8 % LPR;
        for (int w = 0; w < nwarps; ++w)
          for (int sl = 0; sl < RPS; ++sl) s += usum[((w * 4 + k / 4) * 32 + sl * LPR + pt) * 4 + (k & 3)];
      }
      p.msum[(int64_t(bh) * p.chunks1 + chunk) * p.Dp + d] = s;
    }
  }
  pass1_finish(p);
}

// The norms of a 16-key slab from slab_norms(_by) into the workspace (every lane calls it): key norm and
// k̂·m (keys; d0, d1 as slab_norms returns them) or value norm of keys j0s .. j0s + 15 inside [s0, P).
template <typename T>
__device__ __forceinline__ void store_slab_norms(const Params<T>& p, bool keys, float n0, float n1, float d0, float d1,
                                                 int j0s, int s0, int64_t col0, int lane) {
  const int g8 = lane >> 2, t4 = lane & 3;
  if (keys) {
    d0 = __shfl_sync(0xffffffffu, d0, lane & ~3);
    d1 = __shfl_sync(0xffffffffu, d1, lane & ~3);
  }
  if (t4 != (g8 >> 1)) return;
#pragma unroll
  for (int kh = 0; kh < 2; ++kh) {
    const int j = j0s + g8 + 8 * kh;
    if (j >= s0 && j < p.P) {
      const float norm = sqrtf(kh ? n1 : n0);
      if (keys) {
        p.knorm[col0 + j] = norm;
        p.sdot[col0 + j] = (kh ? d1 : d0) * (1.0f / kMScale) / fmaxf(norm, 1e-12f);
      } else {
        p.vnorm[col0 + j] = norm;
      }
    }
  }
}

template <typename T, int DK, int NT>
__global__ void __launch_bounds__(mma_threads<NT>(), 512 / mma_threads<NT>()) pass2_mma_kernel(Params<T> p) {
  constexpr int LDK = DK + 8, KS = DK / 16, RW = 8 * NT, SPW = NT / 2, M = 8 * SPW;
  extern __shared__ __align__(128) unsigned char smem[];
  T* kring = reinterpret_cast<T*>(smem);                                  // [kStages][64][LDK]
  T* vring = kring + kStages * kTile * LDK;                               // [kStages][64][LDK]
  T* mfrag = vring + kStages * kTile * LDK;                               // [2][DK]: m·2^10 high, low parts
  float* stripcol = reinterpret_cast<float*>(mfrag + 2 * DK);             // [2][kMaxStrips][64]
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int ptiles = (p.P + kTile - 1) / kTile;
  const int t_begin = max(chunk * p.tpb, s0 / kTile), t_end = min(ptiles, (chunk + 1) * p.tpb);
  const int ntiles = t_end - t_begin;
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  if (ntiles > 0) {
    const T* kbase = p.k + b * p.ks0 + h * p.ks1;
    const T* vbase = p.v + b * p.vs0 + h * p.vs1;
    const int khint = p.l2 >= 2 ? 1 : 0, vhint = p.l2 >= 1 ? 1 : 0;
    auto issue = [&](int it) {
      const int j0 = (t_begin + it) * kTile, st = it % kStages;
      issue_tile<T, DK>(kbase, p.ks2, j0, s0, p.P, p.D, kring + st * kTile * LDK, khint, tid, nthreads);
      if (p.need_v)
        issue_tile<T, DK>(vbase, p.vs2, j0, s0, p.P, p.D, vring + st * kTile * LDK, vhint, tid, nthreads);
    };
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < ntiles) issue(st);
      score_detail::cp_async_commit();
    }
    const bool mma_warp = warp < p.mma_warps;
    uint32_t qb[NT][KS][2];
    if (mma_warp) load_q_fragments<T, DK, NT>(p, b, h, warp, lane, qb);
    score_detail::grid_dep_wait();  // pass 1's row statistics and mean key
    // The mean unit key as two 16-bit rows (high and low part) for k·m on the tensor cores, scaled by
    // 2^10 so that the low part of small components stays a normal half-precision number.
    for (int d = tid; d < DK; d += nthreads) {
      const float m = d < p.Dp ? p.mvec[int64_t(bh) * p.Dp + d] * kMScale : 0.0f;
      const T hi = from_float<T>(m);
      mfrag[d] = hi;
      mfrag[DK + d] = from_float<T>(m - to_float(hi));
    }
    const int g8 = lane >> 2, t4 = lane & 3;
    const float s2 = p.scale2;
    // p = 2^(x·s2 − c) with c = max + log2(sum); +inf (p = 0) for rows past W or that see nothing
    float cr[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = warp * RW + nt * 8 + 2 * t4 + e;
        cr[nt][e] = INFINITY;
        if (mma_warp && r < p.Rp && r % p.Wp < p.W) {
          const float2 st = p.rowstat[int64_t(bh) * p.Rp + r];
          if (st.x != -INFINITY && st.y > 0.0f) cr[nt][e] = st.x + log2f(st.y);
        }
      }
    const int strips_per_head = p.Wp / 16;
    const int64_t col0 = int64_t(bh) * p.P;
    // Warps without query rows (if any) take the raw-importance store.
    const int nx = nwarps - p.mma_warps;
    const int raw_first = nx > 0 ? p.mma_warps * 32 : 0, raw_step = nx > 0 ? nx * 32 : nthreads;
    for (int it = 0; it < ntiles; ++it) {
      score_detail::cp_async_wait<kStages - 2>();
      __syncthreads();
      if (it > 0)  // the previous tile's column sums (double-buffered: one barrier per tile)
        store_raw_importance(p, stripcol + ((it - 1) & 1) * kMaxStrips * kTile, strips_per_head,
                             (t_begin + it - 1) * kTile, s0, col0, tid - raw_first, raw_step);
      if (it + kStages - 1 < ntiles) issue(it + kStages - 1);
      score_detail::cp_async_commit();
      const T* tile = kring + (it % kStages) * kTile * LDK;
      const T* vtile = vring + (it % kStages) * kTile * LDK;
      const int j0 = (t_begin + it) * kTile;
      // Per prefix token: key norm, k̂·m and value norm on the tensor cores, one 16-key slab of keys (tasks
      // 0-3, when the method uses key norms or k̂·m) or of values (4-7, when it uses value norms) per task;
      // the tasks go round robin from the last warp down (one per warp with the extra warp: taking them
      // all, that warp's dependent MMA chains became the critical path).
      const int task_first = p.need_kn || p.need_d ? 0 : 4, task_end = p.need_v ? 8 : 4;
      for (int task = task_first + nwarps - 1 - warp; task < task_end; task += nwarps) {
        const int mt = task & 3;
        const bool keys = task < 4;
        float n0, n1, d0 = 0.0f, d1 = 0.0f;
        if (keys)
          score_detail::slab_norms<T, KS, LDK, true>(tile + mt * 16 * LDK, mfrag, lane, n0, n1, d0, d1);
        else
          score_detail::slab_norms<T, KS, LDK, false>(vtile + mt * 16 * LDK, mfrag, lane, n0, n1, d0, d1);
        store_slab_norms(p, keys, n0, n1, d0, d1, j0 + mt * 16, s0, col0, lane);
      }
      if (mma_warp) {
        // v[(mt·2 + kh)·SPW + s]: this lane's probabilities of key 16mt + g + 8kh summed over its rows
        // of strip s (two n8 tiles, two rows each).
        float v[M];
#pragma unroll
        for (int mt = 0; mt < kTile / 16; ++mt) {
          float acc[NT][4];
          score_detail::slab_logits<T, KS, LDK, NT>(qb, tile + mt * 16 * LDK, lane, acc);
#pragma unroll
          for (int kh = 0; kh < 2; ++kh)
#pragma unroll
            for (int s = 0; s < SPW; ++s) {
              float sum = 0.0f;
#pragma unroll
              for (int q = 0; q < 2; ++q)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                  sum += fast_exp2(fmaf(acc[2 * s + q][2 * kh + e], s2, -cr[2 * s + q][e]));
              v[(mt * 2 + kh) * SPW + s] = sum;
            }
        }
        // Sum over the four lanes of a group (t = lane & 3) as a reduce-scatter: bit 0 of t keeps
        // slabs 2, 3 (else 0, 1), bit 1 keeps the odd slab; each lane ends with 2·SPW sums.
        const int tb0 = t4 & 1, tb1 = (t4 >> 1) & 1;
#pragma unroll
        for (int i = 0; i < M / 2; ++i) {
          const float send = tb0 ? v[i] : v[i + M / 2], keep = tb0 ? v[i + M / 2] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
        }
#pragma unroll
        for (int i = 0; i < M / 4; ++i) {
          const float send = tb1 ? v[i] : v[i + M / 4], keep = tb1 ? v[i + M / 4] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
        }
        float* col = stripcol + (it & 1) * kMaxStrips * kTile;
        const int mt = 2 * tb0 + tb1;
#pragma unroll
        for (int i = 0; i < M / 4; ++i) {
          const int kh = i / SPW, s = i % SPW, strip = warp * SPW + s;
          if (strip < p.strips) col[strip * kTile + mt * 16 + g8 + 8 * kh] = v[i];
        }
      }
    }
    __syncthreads();
    store_raw_importance(p, stripcol + ((ntiles - 1) & 1) * kMaxStrips * kTile, strips_per_head,
                         (t_begin + ntiles - 1) * kTile, s0, col0, tid - raw_first, raw_step);
  } else {
    score_detail::grid_dep_wait();
  }
  score_detail::grid_dep_launch();
  pass2_finish(p);
}

// This thread's cp.async copies of key rows j0..j0+63 into a blocked tile of COLS columns (its first 128
// columns; zero outside [lo, hi) and past D), the tile's 1024 16-byte pieces shared by COUNT threads (a
// power of two, 128 to 1024): piece x = index + COUNT · v is row 8 · (x / 128) + x % 8, column piece
// (x / 8) % 16, so that eight consecutive threads fill one 128-byte core matrix (no bank conflicts) and a
// thread's pieces sit at fixed offsets. kHint: the copies carry the L2 policy `pol` (score_detail::l2_policy).
template <typename T, int COUNT, int COLS, bool kHint>
__device__ __forceinline__ void issue_tile_share(const T* base, int64_t row_stride, int j0, int lo, int hi, int D,
                                                 T* dst, uint64_t pol, int index) {
  constexpr int kRowStep = 8 * (COUNT / 128), kPer = 1024 / COUNT;
  const int rl = index & 7, cq = (index >> 3) & 15, c = cq * 8, row = 8 * (index >> 7) + rl;
  const bool inside = j0 >= lo && j0 + kTile <= hi, col_ok = c < D;
  const T* src = base + int64_t(j0 + row) * row_stride + c;
  T* out = dst + (index >> 7) * COLS * 8 + cq * 64 + rl * 8;
#pragma unroll
  for (int v = 0; v < kPer; ++v) {
    const int j = j0 + row + kRowStep * v;
    const bool ok = col_ok && (inside || (j >= lo && j < hi));
    T* o = out + v * (COUNT / 128) * COLS * 8;
    const T* from = ok ? src + int64_t(kRowStep * v) * row_stride : base;
    if constexpr (kHint)
      score_detail::cp_async16_hint(o, from, ok, pol);
    else
      score_detail::cp_async16(o, from, ok);
  }
}

// ---- pass 1 on warpgroup MMA (sm_90a, head dimension up to 128, bfloat16) ------------------------
// The default pass 1 where it applies (use_wgmma_pass1). One block per (chunk, b·h), about one chunk
// per SM, NW warpgroups. Warpgroup wg holds packed query rows 64wg .. 64wg + 63 in registers (the A
// operand, loaded once) and computes per tile the logits (its 64 rows × 64 keys) with one m64n64k16
// wgmma chain; while it runs, the tile's four 16-key slabs get their unit-key sums from the four warps
// of warpgroup it % NW (slab_unit_sums_at, mma.sync from the slot, added to the warp's row of shared
// memory; a warpgroup's warps meet at every wgmma, so they take equal shares). The row statistics are
// the mma.sync pass's: a reference per row that moves only when a tile's terms of the row add up to more
// than 2^32, and the sum of 2^(x·s2 − reference).
// The chunk's 64-key tiles stream into a ring of kW1Stages slots: at tile it the tiles up to
// it + kW1Stages − kW1Lag are requested into the slots that tiles up to it − kW1Lag have left (their
// "empty" barriers have long completed by then: warpgroups drift by less than kW1Lag tiles), so no warp
// is set aside for copies and all warps keep the registers of a 16-warp block (17 warps would cap them
// at 96). With kTma (the default where the driver encodes the key tensor map) thread 0 requests each
// tile as two tensor-map copies of 64 columns in the 128-byte swizzled layout (tma_tile, zero past D and
// N); the chunk's first tile, when it starts before the sequence, gets its leading rows zeroed in shared
// memory (the unit-key sums must not see them; their logits are masked) behind one block barrier.
// Otherwise every thread copies its pieces by cp.async into the blocked layout of wgmma.cuh (zero
// outside the valid keys and past D).
// Accumulator layout (m64nN): thread (warp wq of the warpgroup, lane 4g + t) holds rows 16wq + g (d[4j],
// d[4j + 1]) and 16wq + g + 8 (d[4j + 2], d[4j + 3]) at keys 8j + 2t, 8j + 2t + 1.
constexpr int kW1Stages = 8;
constexpr int kW1Lag = 2;
constexpr int kW1Cols = 128;

template <typename T>
constexpr int64_t wgmma1_smem_bytes(int nw) {
  return 1024 + int64_t(kW1Stages) * kTile * kW1Cols * int64_t(sizeof(T)) + int64_t(nw) * 4 * kW1Cols * 4 +
         2 * kW1Stages * 8;
}

// Tensor-map copies of key (or value) rows j0 .. j0 + 63 of (b, h) into a 1024-byte aligned tile of two
// halves [2][64 rows][64 columns] in the 128-byte swizzled layout (zero past D and N), completing on
// `bar`; the coordinate slots of b, h and the row come from the launcher (Params::tma_*).
template <typename T>
__device__ __forceinline__ void tma_tile(const Params<T>& p, const CUtensorMap* map, T* dst, int j0, int b, int h,
                                         uint64_t* bar) {
  const int c1 = p.tma_n == 1 ? j0 : (p.tma_h == 1 ? h : b), c2 = p.tma_n == 2 ? j0 : (p.tma_h == 2 ? h : b),
            c3 = p.tma_n == 3 ? j0 : (p.tma_h == 3 ? h : b);
  tma_detail::load_4d(dst, map, 0, c1, c2, c3, bar);
  tma_detail::load_4d(dst + kTile * 64, map, 64, c1, c2, c3, bar);
}

// Element (r, c) of such a tile.
[[maybe_unused]] __device__ __forceinline__ int sw128_tile_offset(int r, int c) {
  return (c >> 6) * kTile * 64 + wgmma_detail::sw128_offset(r, c & 63);
}

// Unit-key sums of a tensor-map key tile (tma_tile's layout) on the CUDA cores, spread evenly over the
// block's NC threads: thread tid adds dims 8 · (tid % 16) .. + 7 of keys tid / 16 + q · NC / 16 of the tile,
// each divided by its norm (the 16 lanes of a key add up its squared norm by shuffles), into us. Zero keys
// (zero-filled rows) add nothing. With kKn, the squared norm of each key j0 + i of the prefix columns
// [s0, P) goes to knorm (the row's column 0; pass2_finish takes the roots). (Storing them after the tile's
// statistics instead was slower: pass 1 34.0 against 32.7 us at 32k.)
template <typename T, int NC, bool kKn = false>
__device__ __forceinline__ void tile_unit_sums(const T* tile, int tid, float (&us)[8], float* knorm = nullptr,
                                               int j0 = 0, int s0 = 0, int P = 0) {
  constexpr int kKeys = NC / 16;  // keys per round (the last round of 3 warpgroups is partial)
  const int dg = tid & 15, kr = tid >> 4;
#pragma unroll
  for (int q = 0; q < (kTile + kKeys - 1) / kKeys; ++q) {
    float x[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (kTile % kKeys == 0 || kr + q * kKeys < kTile)
      cuda_detail::load_smem_part<T, 8>(tile + sw128_tile_offset(kr + q * kKeys, 8 * dg), x);
    float n0 = x[0] * x[0], n1 = x[1] * x[1];
#pragma unroll
    for (int i = 2; i < 8; i += 2) n0 = fmaf(x[i], x[i], n0), n1 = fmaf(x[i + 1], x[i + 1], n1);
    float sq = n0 + n1;
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    const float inv = rsqrtf(fmaxf(sq, 1e-24f));
#pragma unroll
    for (int i = 0; i < 8; ++i) us[i] = fmaf(x[i], inv, us[i]);
    if constexpr (kKn) {
      const int j = j0 + kr + q * kKeys;
      if (dg == 0 && (kTile % kKeys == 0 || kr + q * kKeys < kTile) && j >= s0 && j < P) knorm[j] = sq;
    }
  }
}

// Shared memory of a kernel whose ring needs 1024-byte alignment (the 128-byte swizzle): the dynamic
// allocation holds 1024 bytes of slack.
[[maybe_unused]] __device__ __forceinline__ unsigned char* align1024(unsigned char* base) {
  return base + ((1024u - (score_detail::smem_u32(base) & 1023u)) & 1023u);
}

// The block's packed query rows 0 .. NW · 64 − 1 (zero outside the window, past Rp and past D) copied by
// all NC threads with 16-byte loads into `stage` ([rows][C], the 16-byte pieces of row r exchanged by
// r % 8, so that ldmatrix of eight rows meets no bank conflict).
template <typename T, int C, int NC>
__device__ __forceinline__ void stage_q_rows(const Params<T>& p, int b, int h, T* stage, int tid) {
  constexpr int kPieces = C / 8, kPer = NC / 2 * kPieces / NC;  // NC / 2 = NW · 64 rows; pieces per thread
  uint4 v[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {  // every load in flight before the first store
    const int idx = tid + u * NC, r = idx / kPieces, c = 8 * (idx % kPieces), g = r / p.Wp, i = r - g * p.Wp;
    v[u] = make_uint4(0u, 0u, 0u, 0u);
    if (r < p.Rp && i < p.W && c < p.D) {  // D % 8 == 0: a piece lies inside or outside
      const T* src = p.q + b * p.qs0 + int64_t(h * p.G + g) * p.qs1 + int64_t(i) * p.qs2 + c;
      if (p.q_vec) {
        v[u] = *reinterpret_cast<const uint4*>(src);
      } else {
        T e[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) e[x] = src[x];
        v[u] = *reinterpret_cast<const uint4*>(e);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int idx = tid + u * NC, r = idx / kPieces, pc = idx % kPieces;
    *reinterpret_cast<uint4*>(stage + r * C + 8 * (pc ^ (r & 7))) = v[u];
  }
}

// Warp `warp`'s 16 query rows from stage_q_rows' copy as wgmma A fragments: rows r0 = 16 · warp + g and
// r0 + 8, k-step ks: qa[ks] = {(r0, 16ks + 2t..), (r0 + 8, 16ks + 2t..), (r0, 16ks + 2t + 8..), (r0 + 8,
// 16ks + 2t + 8..)} (one ldmatrix.x4 per k-step: lanes 0-15 address rows 0-15 at column 16ks, lanes 16-31
// at 16ks + 8).
template <typename T, int C>
__device__ __forceinline__ void q_afrags_from_stage(const T* stage, int warp, int lane, uint32_t (&qa)[C / 16][4]) {
  const int row = 16 * warp + (lane & 15);
  const T* at = stage + row * C;
#pragma unroll
  for (int ks = 0; ks < C / 16; ++ks)
    score_detail::ldmatrix_x4(qa[ks], at + 8 * ((2 * ks + (lane >> 4)) ^ (row & 7)));
}

// The query A fragments of a warpgroup pass, staged through ring slots 2-5 (64 KB, untouched until the
// loop's first refill); returns once every thread has its fragments, so the slots may be refilled.
template <typename T, int C, int NC>
__device__ __forceinline__ void load_q_staged(const Params<T>& p, int b, int h, T* ring, int tid,
                                              uint32_t (&qa)[C / 16][4]) {
  static_assert(NC / 2 * C <= 4 * kTile * C, "the staged rows must fit ring slots 2-5");
  T* stage = ring + 2 * kTile * C;
  stage_q_rows<T, C, NC>(p, b, h, stage, tid);
  __syncthreads();
  q_afrags_from_stage<T, C>(stage, tid >> 5, tid & 31, qa);
  wgmma_detail::fence_proxy_async();  // these generic reads before the slots' asynchronous refills
  __syncthreads();
}

// Start-address offset (16-byte units) of k-step ks inside a key tile: two core matrices per step in
// the blocked layout; with kTma (two swizzled halves of 64 columns) half ks / 4, 32 bytes per step in it.
template <typename T, bool kTma>
__device__ __forceinline__ uint32_t kstep_offset(int ks) {
  return kTma ? uint32_t((ks >> 2) * (kTile * 128 / 16) + (ks & 3) * 2) : uint32_t(ks) * (2 * 64 * sizeof(T) / 16);
}

// The logits of the warpgroup's 64 query rows (A fragments qa) against the 64-key tile of ring slot st
// (B descriptor klo / khi of slot 0): one asynchronous m64n64k16 chain into acc, committed.
template <typename T, int C, bool kTma>
__device__ __forceinline__ void tile_logits(float (&acc)[32], const uint32_t (&qa)[C / 16][4], uint32_t klo,
                                            uint32_t khi, int st) {
  wgmma_detail::fence();
  const uint32_t slo = klo + st * (kTile * C * sizeof(T) / 16);
#pragma unroll
  for (int ks = 0; ks < C / 16; ++ks)
    wgmma_detail::WgmmaRA<64, T>::run(acc, qa[ks], (uint64_t(khi) << 32) | (slo + kstep_offset<T, kTma>(ks)),
                                      ks > 0 ? 1 : 0);
  wgmma_detail::commit();
}

// After tile it's wgmma: requests of the next tiles, up to tile it + S − L (at most two per tile), each
// into the slot that tile x − S (<= it − L) has left; `issued` counts the tiles requested so far.
// (Issued after the wgmma, not before: its fence would wait for this thread's copies.) With kTma only
// thread 0 requests, so only it waits for the slot.
template <int S, int L, bool kTma, typename Fill>
__device__ __forceinline__ void refill_ring(int it, int ntiles, int& issued, uint64_t* empty, int tid, Fill fill) {
  for (int k = 0; k < 2 && issued <= it + S - L && issued < ntiles; ++k, ++issued) {
    if (issued >= S && (!kTma || tid == 0)) ring_detail::mbar_wait(empty + issued % S, ((issued - S) / S) & 1);
    fill(issued);
  }
}

// kKn (with kTma): key norms out (Params::kn_pass1). kUnits: the unit-key sums (the mean key m and the
// online r; read only where Params::need_d), which methods without the diversity signal skip.
template <typename T, int NW, bool kTma, bool kKn = false, bool kUnits = true>
__global__ void __launch_bounds__(NW * 128, 1) pass1_wgmma_kernel(Params<T> p, const __grid_constant__ CUtensorMap kmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int S = kW1Stages, L = kW1Lag, C = kW1Cols, NC = NW * 128;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = align1024(smem_raw);
  T* kring = reinterpret_cast<T*>(smem);                      // [S][64 × C] blocked, or (kTma) swizzled halves
  float* usum = reinterpret_cast<float*>(kring + S * kTile * C);  // [NW · 4][C]
  uint64_t* full = reinterpret_cast<uint64_t*>(usum + NW * 4 * C);
  uint64_t* empty = full + S;
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int t_begin = max(chunk * p.tpb, s0 / kTile), t_end = min(p.tiles, (chunk + 1) * p.tpb);
  const int ntiles = t_end - t_begin;  // <= 0: padding only; the combine skips this chunk
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  cuda_detail::Stamps stamp;
  stamp.at(0);
  if (ntiles > 0) {
    if (tid == 0)
      for (int st = 0; st < S; ++st) {
        ring_detail::mbar_init(full + st, kTma ? 1 : NC);
        ring_detail::mbar_init(empty + st, NC);
      }
    __syncthreads();
    stamp.at(1);
    const T* kbase = p.k + b * p.ks0 + h * p.ks1;
    auto fill = [&](int x) {  // this thread's pieces of tile x into slot x % S
      if constexpr (kTma) {  // thread 0 alone
        if (tid == 0) {
          tma_detail::mbar_expect_tx(full + x % S, kTile * C * sizeof(T));
          tma_tile(p, &kmap, kring + (x % S) * kTile * C, (t_begin + x) * kTile, b, h, full + x % S);
        }
        return;
      }
      issue_tile_share<T, NC, C, false>(kbase, p.ks2, (t_begin + x) * kTile, s0, p.N, p.D, kring + (x % S) * kTile * C,
                                         0, tid);
      ring_detail::cp_async_arrive(full + x % S);
    };
    // Two tiles now; the loop issues up to two more per tile until kW1Stages − kW1Lag are in flight (a
    // deep initial fill would hold the warps in their copies while tile 0 could already run).
    int issued = min(2, ntiles);
    for (int x = 0; x < issued; ++x) fill(x);
    {
      const int wg = warp >> 2, wq = warp & 3, g8 = lane >> 2, t4 = lane & 3;
      const int r0 = wg * 64 + wq * 16 + g8;  // this thread's rows r0 and r0 + 8 (= 16 · warp + g8 (+ 8))
      uint32_t qa[C / 16][4];
      load_q_staged<T, C, NC>(p, b, h, kring, tid, qa);
      stamp.at(2);
      // this warp's unit-key sums: with kTma in registers (tile_unit_sums: dims 8 · (lane % 16) ..), else
      // in its row of usum (lanes t4 == 0 own dims 16ds + g8, + 8)
      float* mine = usum + warp * C;
      float tus[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      if constexpr (!kTma) {
        for (int d = lane; d < C; d += 32) mine[d] = 0.0f;
        __syncwarp();  // zeroed before the lanes t4 == 0 add into them
      }
      const float s2 = p.scale2;
      constexpr float kBig = 4294967296.0f;
      const int last[2] = {p.P + r0 % p.Wp, p.P + (r0 + 8) % p.Wp};  // row i sees keys <= P + i
      float ms[2] = {-FLT_MAX, -FLT_MAX}, rs[2] = {0.0f, 0.0f};
      // this lane's ldmatrix addresses inside a 16-key slab: norms (row ((lane >> 3) & 1) · 8 + (lane & 7),
      // piece lane >> 4) and transposed loads (row ((lane >> 4) & 1) · 8 + (lane & 7), piece (lane >> 3) & 1)
      const int noff = wgmma_detail::blocked_offset(((lane >> 3) & 1) * 8 + (lane & 7), 8 * (lane >> 4), C);
      const int toff = wgmma_detail::blocked_offset(((lane >> 4) & 1) * 8 + (lane & 7), 8 * ((lane >> 3) & 1), C);
      // B descriptor of slot 0 (tile_logits adds the slot and k-step offsets to its address field; shared
      // addresses stay below 2^18: no carry out of it)
      const uint64_t kdesc = kTma ? wgmma_detail::sw128_desc(kring) : wgmma_detail::blocked_desc(kring, C);
      const uint32_t klo = static_cast<uint32_t>(kdesc), khi = static_cast<uint32_t>(kdesc >> 32);
      float acc[32];
      for (int it = 0; it < ntiles; ++it) {
        const int st = it % S, j0 = (t_begin + it) * kTile;
        ring_detail::mbar_wait(full + st, (it / S) & 1);
        if (it == 0) stamp.at(3);
        if constexpr (kTma) {
          if (j0 < s0) {  // (the chunk's first tile, block-uniform) keys before the sequence start read as zero
            T* tile = kring + st * kTile * C;
            const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
            for (int q = tid; q < (s0 - j0) * (C / 8); q += NC)
              *reinterpret_cast<uint4*>(tile + sw128_tile_offset(q / (C / 8), 8 * (q % (C / 8)))) = zero;
            wgmma_detail::fence_proxy_async();
            __syncthreads();
          }
        } else {
          wgmma_detail::fence_proxy_async();  // the copies landed through the generic proxy
        }
        tile_logits<T, C, kTma>(acc, qa, klo, khi, st);
        refill_ring<S, L, kTma>(it, ntiles, issued, empty, tid, fill);  // while the wgmma runs
        const T* ktile = kring + st * kTile * C;
        // Unit-key sums while the wgmma runs: with kTma by every thread on the CUDA cores; else the tile's
        // four 16-key slabs go to the four warps of warpgroup it % NW (tensor cores, blocked layout).
        if constexpr (!kUnits) {
          static_assert(!kKn, "the key norms come out of the unit-key sums");
        } else if constexpr (kTma) {
          tile_unit_sums<T, NC, kKn>(ktile, tid, tus, p.knorm + int64_t(bh) * p.P, j0, s0, p.P);
        } else if (it % NW == wg) {
          const T* slab = ktile + wq * 16 * C;  // 16 rows = two row groups of C · 8 elements
          float us[C / 16][4];
#pragma unroll
          for (int ds = 0; ds < C / 16; ++ds) us[ds][0] = us[ds][1] = us[ds][2] = us[ds][3] = 0.0f;
          score_detail::slab_unit_sums_at<T, C / 16>(slab + noff, slab + toff, 128, lane, us);
#pragma unroll
          for (int ds = 0; ds < C / 16; ++ds) {
            const float2 sum = score_detail::unit_sum_pair(us[ds]);
            if (t4 == 0) mine[16 * ds + g8] += sum.x, mine[16 * ds + g8 + 8] += sum.y;
          }
        }
        wgmma_detail::wait<0>();
        wgmma_detail::fence_regs(acc);
        ring_detail::mbar_arrive(empty + st);  // every thread: its reads of the slot are done
        if (j0 < s0 || j0 + kTile - 1 > p.P) {
#pragma unroll
          for (int jj = 0; jj < 8; ++jj)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = j0 + 8 * jj + 2 * t4 + e;
              if (j < s0 || j > last[0]) acc[4 * jj + e] = -INFINITY;
              if (j < s0 || j > last[1]) acc[4 * jj + 2 + e] = -INFINITY;
            }
        }
        // The tile's 16 terms of each row against its reference; a sum above kBig (or +inf: the
        // reference is still -FLT_MAX, or a logit jumped) moves that row's reference to the tile's
        // largest logit first.
        float add[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            a0 += fast_exp2(fmaf(acc[4 * jj + 2 * e], s2, -ms[e]));
            a1 += fast_exp2(fmaf(acc[4 * jj + 2 * e + 1], s2, -ms[e]));
          }
          add[e] = a0 + a1;
        }
        if (add[0] > kBig || add[1] > kBig) {
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (add[e] > kBig) {
              float tm = -INFINITY;
#pragma unroll
              for (int jj = 0; jj < 8; ++jj) tm = fmaxf(tm, fmaxf(acc[4 * jj + 2 * e], acc[4 * jj + 2 * e + 1]));
              tm *= s2;
              rs[e] *= fast_exp2(ms[e] - tm);  // 0 while the old reference is -FLT_MAX
              ms[e] = tm;
              float a = 0.0f;
#pragma unroll
              for (int jj = 0; jj < 8; ++jj)
                a += fast_exp2(fmaf(acc[4 * jj + 2 * e], s2, -tm)) + fast_exp2(fmaf(acc[4 * jj + 2 * e + 1], s2, -tm));
              add[e] = a;
            }
        }
        rs[0] += add[0];
        rs[1] += add[1];
      }
      stamp.at(4);
      score_detail::grid_dep_launch();
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float2 stat = make_float2(rs[e] > 0.0f ? ms[e] : -INFINITY, rs[e]);
        for (int o = 1; o < 4; o <<= 1) {
          const float2 other =
              make_float2(__shfl_xor_sync(0xffffffffu, stat.x, o), __shfl_xor_sync(0xffffffffu, stat.y, o));
          stat = merge_stat(stat, other);
        }
        const int r = r0 + 8 * e;
        if (t4 == 0 && r < p.Rp && r % p.Wp < p.W) p.stats[(int64_t(bh) * p.chunks1 + chunk) * p.Rp + r] = stat;
      }
      if constexpr (kTma && kUnits) {  // lanes l and l + 16 hold the same dims
#pragma unroll
        for (int i = 0; i < 8; ++i) tus[i] += __shfl_xor_sync(0xffffffffu, tus[i], 16);
        if (lane < 16) {
          *reinterpret_cast<float4*>(mine + 8 * lane) = make_float4(tus[0], tus[1], tus[2], tus[3]);
          *reinterpret_cast<float4*>(mine + 8 * lane + 4) = make_float4(tus[4], tus[5], tus[6], tus[7]);
        }
      }
    }
    if constexpr (kUnits) {
      __syncthreads();
      for (int d = tid; d < p.Dp; d += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < NW * 4; ++w) s += usum[w * C + d];  // zero past D: the copies zero-fill
        p.msum[(int64_t(bh) * p.chunks1 + chunk) * p.Dp + d] = s;
      }
    }
  }
  stamp.at(5);
  pass1_finish(p);
  stamp.at(6);
  stamp.print("P1", ntiles);
#else
  __trap();  // launched only from an sm_90a build (the launcher checks MIXKV_SM90A)
#endif
}

// ---- pass 2 on warpgroup MMA (sm_90a, head dimension 65-128, 16-bit inputs) ---------------------
// Where it applies (use_wgmma_pass2). The logits in the attention orientation of pass1_wgmma_kernel: one
// block per (chunk, b·h), about one chunk per SM, NW warpgroups, warpgroup wg holding packed query rows
// 64wg .. 64wg + 63 as the A operand in registers; per 64-key tile one m64n64k16 wgmma chain against the
// key tile in shared memory. Each accumulator becomes a probability 2^(x·s2 − c_r) (c_r = max + log2(sum)
// of row r from pass 1, +inf for rows outside the window), and each warp sums its 16 rows per key (its
// own two rows, then a reduce-scatter over the eight row groups: every lane ends with two keys) into its
// strip of a column buffer; warpgroup column_storer(x) folds tile x's strips into the raw importance
// (store_raw_importance) one tile later, while its wgmma runs. While a tile's wgmma runs, the four warps
// of warpgroup it % NW take its four key slabs (norm and k̂·m, mma.sync from the slot) and those of
// warpgroup (it + 1) % NW its four value slabs (norm).
// Key and value tiles stream through one ring of kW2Stages slots: with kTma, thread 0 copies both by
// tensor map (tma_tile: 128-byte swizzled halves, the keys' descriptors sw128_desc; every column is
// scored on its own, so keys outside the valid range need no zeroing: their columns are not stored);
// otherwise every thread copies its pieces (blocked layout), as in pass 1. A slot is refilled kW1Lag tiles
// after every thread has left it.
// Column buffers: kW2Bufs slots of [NW·4 strips][64] floats with barriers cfull (every thread arrives
// once its strip is written) and cempty (the storer warpgroup's threads arrive once they have read it);
// every thread waits for cempty before it writes or arrives on cfull again, so phases never mix.
constexpr int kW2Stages = 6;
constexpr int kW2Bufs = 3;

template <typename T>
constexpr int64_t wgmma2_smem_bytes(int nw) {
  return 1024 + 2 * int64_t(kW2Stages) * kTile * kW1Cols * int64_t(sizeof(T)) + 2 * kW1Cols * int64_t(sizeof(T)) +
         int64_t(kW2Bufs) * nw * 4 * kTile * 4 + 2 * (kW2Stages + kW2Bufs) * 8;
}

// The warpgroup that folds tile x's column sums (at tile x + 1): (x + 3) % NW, which at tile x + 1 takes
// neither key nor value slabs when NW = 4.
template <int NW>
__device__ __forceinline__ int column_storer(int x) {
  return (x + 3) % NW;
}

template <typename T, int NW, bool kTma>
__global__ void __launch_bounds__(NW * 128, 1)
    pass2_wgmma_kernel(Params<T> p, const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap vmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int S = kW2Stages, L = kW1Lag, C = kW1Cols, NC = NW * 128, NWARP = NW * 4, CB = kW2Bufs;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = align1024(smem_raw);
  T* kring = reinterpret_cast<T*>(smem);       // [S][64 × C] blocked, or (kTma) [S][2][64][64] swizzled
  T* vring = kring + S * kTile * C;            // [S][64 × C] blocked
  T* mfrag = vring + S * kTile * C;            // [2][C]: m·2^10 high, low parts
  float* colbuf = reinterpret_cast<float*>(mfrag + 2 * C);  // [CB][NWARP][64]
  uint64_t* full = reinterpret_cast<uint64_t*>(colbuf + CB * NWARP * kTile);
  uint64_t* empty = full + S;
  uint64_t* cfull = empty + S;
  uint64_t* cempty = cfull + CB;
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int ptiles = (p.P + kTile - 1) / kTile;
  const int t_begin = max(chunk * p.tpb, s0 / kTile), t_end = min(ptiles, (chunk + 1) * p.tpb);
  const int ntiles = t_end - t_begin;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  cuda_detail::Stamps stamp;
  stamp.at(0);
  if (ntiles > 0) {
    if (tid == 0) {
      for (int st = 0; st < S; ++st) {
        ring_detail::mbar_init(full + st, kTma ? 1 : NC);
        ring_detail::mbar_init(empty + st, NC);
      }
      for (int cb = 0; cb < CB; ++cb) {
        ring_detail::mbar_init(cfull + cb, NC);
        ring_detail::mbar_init(cempty + cb, 128);
      }
    }
    __syncthreads();
    stamp.at(1);
    const T* kbase = p.k + b * p.ks0 + h * p.ks1;
    const T* vbase = p.v + b * p.vs0 + h * p.vs1;
    const bool need_v = p.need_v, khint = p.l2 >= 2, vhint = p.l2 >= 1;
    const uint64_t pol = score_detail::l2_policy(1);
    auto fill = [&](int x) {  // this thread's pieces of tile x (keys, and values if needed) into slot x % S
      const int j0 = (t_begin + x) * kTile, st = x % S;
      T* kdst = kring + st * kTile * C;
      if constexpr (kTma) {  // thread 0 alone: two boxes of 64 columns per tensor
        if (tid != 0) return;
        uint64_t* bar = full + st;
        tma_detail::mbar_expect_tx(bar, (need_v ? 2 : 1) * kTile * C * sizeof(T));
        tma_tile(p, &kmap, kdst, j0, b, h, bar);
        if (need_v) tma_tile(p, &vmap, vring + st * kTile * C, j0, b, h, bar);
        return;
      }
      if (khint)
        issue_tile_share<T, NC, C, true>(kbase, p.ks2, j0, s0, p.P, p.D, kdst, pol, tid);
      else
        issue_tile_share<T, NC, C, false>(kbase, p.ks2, j0, s0, p.P, p.D, kdst, pol, tid);
      if (need_v) {
        T* vdst = vring + st * kTile * C;
        if (vhint)
          issue_tile_share<T, NC, C, true>(vbase, p.vs2, j0, s0, p.P, p.D, vdst, pol, tid);
        else
          issue_tile_share<T, NC, C, false>(vbase, p.vs2, j0, s0, p.P, p.D, vdst, pol, tid);
      }
      ring_detail::cp_async_arrive(full + st);
    };
    int issued = min(2, ntiles);
    for (int x = 0; x < issued; ++x) fill(x);
    const int wg = warp >> 2, wq = warp & 3, g8 = lane >> 2, t4 = lane & 3;
    const int r0 = wg * 64 + wq * 16 + g8;  // this thread's rows r0 and r0 + 8 (= 16 · warp + g8 (+ 8))
    uint32_t qa[C / 16][4];
    load_q_staged<T, C, NC>(p, b, h, kring, tid, qa);
    stamp.at(2);
    score_detail::grid_dep_wait();  // pass 1's row statistics and mean key
    stamp.at(3);
    for (int d = tid; d < C; d += blockDim.x) {
      const float m = d < p.Dp ? p.mvec[int64_t(bh) * p.Dp + d] * kMScale : 0.0f;
      const T hi = from_float<T>(m);
      mfrag[d] = hi;
      mfrag[C + d] = from_float<T>(m - to_float(hi));
    }
    // p = 2^(x·s2 − c) with c = max + log2(sum); +inf (p = 0) for rows past W or that see nothing
    float cr[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = r0 + 8 * e;
      cr[e] = INFINITY;
      if (r < p.Rp && r % p.Wp < p.W) {
        const float2 st = p.rowstat[int64_t(bh) * p.Rp + r];
        if (st.x != -INFINITY && st.y > 0.0f) cr[e] = st.x + log2f(st.y);
      }
    }
    // With km_rows the first warp past the packed rows (all its rows spare) multiplies the keys by the
    // mean key instead of query rows: rows 0 and 8 of its strip hold the high and middle bfloat16 parts
    // of m·2^10, row 1 the low part (about 24 significant bits in all), so lanes g8 = 0 end with
    // hi + mid and lanes g8 = 1 with the low part of every key's k·m.
    const bool km_warp = p.km_rows && warp == p.strips;
    if (km_warp) {
      const float* mv = p.mvec + int64_t(bh) * p.Dp;
#pragma unroll
      for (int ks = 0; ks < C / 16; ++ks)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int c = 16 * ks + 8 * hf + 2 * t4;
          T part[3][2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = c + e < p.Dp ? mv[c + e] * kMScale : 0.0f;
            part[0][e] = from_float<T>(x);
            const float r1 = x - to_float(part[0][e]);
            part[1][e] = from_float<T>(r1);
            part[2][e] = from_float<T>(r1 - to_float(part[1][e]));
          }
          const uint32_t hi = score_detail::pack_pair(part[0][0], part[0][1]);
          const uint32_t mid = score_detail::pack_pair(part[1][0], part[1][1]);
          const uint32_t lo = score_detail::pack_pair(part[2][0], part[2][1]);
          qa[ks][2 * hf] = g8 == 0 ? hi : (g8 == 1 ? lo : 0u);
          qa[ks][2 * hf + 1] = g8 == 0 ? mid : 0u;
        }
    }
    __syncthreads();  // mfrag written
    const float s2 = p.scale2;
    const bool rows = warp < p.strips;  // the warp holds packed rows (else its probabilities are all 0)
    const int strips_per_head = p.Wp / 16;
    const int64_t col0 = int64_t(bh) * p.P;
    // slab tasks: 0 keys (norms and k̂·m, when the method uses either), 4 values (norms, when it uses them)
    const int task_first = (p.need_kn || p.need_d) && !p.kn_pass1 ? 0 : 4, task_end = need_v ? 8 : 4;
    // this lane's ldmatrix row address inside a 16-key slab (row ((lane >> 3) & 1) · 8 + (lane & 7), piece
    // lane >> 4)
    const int noff = wgmma_detail::blocked_offset(((lane >> 3) & 1) * 8 + (lane & 7), 8 * (lane >> 4), C);
    const uint64_t kdesc = kTma ? wgmma_detail::sw128_desc(kring) : wgmma_detail::blocked_desc(kring, C);
    const uint32_t klo = static_cast<uint32_t>(kdesc), khi = static_cast<uint32_t>(kdesc >> 32);
    // the slab task's ldmatrix address at k-step ks, rows 16mt.. of a slot
    const int lrow = ((lane >> 3) & 1) * 8 + (lane & 7);
    auto slab_at = [&](const T* slot, int mt) {
      return [=](int ks) {
        if constexpr (kTma) {
          return slot + sw128_tile_offset(16 * mt + lrow, 16 * ks + 8 * (lane >> 4));
        } else {
          return slot + mt * 16 * C + noff + ks * 128;
        }
      };
    };
    auto store_columns = [&](int x) {  // the storer warpgroup: tile x's strips into raw_a
      const int cb = x % CB;
      ring_detail::mbar_wait(cfull + cb, (x / CB) & 1);
      store_raw_importance(p, colbuf + cb * NWARP * kTile, strips_per_head, (t_begin + x) * kTile, s0, col0, tid & 127,
                           128);
      ring_detail::mbar_arrive(cempty + cb);
    };
    float acc[32];
    // warpgroups of the tile's key slabs (it % NW) and value slabs ((it + 1) % NW)
    int key_wg = 0, val_wg = 1 % NW;
    for (int it = 0; it < ntiles; ++it, key_wg = val_wg, val_wg = val_wg + 1 == NW ? 0 : val_wg + 1) {
      const int st = it % S, j0 = (t_begin + it) * kTile;
      ring_detail::mbar_wait(full + st, (it / S) & 1);
      if (it == 0) stamp.at(4);
      if constexpr (!kTma) wgmma_detail::fence_proxy_async();  // the copies landed through the generic proxy
      tile_logits<T, C, kTma>(acc, qa, klo, khi, st);
      refill_ring<S, L, kTma>(it, ntiles, issued, empty, tid, fill);
      // While the wgmma runs: this warp's slab tasks of the tile (key slabs to warpgroup it % NW, value
      // slabs to warpgroup (it + 1) % NW; only those the method needs) and, for the storer, the previous
      // tile's columns.
      for (int task = task_first; task < task_end; task += 4) {
        if (wg != (task == 0 ? key_wg : val_wg)) continue;
        const int mt = wq;
        const bool keys = task == 0;
        float n0, n1, d0 = 0.0f, d1 = 0.0f;
        if (keys)
          score_detail::slab_norms_by<T, C / 16, true>(slab_at(kring + st * kTile * C, mt), mfrag, lane, n0, n1, d0, d1);
        else
          score_detail::slab_norms_by<T, C / 16, false>(slab_at(vring + st * kTile * C, mt), mfrag, lane, n0, n1, d0,
                                                        d1);
        store_slab_norms(p, keys, n0, n1, d0, d1, j0 + mt * 16, s0, col0, lane);
      }
      if (it > 0 && wg == column_storer<NW>(it - 1)) store_columns(it - 1);
      wgmma_detail::wait<0>();
      wgmma_detail::fence_regs(acc);
      ring_detail::mbar_arrive(empty + st);  // every thread: its reads of the slot are done
      const int cb = it % CB;
      if (it >= CB) ring_detail::mbar_wait(cempty + cb, ((it / CB) - 1) & 1);
      if (rows) {
        // v[2jj + e]: key 8jj + 2t4 + e summed over this thread's two rows
        float v[16];
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            v[2 * jj + e] = fast_exp2(fmaf(acc[4 * jj + e], s2, -cr[0])) +
                            fast_exp2(fmaf(acc[4 * jj + 2 + e], s2, -cr[1]));
        // Reduce-scatter over the eight row groups (lane bits 4, 3, 2): each step keeps the half of v
        // selected by the lane's bit and adds the partner's; lane (g8, t4) ends with v[2g8], v[2g8 + 1].
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const bool hi = g8 & 4;
          const float send = hi ? v[i] : v[i + 8], keep = hi ? v[i + 8] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool hi = g8 & 2;
          const float send = hi ? v[i] : v[i + 4], keep = hi ? v[i + 4] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const bool hi = g8 & 1;
          const float send = hi ? v[i] : v[i + 2], keep = hi ? v[i + 2] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
        }
        *reinterpret_cast<float2*>(colbuf + (cb * NWARP + warp) * kTile + 8 * g8 + 2 * t4) = make_float2(v[0], v[1]);
      }
      ring_detail::mbar_arrive(cfull + cb);
      if (km_warp) {
        // k·m of the tile's keys 8jj + 2t4 + e (after the arrival: the storer need not wait for these stores):
        // lanes g8 = 0 add the low part from lane + 4
        float* sd = p.sdot + col0;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float low = __shfl_down_sync(0xffffffffu, acc[4 * jj + e], 4);
            const int j = j0 + 8 * jj + 2 * t4 + e;
            if (g8 == 0 && j >= s0 && j < p.P) sd[j] = (acc[4 * jj + e] + acc[4 * jj + 2 + e] + low) * (1.0f / kMScale);
          }
      }
    }
    stamp.at(5);
    if (wg == column_storer<NW>(ntiles - 1)) store_columns(ntiles - 1);
  } else {
    score_detail::grid_dep_wait();
  }
  score_detail::grid_dep_launch();
  stamp.at(6);
  pass2_finish(p, &stamp);
  stamp.at(10);
  stamp.print("P2", ntiles);
#else
  __trap();  // launched only from an sm_90a build (the launcher checks MIXKV_SM90A)
#endif
}

template <int DK, typename T>
constexpr int64_t mma_smem_bytes(bool second, int threads) {
  const int64_t ring = int64_t(second ? kStages : kStages1<DK>) * kTile * (DK + 8) * int64_t(sizeof(T));
  return second ? 2 * ring + 2 * DK * int64_t(sizeof(T)) + 2 * kMaxStrips * kTile * 4
                : ring + int64_t(threads / 32) * 32 * 16 * 4 + 2 * kStages1<DK> * 8;
}
// Two blocks per SM at head dimension 128 need both passes' dynamic shared memory, plus up to 2 KiB of
// static shared memory and the 1 KiB the hardware reserves per block, within sm_90's 228 KiB.
static_assert(2 * (mma_smem_bytes<128, __nv_bfloat16>(true, 256) + 2048 + 1024) <= 228 * 1024,
              "pass 2 at head dimension 128 must keep two blocks per SM");
static_assert(2 * (mma_smem_bytes<128, __nv_bfloat16>(false, 256) + 2048 + 1024) <= 228 * 1024,
              "pass 1 at head dimension 128 must keep two blocks per SM");

// Per column: pooling and mixing with pass 2's constants; -inf on padding; r_out.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads) finalize_kernel(Params<T> p) {
  cuda_detail::Stamps stamp;
  stamp.at(0);
  score_detail::grid_dep_wait();
  stamp.at(1);
  if (blockIdx.x == 0) stamp.print("FI", 0);
  score_detail::grid_dep_launch();  // the capacities / selection that follow may start (they wait first)
  const int bh = blockIdx.y, b = bh / p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const float* f = p.fin + int64_t(bh) * kFin;
  const float r = f[0];
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.r_out != nullptr)
    p.r_out[bh] = static_cast<Method>(p.method) == Method::mixkv ? r : NAN;  // only mixkv uses an r
  const int j = blockIdx.x * kFinalThreads + threadIdx.x;
  if (j >= p.P) return;
  const int64_t col0 = int64_t(bh) * p.P;
  float* out = p.scores + col0;
  float* imp = p.importance != nullptr ? p.importance + col0 : nullptr;
  if (j < s0) {
    out[j] = -INFINITY;
    if (imp) imp[j] = -INFINITY;
    return;
  }
  const float a =
      pooled_at<false>(p.raw_a + col0, j, s0, p.P, p.kernel / 2, p.pooling == static_cast<int>(Pooling::avg), p.kernel);
  const float vn = p.need_v ? (p.vnorm[col0 + j] - f[1]) / f[2] * f[3] : 0.0f;
  const float kn = p.need_kn ? (-p.knorm[col0 + j] - f[4]) / f[5] * f[6] : 0.0f;
  const float dv = p.need_d ? (-p.sdot[col0 + j] - f[7]) / f[8] * f[9] : 0.0f;
  float s = a;
  switch (static_cast<Method>(p.method)) {
    case Method::attn: s = a; break;
    case Method::keydiff: s = dv; break;
    case Method::vnorm: s = a + vn; break;
    case Method::knorm: s = a + kn; break;
    case Method::uniform_mix: s = (a + dv + vn) / 3.0f; break;
    case Method::mixkv: s = r * dv + (1.0f - r) * (a + vn); break;
  }
  out[j] = s;
  if (imp) imp[j] = a;
}

// head_redundancy: per-chunk sums of unit keys, then one block per (b, h).
template <typename T>
__global__ void __launch_bounds__(256) unit_sum_kernel(const T* k, int64_t s0k, int64_t s1k, int64_t s2k,
                                                      const int32_t* valid, int64_t valid_stride, int Hkv, int N,
                                                      int D, int chunks, float* partial) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* acc = reinterpret_cast<float*>(smem);  // [8 warps][D]
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / Hkv, h = bh % Hkv;
  const int n = seq_length(valid, valid_stride, b, N), first = N - n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int d = threadIdx.x; d < nwarps * D; d += blockDim.x) acc[d] = 0.0f;
  __syncthreads();
  const T* base = k + b * s0k + h * s1k;
  const int j_end = min(N, (chunk + 1) * kRedTokens);
  for (int j = max(first, chunk * kRedTokens) + warp; j < j_end; j += nwarps) {
    const T* row = base + j * s2k;
    float ss = 0.0f;
    for (int d = lane; d < D; d += 32) {
      const float x = to_float(row[d]);
      ss = fmaf(x, x, ss);
    }
    const float inv = 1.0f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
    for (int d = lane; d < D; d += 32) acc[warp * D + d] += to_float(row[d]) * inv;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.0f;
    for (int w = 0; w < nwarps; ++w) s += acc[w * D + d];
    partial[(int64_t(bh) * chunks + chunk) * D + d] = s;
  }
}

__global__ void __launch_bounds__(kReduceThreads) redundancy_kernel(const float* partial, const int32_t* valid,
                                                                   int64_t valid_stride, int Hkv, int N, int D,
                                                                   int chunks, float* out) {
  __shared__ float buf[32];
  const int bh = blockIdx.x, b = bh / Hkv;
  const int n = seq_length(valid, valid_stride, b, N);
  const int c_first = (N - n) / kRedTokens;
  float sq = 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int c = c_first; c < chunks; ++c) acc += partial[(int64_t(bh) * chunks + c) * D + d];
    const float m = acc / static_cast<float>(n);
    sq = fmaf(m, m, sq);
  }
  sq = block_reduce<Op::sum>(sq, buf);
  if (threadIdx.x == 0) {
    const float r = n < 2 ? 0.0f : (static_cast<float>(n) * sq - 1.0f) / static_cast<float>(n - 1);
    out[bh] = fminf(1.0f, fmaxf(0.0f, r));
  }
}

// ---- host helpers --------------------------------------------------------------------------------

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// Raise a kernel's dynamic shared-memory limit once per device and size when a launch needs more
// than the function allows by default.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes, int device, std::atomic<int64_t>* granted) {
  if (device < 0 || device >= 64) device = 63;
  if (granted[device].load() >= bytes) return;
  cuda_detail::fit_dynamic_smem(kernel, static_cast<std::size_t>(bytes), "score");
  granted[device].store(bytes);
}

bool aligned16(const void* ptr, std::initializer_list<int64_t> strides, int64_t elem) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t s : strides)
    if ((s * elem) % 16 != 0) return false;
  return true;
}

// One launch of a Params kernel; `pdl` lets it start while the previous kernel on the stream ends
// (the kernel calls grid_dep_wait() before reading that kernel's results).
template <typename... Args, typename... Values>
void launch(void (*kernel)(Args...), dim3 grid, int threads, int64_t smem, cudaStream_t stream, bool pdl,
            const Values&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1] = {cuda_detail::pdl_attribute()};
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  MIXKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
  MIXKV_CUDA_CHECK_LAUNCH();
}

// Launches the tensor-core passes; false (nothing launched) when the device's shared memory per block
// cannot hold their tile rings (e.g. sm_86 / sm_89 at 99 KiB): the caller takes the generic kernels.
// Compute capability 9.0 (sm_90a code runs), cached per device.
bool is_sm90(int device) {
  static std::atomic<int> cache[64];  // 0 unknown, 1 no, 2 yes
  const int slot = device < 0 || device >= 64 ? 63 : device;
  int v = cache[slot].load();
  if (v == 0) {
    int major = 0, minor = 0;
    MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    v = major == 9 && minor == 0 ? 2 : 1;
    cache[slot].store(v);
  }
  return v == 2;
}

// Whether pass 2 runs on warpgroup MMA (pass2_wgmma_kernel): an sm_90a build, a compute capability 9.0
// device, head dimension 65-128, at most 256 packed query rows. Since its query rows are staged through
// shared memory it is as fast as or faster than the mma.sync pass 2 at every length measured (H100,
// Qwen2-VL-7B heads, 2k-48k keys; benchmarks/NOTES_score.md, v12). MIXKV_SCORE_WGMMA=0 takes the mma.sync
// pass 2.
bool use_wgmma_pass2(const Dims& d, int device) {
#if defined(MIXKV_SM90A)
  const int mode = env_int("MIXKV_SCORE_WGMMA", -1);
  return d.D > 64 && d.D <= 128 && d.Rp <= 256 && mode != 0 && is_sm90(device);
#else
  (void)d, (void)device;
  return false;
#endif
}

// Tensor maps of the keys and values for tma_tile (warpgroup passes), encoded once per scoring call:
// `keys` when the key map is usable, `both` when the value map is too (or the method needs no values)
// with the same dimension order (the kernels share one set of coordinate slots). MIXKV_SCORE_TMA=0:
// neither (cp.async copies).
struct TileMaps {
  CUtensorMap k;  // 128-byte aligned by its type
  CUtensorMap v;
  std::array<int, 3> order{};  // coordinate slots of b, h and the key row
  bool keys = false, both = false;
};

template <typename T>
void encode_tile_maps(const Params<T>& p, const Dims& d, TileMaps& m) {
  if (env_int("MIXKV_SCORE_TMA", 1) != 1) return;
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  m.keys = tma_detail::encode_bhnd(&m.k, bf16, p.k, d.B, d.Hkv, d.N, d.D, p.ks0, p.ks1, p.ks2, m.order);
  std::array<int, 3> vorder{};
  m.both = m.keys && (!p.need_v ||
                      (tma_detail::encode_bhnd(&m.v, bf16, p.v, d.B, d.Hkv, d.N, d.D, p.vs0, p.vs1, p.vs2, vorder) &&
                       vorder == m.order));
}

// Tiles per chunk for about one chunk per SM over `tiles` tiles of each of the B·Hkv rows (at most as many
// chunks as the workspace holds, `chunks`; else the workspace's own `tpb`).
int64_t tiles_per_sm_chunk(int64_t tiles, const Dims& d, int64_t chunks, int64_t tpb, int device) {
  const int64_t t = std::max<int64_t>(1, cdiv(tiles * d.B * d.Hkv, cuda_detail::sm_count(device)));
  return cdiv(tiles, t) > chunks ? tpb : t;
}

// Pass 2 on warpgroup MMA with NW warpgroups (64·NW >= Rp), about one chunk per SM; tiles by tensor map
// when `maps.both`.
template <typename T, int NW>
void launch_pass2_wgmma(Params<T> p, const Dims& d, const TileMaps& maps, int device, bool pdl, cudaStream_t stream) {
  const int64_t ptiles = cdiv(d.P, kTile);
  p.tpb = static_cast<int>(tiles_per_sm_chunk(ptiles, d, d.chunks2, d.tpb, device));
  p.chunks2 = static_cast<int>(cdiv(ptiles, p.tpb));
  p.tma_b = maps.order[0], p.tma_h = maps.order[1], p.tma_n = maps.order[2];
  const int64_t smem = wgmma2_smem_bytes<T>(NW);
  const dim3 grid(static_cast<unsigned>(p.chunks2), static_cast<unsigned>(d.B * d.Hkv));
  if (maps.both) {
    static std::atomic<int64_t> granted[64];
    allow_smem(pass2_wgmma_kernel<T, NW, true>, smem, device, granted);
    launch(pass2_wgmma_kernel<T, NW, true>, grid, NW * 128, smem, stream, pdl, p, maps.k, maps.v);
  } else {
    static std::atomic<int64_t> granted[64];
    allow_smem(pass2_wgmma_kernel<T, NW, false>, smem, device, granted);
    launch(pass2_wgmma_kernel<T, NW, false>, grid, NW * 128, smem, stream, pdl, p, maps.k, maps.v);
  }
}

template <typename T>
void launch_pass2_wgmma_rows(const Params<T>& p, const Dims& d, const TileMaps& maps, int device, bool pdl,
                             cudaStream_t stream) {
  if (d.Rp <= 64)
    launch_pass2_wgmma<T, 1>(p, d, maps, device, pdl, stream);
  else if (d.Rp <= 128)
    launch_pass2_wgmma<T, 2>(p, d, maps, device, pdl, stream);
  else if (d.Rp <= 192)
    launch_pass2_wgmma<T, 3>(p, d, maps, device, pdl, stream);
  else
    launch_pass2_wgmma<T, 4>(p, d, maps, device, pdl, stream);
}

// Whether pass 1 runs on warpgroup MMA (pass1_wgmma_kernel): an sm_90a build, a compute capability 9.0
// device, bfloat16 (the unit-key sums on the tensor cores need its range), head dimension up to 128 and
// at most 256 packed query rows; MIXKV_SCORE_WGMMA1=0 turns it off.
bool use_wgmma_pass1(const Dims& d, int device) {
#if defined(MIXKV_SM90A)
  if (d.D > 128 || d.Rp > 256 || env_int("MIXKV_SCORE_WGMMA1", 1) != 1) return false;
  return is_sm90(device);
#else
  (void)d, (void)device;
  return false;
#endif
}

// One instantiation of pass1_wgmma_kernel: its shared-memory grant (per device) and the launch.
template <typename T, int NW, bool kTma, bool kKn, bool kUnits>
void launch_pass1_variant(const Params<T>& p, dim3 grid, int64_t smem, int device, cudaStream_t stream,
                          const CUtensorMap& kmap) {
  static std::atomic<int64_t> granted[64];
  allow_smem(pass1_wgmma_kernel<T, NW, kTma, kKn, kUnits>, smem, device, granted);
  launch(pass1_wgmma_kernel<T, NW, kTma, kKn, kUnits>, grid, NW * 128, smem, stream, false, p, kmap);
}

// Pass 1 on warpgroup MMA with NW consumer warpgroups (64·NW >= Rp), about one chunk per SM; key tiles
// by tensor map when `maps.keys`.
template <typename T, int NW>
void launch_pass1_wgmma(Params<T> p, const Dims& d, const TileMaps& maps, int device, cudaStream_t stream) {
  p.tpb = static_cast<int>(tiles_per_sm_chunk(d.tiles, d, d.chunks1, d.tpb, device));
  p.chunks1 = static_cast<int>(cdiv(d.tiles, p.tpb));
  p.tma_b = maps.order[0], p.tma_h = maps.order[1], p.tma_n = maps.order[2];
  const int64_t smem = wgmma1_smem_bytes<T>(NW);
  const dim3 grid(static_cast<unsigned>(p.chunks1), static_cast<unsigned>(d.B * d.Hkv));
  // the unit-key sums only where m or the online r is read (or the key norms come out of them)
  const bool units = p.need_d || p.kn_pass1;
  if (maps.keys && p.kn_pass1)
    launch_pass1_variant<T, NW, true, true, true>(p, grid, smem, device, stream, maps.k);
  else if (maps.keys && units)
    launch_pass1_variant<T, NW, true, false, true>(p, grid, smem, device, stream, maps.k);
  else if (maps.keys)
    launch_pass1_variant<T, NW, true, false, false>(p, grid, smem, device, stream, maps.k);
  else if (units)
    launch_pass1_variant<T, NW, false, false, true>(p, grid, smem, device, stream, maps.k);
  else
    launch_pass1_variant<T, NW, false, false, false>(p, grid, smem, device, stream, maps.k);
}

template <typename T>
void launch_pass1_wgmma_rows(const Params<T>& p, const Dims& d, const TileMaps& maps, int device,
                             cudaStream_t stream) {
  if (d.Rp <= 64)
    launch_pass1_wgmma<T, 1>(p, d, maps, device, stream);
  else if (d.Rp <= 128)
    launch_pass1_wgmma<T, 2>(p, d, maps, device, stream);
  else if (d.Rp <= 192)
    launch_pass1_wgmma<T, 3>(p, d, maps, device, stream);
  else
    launch_pass1_wgmma<T, 4>(p, d, maps, device, stream);
}

template <typename T, int DK, int NT>
bool launch_passes_mma(Params<T> p, const Dims& d, int device, bool pdl, cudaStream_t stream) {
  const int rows_per_warp = 8 * NT;
  p.mma_warps = static_cast<int>(cdiv(d.Rp, rows_per_warp));
  // One warp more than the query rows need, when the launch bound allows (two blocks of 8 warps fill
  // the register file at 128 registers): it takes the row work the query warps would share unevenly.
  const int threads = 32 * std::min(mma_threads<NT>() / 32, std::max(kMinWarps, p.mma_warps + 1));
  const int64_t smem1 = mma_smem_bytes<DK, T>(false, threads), smem2 = mma_smem_bytes<DK, T>(true, threads);
  static std::atomic<int> fits[64];  // per device: 0 unknown, 1 no, 2 yes
  const int slot = device < 0 || device >= 64 ? 63 : device;
  if (fits[slot].load() == 0)
    fits[slot].store(cuda_detail::dynamic_smem_fits(pass1_mma_kernel<T, DK, NT>, static_cast<std::size_t>(smem1)) &&
                             cuda_detail::dynamic_smem_fits(pass2_mma_kernel<T, DK, NT>,
                                                            static_cast<std::size_t>(smem2))
                         ? 2
                         : 1);
  if (fits[slot].load() != 2) return false;
  static std::atomic<int64_t> granted1[64];
  static std::atomic<int64_t> granted2[64];
  allow_smem(pass1_mma_kernel<T, DK, NT>, smem1, device, granted1);
  allow_smem(pass2_mma_kernel<T, DK, NT>, smem2, device, granted2);
  const unsigned bh = static_cast<unsigned>(d.B * d.Hkv);
  const bool wgmma1 = DK == 128 && std::is_same_v<T, __nv_bfloat16> && use_wgmma_pass1(d, device);
  const bool wgmma2 = DK == 128 && use_wgmma_pass2(d, device);
  TileMaps maps{};
  if (wgmma1 || wgmma2) encode_tile_maps(p, d, maps);
  // Key signals without pass 2's key slabs: both warpgroup passes on tensor-map tiles, and for k·m a
  // warp of spare rows (packed rows short of the warpgroups' 64 · NW). MIXKV_SCORE_KM=0 keeps the slabs.
  const int64_t nw_rows = cdiv(d.Rp, 64) * 64;
  p.kn_pass1 = wgmma1 && wgmma2 && maps.keys && maps.both && (p.need_kn || p.need_d) &&
               (!p.need_d || d.Rp + 16 <= nw_rows) && env_int("MIXKV_SCORE_KM", 1) == 1;
  p.km_rows = p.kn_pass1 && p.need_d;
  if constexpr (DK == 128 && std::is_same_v<T, __nv_bfloat16>) {
    if (wgmma1) launch_pass1_wgmma_rows(p, d, maps, device, stream);
  }
  if (!wgmma1)
    launch(pass1_mma_kernel<T, DK, NT>, dim3(static_cast<unsigned>(d.chunks1), bh), threads, smem1, stream, false, p);
  if (wgmma2)
    launch_pass2_wgmma_rows(p, d, maps, device, pdl, stream);
  else
    launch(pass2_mma_kernel<T, DK, NT>, dim3(static_cast<unsigned>(d.chunks2), bh), threads, smem2, stream, pdl, p);
  return true;
}

template <typename T>
void launch_score(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& valid, const Tensor& redundancy,
                  const ScoreOptions& o, const Tensor& scores, const Tensor& importance, const Tensor& r_out,
                  const Tensor& workspace, cudaStream_t stream) {
  const Dims d = make_dims(k.shape[0], q.shape[1], k.shape[1], k.shape[2], q.shape[2], k.shape[3]);
  const Layout lay = make_layout(d);
  require(workspace.present && workspace.dtype == DType::u8 && workspace.ndim == 1 && workspace.contiguous(),
          "workspace must be a contiguous uint8 tensor of score_workspace_bytes(...) bytes");
  require(workspace.shape[0] >= lay.total, "workspace must hold at least ", lay.total, " bytes, got ",
          workspace.shape[0]);
  require(reinterpret_cast<std::uintptr_t>(workspace.data) % kAlign == 0, "workspace must be 256-byte aligned");
  require(d.D <= 256, "score: the CUDA kernels support head dimensions up to 256, got ", d.D);
  check_same_device(k, "keys", workspace, "workspace");

  Params<T> p{};
  p.q = static_cast<const T*>(q.data);
  p.k = static_cast<const T*>(k.data);
  p.v = static_cast<const T*>(v.data);
  p.qs0 = q.stride[0], p.qs1 = q.stride[1], p.qs2 = q.stride[2];
  p.ks0 = k.stride[0], p.ks1 = k.stride[1], p.ks2 = k.stride[2];
  p.vs0 = v.stride[0], p.vs1 = v.stride[1], p.vs2 = v.stride[2];
  p.valid = valid.present ? static_cast<const int32_t*>(valid.data) : nullptr;
  p.valid_stride = valid.present ? valid.stride[0] : 0;
  p.red = redundancy.present ? static_cast<const float*>(redundancy.data) : nullptr;
  p.red_s0 = redundancy.present ? redundancy.stride[0] : 0;
  p.red_s1 = redundancy.present ? redundancy.stride[1] : 0;
  p.red_rows = redundancy.present ? static_cast<int>(redundancy.shape[0]) : 0;
  p.scores = static_cast<float*>(scores.data);
  p.importance = importance.present ? static_cast<float*>(importance.data) : nullptr;
  p.r_out = r_out.present ? static_cast<float*>(r_out.data) : nullptr;
  auto* ws = static_cast<unsigned char*>(workspace.data);
  p.counters = reinterpret_cast<unsigned*>(ws + lay.counters);
  p.qpack = reinterpret_cast<T*>(ws + lay.qpack);
  p.stats = reinterpret_cast<float2*>(ws + lay.stats);
  p.rowstat = reinterpret_cast<float2*>(ws + lay.rowstat);
  p.msum = reinterpret_cast<float*>(ws + lay.msum);
  p.mvec = reinterpret_cast<float*>(ws + lay.mvec);
  p.ronline = reinterpret_cast<float*>(ws + lay.ronline);
  p.raw_a = reinterpret_cast<float*>(ws + lay.raw_a);
  p.sdot = reinterpret_cast<float*>(ws + lay.sdot);
  p.knorm = reinterpret_cast<float*>(ws + lay.knorm);
  p.vnorm = reinterpret_cast<float*>(ws + lay.vnorm);
  p.cpart = reinterpret_cast<float*>(ws + lay.cpart);
  p.fin = reinterpret_cast<float*>(ws + lay.fin);
  p.B = int(d.B), p.Hkv = int(d.Hkv), p.N = int(d.N), p.W = int(d.W), p.D = int(d.D), p.G = int(d.G);
  p.P = int(d.P), p.Wp = int(d.Wp), p.Rp = int(d.Rp), p.Dp = int(d.Dp), p.tpb = int(d.tpb);
  p.tiles = int(d.tiles), p.chunks1 = int(d.chunks1), p.chunks2 = int(d.chunks2), p.strips = int(d.strips);
  p.nwarps = int(std::min<int64_t>(kMaxWarps, std::max<int64_t>(kMinWarps, d.strips)));
  p.ldk = int(d.Dp + (sizeof(T) == 4 ? 4 : 8));
  p.method = static_cast<int>(o.method);
  p.pooling = static_cast<int>(o.pooling);
  p.kernel = o.kernel_size;
  p.gqa = static_cast<int>(o.gqa);
  p.scale = o.scale > 0.0f ? o.scale : 1.0f / std::sqrt(static_cast<float>(d.D));
  p.scale2 = p.scale * 1.4426950408889634f;
  p.vec_k = aligned16(k.data, {k.stride[0], k.stride[1], k.stride[2], d.D}, sizeof(T));
  p.q_vec = aligned16(q.data, {q.stride[0], q.stride[1], q.stride[2]}, sizeof(T));
  p.q_pairs = reinterpret_cast<std::uintptr_t>(q.data) % 4 == 0 && q.stride[0] % 2 == 0 && q.stride[1] % 2 == 0 &&
              q.stride[2] % 2 == 0;
  p.need_v = o.method == Method::vnorm || o.method == Method::uniform_mix || o.method == Method::mixkv;
  p.need_kn = o.method == Method::knorm;
  p.need_d = o.method == Method::keydiff || o.method == Method::uniform_mix || o.method == Method::mixkv;
  p.kn_pass1 = p.km_rows = false;
  require(int64_t(d.Rp) * d.chunks1 < (int64_t(1) << 31), "score: shape too large");

  const unsigned bh = static_cast<unsigned>(d.B * d.Hkv);
  const bool pdl = cuda_detail::pdl_supported(k.device_id);
  MIXKV_CUDA_CHECK(cudaMemsetAsync(p.counters, 0, 2 * sizeof(unsigned) * bh, stream));
  const bool vec_v = aligned16(v.data, {v.stride[0], v.stride[1], v.stride[2], d.D}, sizeof(T));
  bool done = false;
  // Pass 2 reads keys and values for the last time: evict them first, so that pass 1's keys stay in L2.
  p.l2 = env_int("MIXKV_SCORE_L2", 2);
  if constexpr (!std::is_same_v<T, float>) {
    if (p.vec_k && (vec_v || !p.need_v) && d.strips <= kMaxStrips) {
      // 32 rows per warp; 16 for head dimension 256 (its query fragments need twice the registers)
      if (d.D <= 64) {
        done = launch_passes_mma<T, 64, 4>(p, d, k.device_id, pdl, stream);
      } else if (d.D <= 128) {
        done = launch_passes_mma<T, 128, 4>(p, d, k.device_id, pdl, stream);
      } else {
        done = launch_passes_mma<T, 256, 2>(p, d, k.device_id, pdl, stream);
      }
    }
  }
  if (!done) {
    const int threads = p.nwarps * 32;
    const int64_t smem1 = smem_layout(p.ldk, sizeof(T), p.nwarps, p.Dp, p.strips, false).total;
    const int64_t smem2 = smem_layout(p.ldk, sizeof(T), p.nwarps, p.Dp, p.strips, true).total;
    static std::atomic<int64_t> granted1[64];
    static std::atomic<int64_t> granted2[64];
    allow_smem(pass1_kernel<T>, smem1, k.device_id, granted1);
    allow_smem(pass2_kernel<T>, smem2, k.device_id, granted2);
    pack_q_kernel<T><<<dim3(static_cast<unsigned>(d.Rp), bh), 128, 0, stream>>>(p);
    MIXKV_CUDA_CHECK_LAUNCH();
    launch(pass1_kernel<T>, dim3(static_cast<unsigned>(d.chunks1), bh), threads, smem1, stream, false, p);
    launch(pass2_kernel<T>, dim3(static_cast<unsigned>(d.chunks2), bh), threads, smem2, stream, pdl, p);
  }
  launch(finalize_kernel<T>, dim3(static_cast<unsigned>(cdiv(d.P, kFinalThreads)), bh), kFinalThreads, 0, stream, pdl,
         p);
}

template <typename T>
void launch_redundancy(const Tensor& k, const Tensor& valid, const Tensor& out, const Tensor& workspace,
                       cudaStream_t stream) {
  const int64_t B = k.shape[0], H = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t chunks = cdiv(N, kRedTokens);
  const int64_t need = head_redundancy_workspace_bytes(B, H, N, D);
  require(workspace.present && workspace.dtype == DType::u8 && workspace.ndim == 1 && workspace.contiguous(),
          "workspace must be a contiguous uint8 tensor of head_redundancy_workspace_bytes(...) bytes");
  require(workspace.shape[0] >= need, "workspace must hold at least ", need, " bytes, got ", workspace.shape[0]);
  require(reinterpret_cast<std::uintptr_t>(workspace.data) % 16 == 0, "workspace must be 16-byte aligned");
  check_same_device(k, "keys", workspace, "workspace");
  require(D <= 4096, "head_redundancy: head dimension too large for the CUDA kernel");
  auto* partial = static_cast<float*>(workspace.data);
  const int32_t* vl = valid.present ? static_cast<const int32_t*>(valid.data) : nullptr;
  const int64_t vs = valid.present ? valid.stride[0] : 0;
  const int64_t smem = 8 * D * 4;
  static std::atomic<int64_t> granted[64];
  allow_smem(unit_sum_kernel<T>, smem, k.device_id, granted);
  unit_sum_kernel<T><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(B * H)), 256, smem, stream>>>(
      static_cast<const T*>(k.data), k.stride[0], k.stride[1], k.stride[2], vl, vs, int(H), int(N), int(D),
      int(chunks), partial);
  MIXKV_CUDA_CHECK_LAUNCH();
  redundancy_kernel<<<static_cast<unsigned>(B * H), kReduceThreads, 0, stream>>>(
      partial, vl, vs, int(H), int(N), int(D), int(chunks), static_cast<float*>(out.data));
  MIXKV_CUDA_CHECK_LAUNCH();
}

}  // namespace

std::size_t score_workspace_bytes(int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t W, int64_t D) {
  require(B >= 1 && Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0 && W >= 1 && W < N && D >= 1,
          "score_workspace_bytes: invalid shape");
  return static_cast<std::size_t>(make_layout(make_dims(B, Hq, Hkv, N, W, D)).total);
}

std::size_t head_redundancy_workspace_bytes(int64_t B, int64_t Hkv, int64_t N, int64_t D) {
  require(B >= 1 && Hkv >= 1 && N >= 1 && D >= 1, "head_redundancy_workspace_bytes: invalid shape");
  return static_cast<std::size_t>(B * Hkv * cdiv(N, kRedTokens) * D * 4);
}

namespace cuda {

void score(const Tensor& q_window, const Tensor& keys, const Tensor& values, const Tensor& valid_lengths,
           const Tensor& redundancy, const ScoreOptions& options, const Tensor& scores, const Tensor& importance,
           const Tensor& redundancy_out, const Tensor& workspace, std::uintptr_t stream) {
  require(keys.is_cuda(), "score: the CUDA path needs CUDA tensors");
  cuda_detail::DeviceGuard guard(keys.device_id);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  MIXKV_DISPATCH_FLOAT(keys.dtype, "score", [&] {
    launch_score<scalar_t>(q_window, keys, values, valid_lengths, redundancy, options, scores, importance,
                           redundancy_out, workspace, s);
  });
}

void head_redundancy(const Tensor& keys, const Tensor& valid_lengths, const Tensor& out, const Tensor& workspace,
                     std::uintptr_t stream) {
  require(keys.is_cuda(), "head_redundancy: the CUDA path needs CUDA tensors");
  cuda_detail::DeviceGuard guard(keys.device_id);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  MIXKV_DISPATCH_FLOAT(keys.dtype, "head_redundancy",
                       [&] { launch_redundancy<scalar_t>(keys, valid_lengths, out, workspace, s); });
}

}  // namespace cuda

}  // namespace mixkv
