// Token scoring on the GPU (SPEC §1–5).
//
// Per (sequence b, kv head h) the G query heads × W window rows form the rows of a small matrix
// (each head's rows padded to Wp, a multiple of 16). Keys stream in tiles of 64.
//   pack_q    Q window -> workspace, packed [B·Hkv, G·Wp, Dp] with zero padding.
//   pass1     per chunk of key tiles: logits (tensor cores for 16-bit inputs), per (row, chunk)
//             running max / sum-exp, and sums of unit keys.
//   combine   per (b, h): row max / sum over chunks, the mean unit key m, the online r.
//   pass2     per chunk of prefix tiles: logits again -> probabilities summed over the window rows,
//             reduced over the group -> raw A; key norms, k̂·m and value norms of prefix tokens.
//   finalize  per (b, h): pooling, min/max/means, alignment, mixing -> outputs.
// Every reduction has a fixed order, so results are identical from run to run.
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda_check.cuh"
#include "dtype.cuh"
#include "score_mma.cuh"
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
constexpr int kReduceThreads = 256;
constexpr int kFinalThreads = 256;
constexpr int kFinalCols = 1024;   // prefix columns per finalize block
constexpr int kParts = 10;         // partial sums per finalize block
constexpr int kStages = 3;         // key tiles in flight in the tensor-core passes
constexpr int kMmaWarps = 16;      // most 16-row strips the tensor-core passes hold in registers
constexpr int kRedTokens = 256;    // tokens per block in head_redundancy
constexpr int kTargetBlocks = 132;  // one long-running block per SM on a 132-SM GPU
constexpr int64_t kAlign = 256;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// ---- shapes and workspace layout (host) ----------------------------------------------------------

struct Dims {
  int64_t B, Hq, Hkv, N, W, D, G, P, Wp, Rp, Dp, tiles, tpb, chunks1, chunks2, strips, fblocks;
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
  // Tiles per block: about one block per SM, each streaming many tiles on long sequences.
  d.tpb = std::max<int64_t>(1, cdiv(d.tiles * B * Hkv, kTargetBlocks));
  d.chunks1 = cdiv(d.tiles, d.tpb);
  d.chunks2 = cdiv(cdiv(d.P, kTile), d.tpb);
  d.strips = d.Rp / 16;
  d.fblocks = cdiv(d.P, kFinalCols);
  return d;
}

