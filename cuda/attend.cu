// CUDA decode attention over the varlen store (split-K, flash-decoding style).
//
// Grid (split, segment, row tile). A block of 128 threads handles the tokens
// [split * chunk, min((split + 1) * chunk, length)) of one segment for up to R query rows of its
// GQA group (row = g * T + t), so K and V are read once for the whole group. K and V stream through
// shared memory in tiles of `tok` tokens, kStages deep (cp.async, zero-filled past the split), so
// that several tiles of loads are in flight while one is consumed. Inside the block, a lane group
// of LPT lanes (a power of two) owns U tokens of every tile; each lane holds VPL vectors of EPV
// elements of the head dimension. Each lane group keeps an online softmax (running max m, sum l,
// accumulator acc) per row in registers, updated once per tile (base-2 exponent; q, scaled by
// scale * log2(e), sits in shared memory); groups are merged by warp shuffles, warps through shared
// memory. With one split the block writes the output; otherwise it writes (m, l, acc) to the
// workspace and a combine kernel merges the splits of every query row.
//
// The split size is chosen on the host from the work (total tokens over all segments, when the
// caller knows it, else segments * max_length) so that the grid is about kWaves waves of
// kBlocksPerSM blocks per multiprocessor, never finer than attend_split_tokens (which bounds the
// workspace).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "attend_async.cuh"
#include "cuda_check.cuh"
#include "sm_count.cuh"
#include "device_guard.cuh"
#include "dtype.cuh"
#include "load_part.cuh"
#include "mixkv/attend.hpp"
#include "mixkv/error.hpp"