struct Layout {
  int64_t qpack, stats, rowstat, msum, mvec, ronline, raw_a, sdot, knorm, vnorm, fpart, total;
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
  l.fpart = take(bh * d.fblocks * kParts * 4);
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
  T* qpack;
  float2* stats;
  float2* rowstat;
  float* msum;
  float* mvec;
  float* ronline;
  float* raw_a;
  float* sdot;
  float* knorm;
  float* vnorm;
  float* fpart;
  int B, Hkv, N, W, D, G, P, Wp, Rp, Dp, tpb, tiles, chunks1, strips, nwarps, ldk, fblocks;
  int method, pooling, kernel, gqa;
  float scale, scale2;  // logit scale, and the same times log2(e): softmax statistics are kept base 2
  bool vec_k, need_v, need_kn, need_d;
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

template <Op op>
__device__ __forceinline__ float apply(float a, float b) {
  if constexpr (op == Op::sum) return a + b;
  if constexpr (op == Op::min) return fminf(a, b);
  return fmaxf(a, b);
}

// Deterministic block reduction (fixed tree); every thread gets the result. `buf`: 32 floats.
template <Op op>
__device__ float block_reduce(float v, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v = apply<op>(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // buf may still be read from a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float r = buf[0];
  for (int w = 1; w < nwarps; ++w) r = apply<op>(r, buf[w]);
  return r;
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

// ---- kernels -------------------------------------------------------------------------------------

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
__global__ void __launch_bounds__(kMaxWarps * 32) pass1_kernel(Params<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int tile_begin = chunk * p.tpb, tile_end = min(p.tiles, tile_begin + p.tpb);
  if (tile_end * kTile <= s0) return;  // padding only; `combine` skips this chunk
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
        float2* slot = p.stats + (int64_t(bh) * p.Rp + rloc) * p.chunks1 + chunk;
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

// Rows: one warp per packed row merges its per-chunk (max, sum) pairs. The last block along y: the
// mean unit key m and the online r.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) combine_kernel(Params<T> p) {
  __shared__ float buf[32];
  const int bh = blockIdx.x, b = bh / p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int c_first = (s0 / kTile) / p.tpb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, rows_per_block = kReduceThreads / 32;
  if (static_cast<int>(blockIdx.y) < static_cast<int>(gridDim.y) - 1) {
    const int r = blockIdx.y * rows_per_block + warp;
    if (r >= p.Rp || r % p.Wp >= p.W) return;  // whole warp
    const float2* st = p.stats + (int64_t(bh) * p.Rp + r) * p.chunks1;
    float2 acc = make_float2(-INFINITY, 0.0f);
    for (int c = c_first + lane; c < p.chunks1; c += 32) acc = merge_stat(acc, st[c]);
    for (int o = 16; o > 0; o >>= 1) {
      const float2 other = make_float2(__shfl_xor_sync(0xffffffffu, acc.x, o), __shfl_xor_sync(0xffffffffu, acc.y, o));
      acc = merge_stat(acc, other);
    }
    if (lane == 0) p.rowstat[int64_t(bh) * p.Rp + r] = acc;
    return;
  }
  float sq = 0.0f;
  for (int d = threadIdx.x; d < p.Dp; d += blockDim.x) {
    float acc = 0.0f;
    for (int c = c_first; c < p.chunks1; ++c) acc += p.msum[(int64_t(bh) * p.chunks1 + c) * p.Dp + d];
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

// ---- tensor-core passes (16-bit inputs, 16-byte aligned rows, at most kMmaWarps strips) -----------
// One block per (chunk of key tiles, b·h); warp s < strips holds the A fragments of packed query
// rows 16s..16s+15 in registers for the whole chunk; key (and value) tiles stream through a
// kStages-deep cp.async ring. DK: the head dimension rounded up to 64, 128 or 256.

template <int DK, typename T>
__host__ __device__ constexpr int mma_ldk() {
  return DK + 8;  // 16-byte row padding: ldmatrix row addresses fall in distinct banks
}

template <typename T, int DK>
__device__ __forceinline__ void load_q_fragments(const Params<T>& p, int b, int h, int warp, int lane,
                                                 uint32_t (&qa)[DK / 16][4]) {
  using score_detail::pack_pair;
  const int g8 = lane >> 2, t = lane & 3;
  const T zero = from_float<T>(0.0f);
  const T* rows[2];
  bool ok[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int r = warp * 16 + g8 + 8 * u, g = r / p.Wp, i = r % p.Wp;
    ok[u] = i < p.W;
    rows[u] = p.q + b * p.qs0 + int64_t(h * p.G + g) * p.qs1 + int64_t(i) * p.qs2;
  }
#pragma unroll
  for (int ks = 0; ks < DK / 16; ++ks) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = ks * 16 + 2 * t + 8 * half;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const bool in = ok[u] && c < p.D;  // D % 8 == 0: both columns of the pair agree
        qa[ks][2 * half + u] = in ? pack_pair(rows[u][c], rows[u][c + 1]) : pack_pair(zero, zero);
      }
    }
  }
}

// Issue the cp.async copies of rows j0..j0+63 (zero outside [lo, hi) and past D) into `dst`.
template <typename T, int DK>
__device__ __forceinline__ void issue_tile(const T* base, int64_t row_stride, int j0, int lo, int hi, int D,
                                           T* dst) {
  constexpr int LDK = mma_ldk<DK, T>(), CH = DK / 8;
  for (int idx = threadIdx.x; idx < kTile * CH; idx += blockDim.x) {
    const int r = idx / CH, c = (idx % CH) * 8, j = j0 + r;
    const bool ok = j >= lo && j < hi && c < D;
    score_detail::cp_async16(dst + r * LDK + c, ok ? base + int64_t(j) * row_stride + c : base, ok);
  }
}

// Online (max, sum of 2^(x - max)) over 16 base-2 logits.
__device__ __forceinline__ void online_update(float& m, float& s, const float (&v)[16]) {
  float t = v[0];
#pragma unroll
  for (int k = 1; k < 16; ++k) t = fmaxf(t, v[k]);
  const float mn = fmaxf(m, t);
  if (mn == -INFINITY) return;
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < 16; ++k) acc += fast_exp2(v[k] - mn);
  s = fmaf(s, fast_exp2(m - mn), acc);
  m = mn;
}

template <typename T, int DK>
__global__ void __launch_bounds__(kMmaWarps * 32, 1) pass1_mma_kernel(Params<T> p) {
  constexpr int LDK = mma_ldk<DK, T>();
  extern __shared__ __align__(128) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);                                          // [kStages][64][LDK]
  float* usum = reinterpret_cast<float*>(smem + kStages * kTile * LDK * sizeof(T));  // [warps][DK]
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int t_begin = max(chunk * p.tpb, s0 / kTile), t_end = min(p.tiles, (chunk + 1) * p.tpb);
  if (t_begin >= t_end) return;  // padding only; `combine` skips this chunk
  const int ntiles = t_end - t_begin;
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const T* kbase = p.k + b * p.ks0 + h * p.ks1;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < ntiles) issue_tile<T, DK>(kbase, p.ks2, (t_begin + st) * kTile, s0, p.N, p.D, ring + st * kTile * LDK);
    score_detail::cp_async_commit();
  }
  // Row work: LPR lanes per key row, lane part c owns columns 8c..8c+7 and 8(c+LPR)..8(c+LPR)+7.
  constexpr int LPR = DK / 16, RPS = 32 / LPR;
  const int slot = lane / LPR, part = lane % LPR;
  float uacc[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) uacc[k] = 0.0f;
  const bool mma_warp = warp < p.strips;
  uint32_t qa[DK / 16][4];
  if (mma_warp) load_q_fragments<T, DK>(p, b, h, warp, lane, qa);
  const int g8 = lane >> 2, t4 = lane & 3;
  int last[2];
  bool row_ok[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int i = (warp * 16 + g8 + 8 * u) % p.Wp;
    row_ok[u] = mma_warp && i < p.W;
    last[u] = p.P + i;  // causal: window row i sees keys up to P + i
  }
  float rm[2] = {-INFINITY, -INFINITY}, rs[2] = {0.0f, 0.0f};
  for (int it = 0; it < ntiles; ++it) {
    score_detail::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < ntiles)
      issue_tile<T, DK>(kbase, p.ks2, (t_begin + it + kStages - 1) * kTile, s0, p.N, p.D,
                        ring + ((it + kStages - 1) % kStages) * kTile * LDK);
    score_detail::cp_async_commit();
    const T* tile = ring + (it % kStages) * kTile * LDK;
    const int j0 = (t_begin + it) * kTile;
    // Sums of unit keys (padding rows are zero: 0 · 1e12 = 0), in registers.
    for (int r = warp * RPS + slot; r < kTile; r += nwarps * RPS) {
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
      for (int k = 0; k < 16; ++k) uacc[k] = fmaf(x[k], inv, uacc[k]);
    }
    if (mma_warp) {
      float acc[8][4];
      score_detail::tile_logits<T, DK / 16, LDK>(qa, tile, lane, acc);
      const bool edge = j0 < s0 || j0 + kTile - 1 > p.P;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        float v[16];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float l = acc[nt][2 * u + e] * p.scale2;
            if (edge) {
              const int j = j0 + nt * 8 + 2 * t4 + e;
              if (j < s0 || j > last[u]) l = -INFINITY;
            }
            v[nt * 2 + e] = l;
          }
        online_update(rm[u], rs[u], v);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    float2 st = make_float2(rm[u], rs[u]);
    for (int o = 1; o < 4; o <<= 1) {
      const float2 other = make_float2(__shfl_xor_sync(0xffffffffu, st.x, o), __shfl_xor_sync(0xffffffffu, st.y, o));
      st = merge_stat(st, other);
    }
    if (row_ok[u] && t4 == 0) p.stats[(int64_t(bh) * p.Rp + warp * 16 + g8 + 8 * u) * p.chunks1 + chunk] = st;
  }
#pragma unroll
  for (int k = 0; k < 16; ++k)
    for (int o = LPR; o < 32; o <<= 1) uacc[k] += __shfl_xor_sync(0xffffffffu, uacc[k], o);
  if (slot == 0)
#pragma unroll
    for (int k = 0; k < 16; ++k) usum[warp * DK + 8 * (part + (k >> 3) * LPR) + (k & 7)] = uacc[k];
  __syncthreads();
  for (int d = tid; d < p.Dp; d += nthreads) {
    float s = 0.0f;
    if (d < p.D)
      for (int w = 0; w < nwarps; ++w) s += usum[w * DK + d];
    p.msum[(int64_t(bh) * p.chunks1 + chunk) * p.Dp + d] = s;
  }
}

// Raw importance of one key tile: per column, the window-row sums of each query head's strips
// (stripcol [G * strips_per_head][kTile]) averaged over the W window rows, then reduced over the
// G heads of the group (mean or max). Called by every thread of the block.
template <typename T>
__device__ void store_raw_importance(const Params<T>& p, const float* stripcol, int strips_per_head, int j0, int s0,
                                     int64_t col0) {
  for (int c = threadIdx.x; c < kTile; c += blockDim.x) {
    const int j = j0 + c;
    if (j < s0 || j >= p.P) continue;
    float red = p.gqa == static_cast<int>(GqaReduce::max) ? -INFINITY : 0.0f;
    for (int g = 0; g < p.G; ++g) {
      float a = 0.0f;
      for (int u = 0; u < strips_per_head; ++u) a += stripcol[(g * strips_per_head + u) * kTile + c];
      a /= static_cast<float>(p.W);
      red = p.gqa == static_cast<int>(GqaReduce::max) ? fmaxf(red, a) : red + a;
    }
    if (p.gqa != static_cast<int>(GqaReduce::max)) red /= static_cast<float>(p.G);
    p.raw_a[col0 + j] = red;
  }
}