namespace mixkv::cuda {

namespace {

using cuda_detail::cp_async_16;
using cuda_detail::cp_async_commit;
using cuda_detail::cp_async_wait;
using cuda_detail::from_float;
using cuda_detail::load_smem_part;
using cuda_detail::to_float;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;
constexpr int kMaxSplits = 512;  // attend_split_tokens guarantees at most this many splits
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr int kCombineCols = 128;  // head-dimension columns per pass of the combine kernel
constexpr int kBlocksPerSM = 4;    // resident split blocks per multiprocessor (shared memory bound)
constexpr int kWaves = 1;          // target grid size, in waves of resident blocks (1 measured best at 32k)
constexpr int kGranule = 64;       // split sizes are multiples of this
constexpr size_t kMaxSmem = 96 * 1024;  // dynamic shared memory limit requested for the split kernel
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const void* q;
  int64_t qs0, qs1, qs2;  // element strides of q dims 0..2
  const void* k;
  const void* v;
  const int32_t* offsets;
  const int32_t* lengths;
  void* out;
  int64_t os0, os1, os2;
  float* ws_acc;  // [rows_total, splits, D]
  float* ws_ml;   // [rows_total, splits, 2]
  int Hq, Hkv, G, T, D, rows, chunk, splits, lpt, vpr, tok;
  float scale_log2;
};

// Merge weights of two partial softmax states; an empty side has m = -inf and l = acc = 0.
__device__ __forceinline__ void merge_weights(float m, float m2, float& w1, float& w2, float& mnew) {
  mnew = fmaxf(m, m2);
  if (mnew == -INFINITY) {
    w1 = 0.0f;
    w2 = 0.0f;
  } else {
    w1 = exp2f(m - mnew);
    w2 = exp2f(m2 - mnew);
  }
}

// Bytes of dynamic shared memory of the split kernel: K/V stages (reused by the warp merge at the
// end, which needs kWarps * (D + 2) floats, less than the stages hold), then the q rows.
__host__ __device__ inline size_t split_stage_bytes(int tok, int D, int es) {
  return (static_cast<size_t>(kStages) * 2 * tok * D * es + 15) / 16 * 16;
}
size_t split_smem_bytes(int tok, int D, int es, int R) {
  return split_stage_bytes(tok, D, es) + static_cast<size_t>(R) * D * sizeof(float);
}

// Query values per lane (R rows x VPL vectors x EPV elements); up to 32 they stay in registers for
// the whole tile loop and the kernel is held to kBlocksPerSM resident blocks' worth of registers.
constexpr bool q_in_registers(int epv, int vpl, int r) { return r * vpl * epv <= 32; }

template <typename scalar_t, int EPV, int VPL, int R, int U>
__global__ void __launch_bounds__(kThreads, q_in_registers(EPV, VPL, R) ? kBlocksPerSM : 1)
    attend_split_kernel(Params p) {
  constexpr bool kVec = EPV * sizeof(scalar_t) == 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int split = blockIdx.x;
  const int s = blockIdx.y;
  const int tile = blockIdx.z;
  const int b = s / p.Hkv, h = s - (s / p.Hkv) * p.Hkv;
  const int len = max(p.lengths[s], 0);
  const int start = split * p.chunk;
  if (split > 0 && start >= len) return;  // whole block: nothing of this segment here
  const int end = min(start + p.chunk, len);
  const int D = p.D, tok = p.tok, vpr = p.vpr, lpt = p.lpt;
  const int ntiles = end > start ? (end - start + tok - 1) / tok : 0;
  const int row0 = tile * R;
  const int nrows = min(R, p.rows - row0);
  const int gid = threadIdx.x / lpt;
  const int glane = threadIdx.x - gid * lpt;
  const int ngroups = kThreads / lpt;

  scalar_t* kv_s = reinterpret_cast<scalar_t*>(smem_raw);
  const size_t stage_elems = static_cast<size_t>(2) * tok * D;
  float* q_s = reinterpret_cast<float*>(smem_raw + split_stage_bytes(tok, D, sizeof(scalar_t)));
  float* sm_acc = reinterpret_cast<float*>(smem_raw);  // after the tile loop only
  float* sm_m = sm_acc + kWarps * D;
  float* sm_l = sm_m + kWarps;

  const int64_t seg_base = static_cast<int64_t>(p.offsets[s]) * D;
  const scalar_t* kseg = static_cast<const scalar_t*>(p.k) + seg_base;
  const scalar_t* vseg = static_cast<const scalar_t*>(p.v) + seg_base;

  // Copy slot c = threadIdx.x + n * kThreads of a tile is (token c / vpr, vector c % vpr); the
  // indices advance by additions only.
  const int c_tt0 = threadIdx.x / vpr;
  const int c_cv0 = threadIdx.x - c_tt0 * vpr;
  const int c_dtt = kThreads / vpr;
  const int c_dcv = kThreads - c_dtt * vpr;

  // Tile i of this split -> stage st: K rows [0, tok), then V rows [0, tok); rows past `end` are zeros.
  auto issue = [&](int i, int st) {
    const int j0 = start + i * tok;
    scalar_t* ks = kv_s + st * stage_elems;
    scalar_t* vs = ks + static_cast<size_t>(tok) * D;
    if constexpr (kVec) {
      const int rem = end - j0;  // tokens of this tile that exist
      const scalar_t* kt = kseg + static_cast<int64_t>(j0) * D;
      const scalar_t* vt = vseg + static_cast<int64_t>(j0) * D;
      int tt = c_tt0, cv = c_cv0;
#pragma unroll 4
      for (; tt < tok; ) {
        const int off = tt * D + cv * EPV;
        const bool ok = tt < rem;
        cp_async_16(ks + off, ok ? kt + off : kseg, ok);
        cp_async_16(vs + off, ok ? vt + off : vseg, ok);
        tt += c_dtt;
        cv += c_dcv;
        if (cv >= vpr) {
          cv -= vpr;
          ++tt;
        }
      }
    } else {
      const scalar_t zero = from_float<scalar_t>(0.0f);
      const int n = tok * D;
      for (int c = threadIdx.x; c < n; c += kThreads) {
        const int tt = c / D;
        const bool ok = j0 + tt < end;
        scalar_t kx = zero, vx = zero;
        if (ok) {
          const int64_t g = static_cast<int64_t>(j0 + tt) * D + (c - tt * D);
          kx = kseg[g];
          vx = vseg[g];
        }
        ks[c] = kx;
        vs[c] = vx;
      }
    }
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < ntiles) issue(i, i);
    cp_async_commit();
  }