template <typename T, int DK>
__global__ void __launch_bounds__(kMmaWarps * 32, 1) pass2_mma_kernel(Params<T> p) {
  constexpr int LDK = mma_ldk<DK, T>();
  extern __shared__ __align__(128) unsigned char smem[];
  T* kring = reinterpret_cast<T*>(smem);                       // [kStages][64][LDK]
  T* vring = kring + kStages * kTile * LDK;                    // [kStages][64][LDK]
  float* mkey = reinterpret_cast<float*>(vring + kStages * kTile * LDK);  // [DK]
  float* stripcol = mkey + DK;                                 // [kMmaWarps][64]
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int ptiles = (p.P + kTile - 1) / kTile;
  const int t_begin = max(chunk * p.tpb, s0 / kTile), t_end = min(ptiles, (chunk + 1) * p.tpb);
  if (t_begin >= t_end) return;
  const int ntiles = t_end - t_begin;
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const T* kbase = p.k + b * p.ks0 + h * p.ks1;
  const T* vbase = p.v + b * p.vs0 + h * p.vs1;
  auto issue = [&](int it) {
    const int j0 = (t_begin + it) * kTile, st = it % kStages;
    issue_tile<T, DK>(kbase, p.ks2, j0, s0, p.P, p.D, kring + st * kTile * LDK);
    if (p.need_v) issue_tile<T, DK>(vbase, p.vs2, j0, s0, p.P, p.D, vring + st * kTile * LDK);
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < ntiles) issue(st);
    score_detail::cp_async_commit();
  }
  for (int d = tid; d < DK; d += nthreads) mkey[d] = d < p.Dp ? p.mvec[int64_t(bh) * p.Dp + d] : 0.0f;
  const bool mma_warp = warp < p.strips;
  uint32_t qa[DK / 16][4];
  if (mma_warp) load_q_fragments<T, DK>(p, b, h, warp, lane, qa);
  const int g8 = lane >> 2, t4 = lane & 3;
  float rmax[2], rinv[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int r = warp * 16 + g8 + 8 * u;
    rmax[u] = INFINITY, rinv[u] = 0.0f;  // rows past W (or a row that sees nothing) add 0
    if (mma_warp && r % p.Wp < p.W) {
      const float2 st = p.rowstat[int64_t(bh) * p.Rp + r];
      if (st.x != -INFINITY && st.y > 0.0f) rmax[u] = st.x, rinv[u] = 1.0f / st.y;
    }
  }
  const int strips_per_head = p.Wp / 16;
  const int64_t col0 = int64_t(bh) * p.P;
  constexpr int LPR = DK / 16, RPS = 32 / LPR;
  const int slot = lane / LPR, part = lane % LPR;
  for (int it = 0; it < ntiles; ++it) {
    score_detail::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < ntiles) issue(it + kStages - 1);
    score_detail::cp_async_commit();
    const T* tile = kring + (it % kStages) * kTile * LDK;
    const T* vtile = vring + (it % kStages) * kTile * LDK;
    const int j0 = (t_begin + it) * kTile;
    // Per prefix token: key norm, k̂·m, value norm (LPR lanes per row; the slot's lanes agree on j).
    for (int r = warp * RPS + slot; r < kTile; r += nwarps * RPS) {
      const int j = j0 + r;
      float x[16], mk[16];
      score_detail::load_eight(tile + r * LDK + 8 * part, x);
      score_detail::load_eight(tile + r * LDK + 8 * (part + LPR), x + 8);
#pragma unroll
      for (int k = 0; k < 16; ++k) mk[k] = mkey[8 * (part + (k >> 3) * LPR) + (k & 7)];
      float ss = 0.0f, dm = 0.0f, vs = 0.0f;
#pragma unroll
      for (int k = 0; k < 16; ++k) ss = fmaf(x[k], x[k], ss), dm = fmaf(x[k], mk[k], dm);
      if (p.need_v) {
        score_detail::load_eight(vtile + r * LDK + 8 * part, x);
        score_detail::load_eight(vtile + r * LDK + 8 * (part + LPR), x + 8);
#pragma unroll
        for (int k = 0; k < 16; ++k) vs = fmaf(x[k], x[k], vs);
      }
#pragma unroll
      for (int o = 1; o < LPR; o <<= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
        dm += __shfl_xor_sync(0xffffffffu, dm, o);
        vs += __shfl_xor_sync(0xffffffffu, vs, o);
      }
      if (part == 0 && j >= s0 && j < p.P) {
        const float norm = sqrtf(ss);
        p.knorm[col0 + j] = norm;
        p.sdot[col0 + j] = dm / fmaxf(norm, 1e-12f);
        if (p.need_v) p.vnorm[col0 + j] = sqrtf(vs);
      }
    }
    if (mma_warp) {
      float acc[8][4];
      score_detail::tile_logits<T, DK / 16, LDK>(qa, tile, lane, acc);
      // Probabilities of the two rows, summed; v[2nt + e] is column 8nt + 2t + e.
      float v[16];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          v[2 * nt + e] = fast_exp2(fmaf(acc[nt][e], p.scale2, -rmax[0])) * rinv[0] +
                          fast_exp2(fmaf(acc[nt][2 + e], p.scale2, -rmax[1])) * rinv[1];
      // Sum over the 8 row pairs (lane bits 2..4) as a reduce-scatter: each step halves the columns
      // a lane carries; at the end lane (g, t) holds columns 8nt + 2t + {0, 1} with nt = g's bits.
      const int b0 = (lane >> 2) & 1, b1 = (lane >> 3) & 1, b2 = (lane >> 4) & 1;
      float w8[8], w4[4], w2[2];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float send = b0 ? v[i] : v[i + 8], keep = b0 ? v[i + 8] : v[i];
        w8[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float send = b1 ? w8[i] : w8[i + 4], keep = b1 ? w8[i + 4] : w8[i];
        w4[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float send = b2 ? w4[i] : w4[i + 2], keep = b2 ? w4[i + 2] : w4[i];
        w2[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
      }
      const int nt = b0 * 4 + b1 * 2 + b2;
      *reinterpret_cast<float2*>(stripcol + warp * kTile + nt * 8 + 2 * t4) = make_float2(w2[0], w2[1]);
    }
    __syncthreads();
    store_raw_importance(p, stripcol, strips_per_head, j0, s0, col0);
  }
}

template <int DK, typename T>
int64_t mma_smem_bytes(bool second) {
  const int64_t ring = int64_t(kStages) * kTile * mma_ldk<DK, T>() * sizeof(T);
  return second ? 2 * ring + (DK + kMmaWarps * kTile) * 4 : ring + kMmaWarps * DK * 4;
}

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32) pass2_kernel(Params<T> p) {
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
    store_raw_importance(p, stripcol, strips_per_head, j0, s0, col0);
  }
}

// Finalize, step 1 (grid b·h × column blocks): pooled A (kept in `scores` for step 2), and per
// block the partial sums, minima and maxima of step 2's statistics. Sums of a signal x are taken
// as Σ(x − x_ref) with x_ref its first valid value, so that mean(x) − min(x) keeps its precision.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads) finalize_stats_kernel(Params<T> p) {
  __shared__ float buf[32];
  const int bh = blockIdx.x, fb = blockIdx.y, b = bh / p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  const int64_t col0 = int64_t(bh) * p.P;
  float* out = p.scores + col0;
  float* imp = p.importance != nullptr ? p.importance + col0 : nullptr;
  const int c_begin = fb * kFinalCols, c_end = min(p.P, c_begin + kFinalCols);
  for (int j = c_begin + threadIdx.x; j < min(s0, c_end); j += blockDim.x) {
    out[j] = -INFINITY;
    if (imp) imp[j] = -INFINITY;
  }
  if (p.P - s0 <= 0) return;
  const float* raw = p.raw_a + col0;
  const int half = p.kernel / 2;
  const bool avg = p.pooling == static_cast<int>(Pooling::avg);
  const float vref = p.need_v ? p.vnorm[col0 + s0] : 0.0f;
  const float kref = p.need_kn ? -p.knorm[col0 + s0] : 0.0f;
  const float dref = p.need_d ? -p.sdot[col0 + s0] : 0.0f;
  float sum_a = 0.0f, vlo = INFINITY, vhi = -INFINITY, vsum = 0.0f, klo = INFINITY, khi = -INFINITY, ksum = 0.0f,
        dlo = INFINITY, dhi = -INFINITY, dsum = 0.0f;
  for (int j = max(s0, c_begin) + threadIdx.x; j < c_end; j += blockDim.x) {
    const int lo = max(s0, j - half), hi = min(p.P - 1, j + half);
    float acc = avg ? 0.0f : -INFINITY;
    for (int u = lo; u <= hi; ++u) acc = avg ? acc + raw[u] : fmaxf(acc, raw[u]);
    const float a = avg ? acc / static_cast<float>(p.kernel) : acc;
    out[j] = a;
    sum_a += a;
    if (p.need_v) {
      const float x = p.vnorm[col0 + j];
      vlo = fminf(vlo, x), vhi = fmaxf(vhi, x), vsum += x - vref;
    }
    if (p.need_kn) {
      const float x = -p.knorm[col0 + j];
      klo = fminf(klo, x), khi = fmaxf(khi, x), ksum += x - kref;
    }
    if (p.need_d) {
      const float x = -p.sdot[col0 + j];
      dlo = fminf(dlo, x), dhi = fmaxf(dhi, x), dsum += x - dref;
    }
  }
  float part[kParts] = {sum_a, vlo, vhi, vsum, klo, khi, ksum, dlo, dhi, dsum};
  part[0] = block_reduce<Op::sum>(part[0], buf);
  if (p.need_v) {
    part[1] = block_reduce<Op::min>(part[1], buf), part[2] = block_reduce<Op::max>(part[2], buf);
    part[3] = block_reduce<Op::sum>(part[3], buf);
  }
  if (p.need_kn) {
    part[4] = block_reduce<Op::min>(part[4], buf), part[5] = block_reduce<Op::max>(part[5], buf);
    part[6] = block_reduce<Op::sum>(part[6], buf);
  }
  if (p.need_d) {
    part[7] = block_reduce<Op::min>(part[7], buf), part[8] = block_reduce<Op::max>(part[8], buf);
    part[9] = block_reduce<Op::sum>(part[9], buf);
  }
  if (threadIdx.x == 0)
    for (int k = 0; k < kParts; ++k) p.fpart[(int64_t(bh) * p.fblocks + fb) * kParts + k] = part[k];
}