  // The R query rows (scaled, fp32) in shared memory [R][D]; rows past nrows are zeros. Made
  // visible by the first barrier of the tile loop (nothing reads them when there is no tile).
  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  int vis[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int t = r < nrows ? (row0 + r) % p.T : 0;
    vis[r] = r < nrows ? min(max(len - p.T + t + 1, 0), len) : 0;
  }
  for (int i = threadIdx.x; i < R * D; i += kThreads) {
    const int r = i / D, d = i - (i / D) * D;
    float val = 0.0f;
    if (r < nrows) {
      const int row = row0 + r;
      const int g = row / p.T, t = row - (row / p.T) * p.T;
      const int qh = h * p.G + g;
      val = to_float(q[b * p.qs0 + qh * p.qs1 + t * p.qs2 + d]) * p.scale_log2;
    }
    q_s[i] = val;
  }

  // Tokens from `mask_from` on need masking (past the split, or not visible to some row).
  int mask_from = end;
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (r < nrows) mask_from = min(mask_from, vis[r]);

  // This lane's vectors of the head dimension; lanes past the row (vec >= vpr, only when vpr is
  // not a power of two) read the last vector again and see a zero query, so they add nothing.
  int voff[VPL];
#pragma unroll
  for (int k = 0; k < VPL; ++k) voff[k] = min(glane + k * lpt, vpr - 1) * EPV;

  // With few enough query values per lane, they live in registers for the whole loop.
  constexpr bool kQReg = q_in_registers(EPV, VPL, R);
  float qreg[kQReg ? R : 1][VPL][EPV];
  if constexpr (kQReg) {
    __syncthreads();  // q_s is written
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const bool on = glane + k * lpt < vpr;
#pragma unroll
        for (int e = 0; e < EPV; ++e) qreg[r][k][e] = on ? q_s[r * D + voff[k] + e] : 0.0f;
      }
  }

  float m[R], l[R], acc[R][VPL][EPV];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int k = 0; k < VPL; ++k)
#pragma unroll
      for (int e = 0; e < EPV; ++e) acc[r][k][e] = 0.0f;
  }

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `it` is in shared memory; every thread is done with tile it - 1
    {
      const int nx = it + kStages - 1;
      if (nx < ntiles) issue(nx, nx % kStages);
      cp_async_commit();
    }
    const scalar_t* ks = kv_s + (it % kStages) * stage_elems;
    const scalar_t* vs = ks + static_cast<size_t>(tok) * D;
    const int j0 = start + it * tok;

    // scores of this group's U tokens for the R rows
    float sc[R][U];
    {
      float kf[U][VPL][EPV];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tt = u * ngroups + gid;
#pragma unroll
        for (int k = 0; k < VPL; ++k) load_smem_part<scalar_t, EPV>(ks + tt * D + voff[k], kf[u][k]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int u = 0; u < U; ++u) sc[r][u] = 0.0f;
#pragma unroll
        for (int k = 0; k < VPL; ++k) {
          float qv[EPV];
          if constexpr (kQReg) {
#pragma unroll
            for (int e = 0; e < EPV; ++e) qv[e] = qreg[r][k][e];
          } else {
            const bool on = glane + k * lpt < vpr;
            const float* qp = q_s + r * D + voff[k];
            if constexpr (EPV % 4 == 0) {
#pragma unroll
              for (int e = 0; e < EPV; e += 4) {
                const float4 q4 = *reinterpret_cast<const float4*>(qp + e);
                qv[e] = on ? q4.x : 0.0f;
                qv[e + 1] = on ? q4.y : 0.0f;
                qv[e + 2] = on ? q4.z : 0.0f;
                qv[e + 3] = on ? q4.w : 0.0f;
              }
            } else {
#pragma unroll
              for (int e = 0; e < EPV; ++e) qv[e] = on ? qp[e] : 0.0f;
            }
          }
#pragma unroll
          for (int u = 0; u < U; ++u)
#pragma unroll
            for (int e = 0; e < EPV; ++e) sc[r][u] = fmaf(qv[e], kf[u][k][e], sc[r][u]);
        }
      }
    }
    // every lane of the warp takes part (the trip count is block-uniform)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      if (o < lpt) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int u = 0; u < U; ++u) sc[r][u] += __shfl_xor_sync(0xffffffffu, sc[r][u], o);
      }
    }
    if (j0 + tok > mask_from) {  // block-uniform: only the last tiles of a split or of the causal window
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + u * ngroups + gid;
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (j >= end || j >= vis[r]) sc[r][u] = -INFINITY;
      }
    }

    float vf[U][VPL][EPV];  // zeros past the split (zero-filled), so finite everywhere
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tt = u * ngroups + gid;
#pragma unroll
      for (int k = 0; k < VPL; ++k) load_smem_part<scalar_t, EPV>(vs + tt * D + voff[k], vf[u][k]);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mt = sc[r][0];
#pragma unroll
      for (int u = 1; u < U; ++u) mt = fmaxf(mt, sc[r][u]);
      const float mnew = fmaxf(m[r], mt);
      const float msafe = mnew == -INFINITY ? 0.0f : mnew;
      if (mnew > m[r]) {  // otherwise the correction factor is exactly 1
        const float corr = exp2f(m[r] - msafe);  // 0 while m is -inf
        l[r] *= corr;
#pragma unroll
        for (int k = 0; k < VPL; ++k)
#pragma unroll
          for (int e = 0; e < EPV; ++e) acc[r][k][e] *= corr;
        m[r] = mnew;
      }
      float pu[U];
      float psum = 0.0f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pu[u] = exp2f(sc[r][u] - msafe);  // 0 for masked tokens
        psum += pu[u];
      }
      l[r] += psum;
#pragma unroll
      for (int k = 0; k < VPL; ++k)
#pragma unroll
        for (int e = 0; e < EPV; ++e) {
          float a = acc[r][k][e];
#pragma unroll
          for (int u = 0; u < U; ++u) a = fmaf(pu[u], vf[u][k][e], a);
          acc[r][k][e] = a;
        }
    }
  }
  // Merge the lane groups of each warp: lanes with equal glane hold the same slice of D.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int o = lpt; o < 32; o <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], o);
      float w1, w2, mnew;
      merge_weights(m[r], m2, w1, w2, mnew);
      l[r] = l[r] * w1 + l2 * w2;
#pragma unroll
      for (int k = 0; k < VPL; ++k)
#pragma unroll
        for (int e = 0; e < EPV; ++e) {
          const float a2 = __shfl_xor_sync(0xffffffffu, acc[r][k][e], o);
          acc[r][k][e] = acc[r][k][e] * w1 + a2 * w2;
        }
      m[r] = mnew;
    }
  }

  // Merge the warps through shared memory, one row at a time, and write the result.
  __syncthreads();  // the stages are free again: every thread is done with the last tile
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows_total_base = (static_cast<int64_t>(b) * p.Hq) * p.T;  // row index of (b, qh = 0, t = 0)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= nrows) break;  // block-uniform
    if (lane < lpt) {
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int vec = lane + k * lpt;
        if (vec < vpr)
#pragma unroll
          for (int e = 0; e < EPV; ++e) sm_acc[warp * D + vec * EPV + e] = acc[r][k][e];
      }
      if (lane == 0) {
        sm_m[warp] = m[r];
        sm_l[warp] = l[r];
      }
    }
    __syncthreads();
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, sm_m[w]);
    float wt[kWarps];
    float lsum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      wt[w] = mm == -INFINITY ? 0.0f : exp2f(sm_m[w] - mm);
      lsum += sm_l[w] * wt[w];
    }
    const int row = row0 + r;
    const int g = row / p.T, t = row - (row / p.T) * p.T;
    const int qh = h * p.G + g;
    if (p.splits == 1) {
      scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.os0 + qh * p.os1 + t * p.os2;
      const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
      for (int d = threadIdx.x; d < D; d += kThreads) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) a = fmaf(sm_acc[w * D + d], wt[w], a);
        out[d] = from_float<scalar_t>(a * inv);
      }
    } else {
      const int64_t slot = (rows_total_base + static_cast<int64_t>(qh) * p.T + t) * p.splits + split;
      for (int d = threadIdx.x; d < D; d += kThreads) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) a = fmaf(sm_acc[w * D + d], wt[w], a);
        p.ws_acc[slot * D + d] = a;
      }
      if (threadIdx.x == 0) {
        p.ws_ml[slot * 2] = mm;
        p.ws_ml[slot * 2 + 1] = lsum;
      }
    }
    __syncthreads();  // shared memory is reused by the next row
  }
}