// Finalize, step 2 (same grid): every block folds the partials in block order, then mixes its columns.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads) finalize_mix_kernel(Params<T> p) {
  __shared__ float tot[kParts];
  const int bh = blockIdx.x, fb = blockIdx.y, b = bh / p.Hkv, h = bh % p.Hkv;
  const int n = seq_length(p.valid, p.valid_stride, b, p.N), s0 = p.N - n;
  float r = p.ronline[bh];
  if (p.red != nullptr) r = p.red[(p.red_rows == 1 ? 0 : b) * p.red_s0 + h * p.red_s1];
  if (fb == 0 && threadIdx.x == 0 && p.r_out != nullptr) p.r_out[bh] = r;
  const int np = p.P - s0;
  if (np <= 0) return;
  const int fb_first = s0 / kFinalCols;  // blocks before it saw no valid column
  if (threadIdx.x < kParts) {
    const int k = threadIdx.x;
    const bool is_min = k == 1 || k == 4 || k == 7, is_max = k == 2 || k == 5 || k == 8;
    float acc = is_min ? INFINITY : (is_max ? -INFINITY : 0.0f);
    for (int f = fb_first; f < p.fblocks; ++f) {
      const float x = p.fpart[(int64_t(bh) * p.fblocks + f) * kParts + k];
      acc = is_min ? fminf(acc, x) : (is_max ? fmaxf(acc, x) : acc + x);
    }
    tot[k] = acc;
  }
  __syncthreads();
  const int64_t col0 = int64_t(bh) * p.P;
  const float fnp = static_cast<float>(np);
  const float mean_a = tot[0] / fnp;
  // mean of a min-max normalised signal: (mean(x) − lo) / range, mean(x) − lo = Σ(x − x_ref)/np + (x_ref − lo)
  auto factor = [&](float lo, float hi, float sum, float ref, float& range) {
    range = hi - lo + 1e-8f;
    const float mnorm = fmaxf(0.0f, (sum / fnp + (ref - lo)) / range);
    return mean_a / (mnorm + 1e-8f);
  };
  float vrange = 1.0f, krange = 1.0f, drange = 1.0f, fv = 0.0f, fk = 0.0f, fd = 0.0f;
  if (p.need_v) fv = factor(tot[1], tot[2], tot[3], p.vnorm[col0 + s0], vrange);
  if (p.need_kn) fk = factor(tot[4], tot[5], tot[6], -p.knorm[col0 + s0], krange);
  if (p.need_d) fd = factor(tot[7], tot[8], tot[9], -p.sdot[col0 + s0], drange);
  float* out = p.scores + col0;
  float* imp = p.importance != nullptr ? p.importance + col0 : nullptr;
  const int c_end = min(p.P, (fb + 1) * kFinalCols);
  for (int j = max(s0, fb * kFinalCols) + threadIdx.x; j < c_end; j += blockDim.x) {
    const float a = out[j];
    const float vn = p.need_v ? (p.vnorm[col0 + j] - tot[1]) / vrange * fv : 0.0f;
    const float kn = p.need_kn ? (-p.knorm[col0 + j] - tot[4]) / krange * fk : 0.0f;
    const float dv = p.need_d ? (-p.sdot[col0 + j] - tot[7]) / drange * fd : 0.0f;
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
}