// Block-wide reduction over kCombineThreads threads (max when `take_max`, else sum); `red` holds
// kCombineWarps floats. Every thread gets the result.
__device__ __forceinline__ float block_reduce(float x, bool take_max, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = take_max ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `red` may still be read by an earlier reduction
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = red[0];
#pragma unroll
  for (int w = 1; w < kCombineWarps; ++w) x = take_max ? fmaxf(x, red[w]) : x + red[w];
  return x;
}

// One block per query row (b, qh, t): merges the partials of the splits that cover its segment.
// Warps take the splits in turn, lanes the columns; the warps' sums meet in shared memory.
template <typename scalar_t>
__global__ void __launch_bounds__(kCombineThreads) attend_combine_kernel(Params p) {
  __shared__ float w[kMaxSplits];
  __shared__ float red[kCombineWarps];
  __shared__ float part[kCombineWarps][kCombineCols];
  const int64_t row = blockIdx.x;  // ((b * Hq + qh) * T + t)
  const int t = static_cast<int>(row % p.T);
  const int64_t bq = row / p.T;
  const int qh = static_cast<int>(bq % p.Hq);
  const int b = static_cast<int>(bq / p.Hq);
  const int s = b * p.Hkv + qh / p.G;
  const int len = max(p.lengths[s], 0);
  const int nsplit = min(p.splits, (len + p.chunk - 1) / p.chunk);
  const float* ml = p.ws_ml + row * p.splits * 2;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < nsplit; i += kCombineThreads) mx = fmaxf(mx, ml[i * 2]);
  mx = block_reduce(mx, true, red);
  float ls = 0.0f;
  for (int i = threadIdx.x; i < nsplit; i += kCombineThreads) {
    const float wi = mx == -INFINITY ? 0.0f : exp2f(ml[i * 2] - mx);
    w[i] = wi;
    ls = fmaf(ml[i * 2 + 1], wi, ls);
  }
  ls = block_reduce(ls, false, red);  // its barriers also publish w
  const float inv = ls > 0.0f ? 1.0f / ls : 0.0f;
  const float* acc = p.ws_acc + row * p.splits * p.D;
  scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.os0 + qh * p.os1 + t * p.os2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kPer = kCombineCols / 32;
  for (int d0 = 0; d0 < p.D; d0 += kCombineCols) {
    float a[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) a[k] = 0.0f;
#pragma unroll 4
    for (int i = warp; i < nsplit; i += kCombineWarps) {
      const float wi = w[i];
      const float* src = acc + static_cast<int64_t>(i) * p.D + d0;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int d = lane + 32 * k;
        if (d0 + d < p.D) a[k] = fmaf(src[d], wi, a[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) part[warp][lane + 32 * k] = a[k];
    __syncthreads();
    for (int d = threadIdx.x; d < kCombineCols && d0 + d < p.D; d += kCombineThreads) {
      float x = 0.0f;
#pragma unroll
      for (int wv = 0; wv < kCombineWarps; ++wv) x += part[wv][d];
      out[d0 + d] = from_float<scalar_t>(x * inv);
    }
    __syncthreads();  // part is reused by the next pass
  }
}

int next_pow2(int x) {
  int v = 1;
  while (v < x) v <<= 1;
  return v;
}

// Grid target of the split policy in blocks per multiprocessor (kWaves * kBlocksPerSM). A tuning
// knob for benchmarks only: MIXKV_ATTEND_BLOCKS_PER_SM=<n> (1..64) overrides it; read once per
// process. Any value gives the same result.
int64_t target_blocks_per_sm() {
  static const int64_t value = [] {
    const char* env = std::getenv("MIXKV_ATTEND_BLOCKS_PER_SM");
    if (env != nullptr) {
      const long v = std::strtol(env, nullptr, 10);
      if (v >= 1 && v <= 64) return static_cast<int64_t>(v);
    }
    return static_cast<int64_t>(kWaves) * kBlocksPerSM;
  }();
  return value;
}

template <typename scalar_t, int EPV, int VPL, int R, int U>
void launch_split(int device, const Params& p, dim3 grid, size_t smem, cudaStream_t st) {
  auto kernel = attend_split_kernel<scalar_t, EPV, VPL, R, U>;
  if (smem > 48 * 1024) {
    // once per device (the attribute is per function and device context)
    static std::atomic<unsigned long long> raised{0};
    const unsigned long long bit = device >= 0 && device < 64 ? 1ull << device : 0;
    if (bit == 0 || !(raised.load(std::memory_order_relaxed) & bit)) {
      MIXKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kMaxSmem)));
      raised.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  kernel<<<grid, kThreads, smem, st>>>(p);
  MIXKV_CUDA_CHECK_LAUNCH();
}