// head_redundancy: per-chunk sums of unit keys, then one block per (b, h).
template <typename T>
__global__ void __launch_bounds__(256) unit_sum_kernel(const T* k, int64_t s0k, int64_t s1k, int64_t s2k,
                                                      const int32_t* valid, int64_t valid_stride, int Hkv, int N,
                                                      int D, int chunks, float* partial) {
  extern __shared__ __align__(16) unsigned char smem[];
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

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MIXKV_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MIXKV_CUDA_CHECK(cudaSetDevice(device));
    target_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != target_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int target_ = 0;
};

// Raise a kernel's dynamic shared-memory limit once per device when a launch needs more than 48 KiB.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes, int device, std::atomic<int64_t>* granted) {
  if (bytes <= 48 * 1024) return;
  if (device < 0 || device >= 64) device = 63;
  if (granted[device].load() >= bytes) return;
  int limit = 0;
  MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  require(bytes <= limit, "score: this shape needs ", bytes, " bytes of shared memory per block, the device offers ",
          limit, " (reduce the head dimension or the window)");
  MIXKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  granted[device].store(bytes);
}

bool aligned16(const void* ptr, std::initializer_list<int64_t> strides, int64_t elem) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t s : strides)
    if ((s * elem) % 16 != 0) return false;
  return true;
}

template <typename T>
void launch_combine(const Params<T>& p, const Dims& d, cudaStream_t stream) {
  const unsigned row_blocks = static_cast<unsigned>(cdiv(d.Rp, kReduceThreads / 32));
  combine_kernel<T><<<dim3(static_cast<unsigned>(d.B * d.Hkv), row_blocks + 1), kReduceThreads, 0, stream>>>(p);
  MIXKV_CUDA_CHECK_LAUNCH();
}

template <typename T, int DK>
void launch_passes_mma(const Params<T>& p, const Dims& d, int device, cudaStream_t stream) {
  const int64_t smem1 = mma_smem_bytes<DK, T>(false), smem2 = mma_smem_bytes<DK, T>(true);
  static std::atomic<int64_t> granted1[64];
  static std::atomic<int64_t> granted2[64];
  allow_smem(pass1_mma_kernel<T, DK>, smem1, device, granted1);
  allow_smem(pass2_mma_kernel<T, DK>, smem2, device, granted2);
  const int threads = 32 * static_cast<int>(std::max<int64_t>(kMinWarps, d.strips));
  const unsigned bh = static_cast<unsigned>(d.B * d.Hkv);
  pass1_mma_kernel<T, DK><<<dim3(static_cast<unsigned>(d.chunks1), bh), threads, smem1, stream>>>(p);
  MIXKV_CUDA_CHECK_LAUNCH();
  launch_combine(p, d, stream);
  if (d.chunks2 > 0) {
    pass2_mma_kernel<T, DK><<<dim3(static_cast<unsigned>(d.chunks2), bh), threads, smem2, stream>>>(p);
    MIXKV_CUDA_CHECK_LAUNCH();
  }
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
  p.fpart = reinterpret_cast<float*>(ws + lay.fpart);
  p.B = int(d.B), p.Hkv = int(d.Hkv), p.N = int(d.N), p.W = int(d.W), p.D = int(d.D), p.G = int(d.G);
  p.P = int(d.P), p.Wp = int(d.Wp), p.Rp = int(d.Rp), p.Dp = int(d.Dp), p.tpb = int(d.tpb);
  p.tiles = int(d.tiles), p.chunks1 = int(d.chunks1), p.strips = int(d.strips), p.fblocks = int(d.fblocks);
  p.nwarps = int(std::min<int64_t>(kMaxWarps, std::max<int64_t>(kMinWarps, d.strips)));
  p.ldk = int(d.Dp + (sizeof(T) == 4 ? 4 : 8));
  p.method = static_cast<int>(o.method);
  p.pooling = static_cast<int>(o.pooling);
  p.kernel = o.kernel_size;
  p.gqa = static_cast<int>(o.gqa);
  p.scale = o.scale > 0.0f ? o.scale : 1.0f / std::sqrt(static_cast<float>(d.D));
  p.scale2 = p.scale * 1.4426950408889634f;
  p.vec_k = aligned16(k.data, {k.stride[0], k.stride[1], k.stride[2], d.D}, sizeof(T));
  p.need_v = o.method == Method::vnorm || o.method == Method::uniform_mix || o.method == Method::mixkv;
  p.need_kn = o.method == Method::knorm;
  p.need_d = o.method == Method::keydiff || o.method == Method::uniform_mix || o.method == Method::mixkv;
  require(int64_t(d.Rp) * d.chunks1 < (int64_t(1) << 31), "score: shape too large");

  const unsigned bh = static_cast<unsigned>(d.B * d.Hkv);
  const bool vec_v = aligned16(v.data, {v.stride[0], v.stride[1], v.stride[2], d.D}, sizeof(T));
  bool done = false;
  if constexpr (!std::is_same_v<T, float>) {
    if (p.vec_k && (vec_v || !p.need_v) && d.strips <= kMmaWarps) {
      if (d.D <= 64) {
        launch_passes_mma<T, 64>(p, d, k.device_id, stream);
      } else if (d.D <= 128) {
        launch_passes_mma<T, 128>(p, d, k.device_id, stream);
      } else {
        launch_passes_mma<T, 256>(p, d, k.device_id, stream);
      }
      done = true;
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
    pass1_kernel<T><<<dim3(static_cast<unsigned>(d.chunks1), bh), threads, smem1, stream>>>(p);
    MIXKV_CUDA_CHECK_LAUNCH();
    launch_combine(p, d, stream);
    if (d.chunks2 > 0) {
      pass2_kernel<T><<<dim3(static_cast<unsigned>(d.chunks2), bh), threads, smem2, stream>>>(p);
      MIXKV_CUDA_CHECK_LAUNCH();
    }
  }
  const dim3 fgrid(bh, static_cast<unsigned>(d.fblocks));
  finalize_stats_kernel<T><<<fgrid, kFinalThreads, 0, stream>>>(p);
  MIXKV_CUDA_CHECK_LAUNCH();
  finalize_mix_kernel<T><<<fgrid, kFinalThreads, 0, stream>>>(p);
  MIXKV_CUDA_CHECK_LAUNCH();
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
  DeviceGuard guard(keys.device_id);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  MIXKV_DISPATCH_FLOAT(keys.dtype, "score", [&] {
    launch_score<scalar_t>(q_window, keys, values, valid_lengths, redundancy, options, scores, importance,
                           redundancy_out, workspace, s);
  });
}

void head_redundancy(const Tensor& keys, const Tensor& valid_lengths, const Tensor& out, const Tensor& workspace,
                     std::uintptr_t stream) {
  require(keys.is_cuda(), "head_redundancy: the CUDA path needs CUDA tensors");
  DeviceGuard guard(keys.device_id);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  MIXKV_DISPATCH_FLOAT(keys.dtype, "head_redundancy",
                       [&] { launch_redundancy<scalar_t>(keys, valid_lengths, out, workspace, s); });
}

}  // namespace cuda

}  // namespace mixkv