template <typename scalar_t, int EPV, int R>
void launch_vpl(int device, int vpl, const Params& p, dim3 grid, size_t smem, cudaStream_t st) {
  if constexpr (EPV == 1) {
    launch_split<scalar_t, 1, 8, R, 2>(device, p, grid, smem, st);
    (void)vpl;
  } else {
    switch (vpl) {
      case 1: launch_split<scalar_t, EPV, 1, R, 4>(device, p, grid, smem, st); break;
      case 2: launch_split<scalar_t, EPV, 2, R, 2>(device, p, grid, smem, st); break;
      default: launch_split<scalar_t, EPV, 4, R, 1>(device, p, grid, smem, st); break;
    }
  }
}

template <typename scalar_t, int EPV>
void launch_rows(int device, int vpl, int rtile, const Params& p, dim3 grid, size_t smem, cudaStream_t st) {
  switch (rtile) {
    case 2: launch_vpl<scalar_t, EPV, 2>(device, vpl, p, grid, smem, st); break;
    case 4: launch_vpl<scalar_t, EPV, 4>(device, vpl, p, grid, smem, st); break;
    default: launch_vpl<scalar_t, EPV, 8>(device, vpl, p, grid, smem, st); break;
  }
}

}  // namespace

void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, int64_t max_length, float scale, const Tensor& out,
            const Tensor& workspace, std::uintptr_t stream, int64_t total_length) {
  const int64_t B = q.shape[0], Hq = q.shape[1], T = q.shape[2], D = q.shape[3];
  const int64_t S = offsets.shape[0], Hkv = S / B, G = Hq / Hkv;
  if (B * Hq * T == 0 || D == 0) return;
  require(S <= 65535, "attend: at most 65535 segments (B * Hkv) per call, got ", S);
  require(B * Hq * T <= 2147483647LL && G * T <= 65535LL * 8, "attend: too many query rows");
  require(max_length <= 2147483647LL, "attend: max_length must fit in int32");
  const cuda_detail::DeviceGuard guard(q.device_id);
  const int es = dtype_size(q.dtype);
  const bool vec = (D * es) % 16 == 0 && reinterpret_cast<uintptr_t>(k_buf.data) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(v_buf.data) % 16 == 0;
  const int epv = vec ? 16 / es : 1;
  const int vpr = static_cast<int>(D / epv);
  const int lpt = std::min(32, next_pow2(vpr));
  int vpl = (vpr + lpt - 1) / lpt;
  int units = 2;  // tokens per lane group per tile
  if (vec) {
    require(vpl <= 4, "attend: head_dim ", D, " is too large for the CUDA kernel (at most ", 4 * 32 * epv, ")");
    vpl = vpl <= 1 ? 1 : (vpl <= 2 ? 2 : 4);
    units = 4 / vpl;
  } else {
    require(vpl <= 8, "attend: head_dim ", D, " must be a multiple of ", 16 / es,
            " or at most 256 for the CUDA kernel");
  }
  const int64_t rows = G * T;
  const int rtile = rows <= 2 ? 2 : (rows <= 4 ? 4 : 8);
  const int64_t row_tiles = (rows + rtile - 1) / rtile;
  const int tok = (kThreads / lpt) * units;

  // Split size: about kWaves waves of resident blocks for the whole work, never finer than the
  // workspace allows.
  int64_t chunk = attend_split_tokens(B * Hq * T, max_length);
  if (max_length > 0) {
    const int64_t bound = S * max_length;
    const int64_t total = total_length >= 0 ? std::min(total_length, bound) : bound;
    const int64_t target = static_cast<int64_t>(cuda_detail::sm_count(q.device_id)) * target_blocks_per_sm();
    const int64_t want = (total * row_tiles + target - 1) / target;
    chunk = std::max(chunk, (want + kGranule - 1) / kGranule * kGranule);
  }
  const int64_t splits = max_length <= 0 ? 1 : (max_length + chunk - 1) / chunk;
  require(splits <= kMaxSplits && chunk <= 2147483647LL, "attend: internal split count exceeds its bound");

  Params p{};
  p.q = q.data;
  p.qs0 = q.stride[0];
  p.qs1 = q.stride[1];
  p.qs2 = q.stride[2];
  p.k = k_buf.data;
  p.v = v_buf.data;
  p.offsets = offsets.ptr<int32_t>();
  p.lengths = lengths.ptr<int32_t>();
  p.out = out.data;
  p.os0 = out.stride[0];
  p.os1 = out.stride[1];
  p.os2 = out.stride[2];
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.G = static_cast<int>(G);
  p.T = static_cast<int>(T);
  p.D = static_cast<int>(D);
  p.rows = static_cast<int>(rows);
  p.chunk = static_cast<int>(chunk);
  p.splits = static_cast<int>(splits);
  p.lpt = lpt;
  p.vpr = vpr;
  p.tok = tok;
  p.scale_log2 = (scale == 0.0f ? 1.0f / std::sqrt(static_cast<float>(D)) : scale) * kLog2e;
  if (splits > 1) {
    float* ws = static_cast<float*>(workspace.data);
    p.ws_acc = ws;
    p.ws_ml = ws + B * Hq * T * splits * D;
  }
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(S), static_cast<unsigned>(row_tiles));
  const size_t smem = split_smem_bytes(tok, static_cast<int>(D), es, rtile);
  require(smem <= kMaxSmem, "attend: head_dim ", D, " needs too much shared memory");
  auto st = reinterpret_cast<cudaStream_t>(stream);
  MIXKV_DISPATCH_FLOAT(q.dtype, "attend", [&] {
    if (vec) {
      launch_rows<scalar_t, 16 / sizeof(scalar_t)>(q.device_id, vpl, rtile, p, grid, smem, st);
    } else {
      launch_rows<scalar_t, 1>(q.device_id, vpl, rtile, p, grid, smem, st);
    }
    if (splits > 1) {
      attend_combine_kernel<scalar_t><<<static_cast<unsigned>(B * Hq * T), kCombineThreads, 0, st>>>(p);
      MIXKV_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace mixkv::cuda
