// CUDA decode attention over the varlen store (split-K, flash-decoding style).
//
// Grid (split, segment, row tile). A block of 128 threads handles the tokens
// [split * chunk, min((split + 1) * chunk, length)) of one segment for up to R query rows of
// its GQA group (row = g * T + t), so K and V are read once for the whole group. Inside the
// block, a lane group of LPT lanes (a power of two) owns one token at a time; each lane holds
// VPL vectors of EPV elements of the head dimension (16-byte loads when aligned). Each lane
// group keeps an online softmax (running max m, sum l, accumulator acc) per row in registers
// (base-2 exponent; q, scaled by scale * log2(e), sits in shared memory); groups are merged by warp shuffles, warps
// through shared memory. With one split the block writes the output; otherwise it writes
// (m, l, acc) to the workspace and a combine kernel merges the splits of every query row.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda_check.cuh"
#include "device_guard.cuh"
#include "dtype.cuh"
#include "mixkv/attend.hpp"
#include "mixkv/error.hpp"

namespace mixkv::cuda {

namespace {

using cuda_detail::from_float;
using cuda_detail::to_float;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 128;  // attend_split_tokens guarantees at most this many splits
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
  float* ws_ml;   // [rows_total, splits, 2]
  float* ws_acc;  // [rows_total, splits, D]
  int Hq, Hkv, G, T, D, rows, chunk, splits, lpt;
  float scale_log2;
};

template <typename scalar_t, int EPV>
__device__ __forceinline__ void load_row_part(const scalar_t* p, float (&out)[EPV]) {
  if constexpr (EPV * sizeof(scalar_t) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int i = 0; i < EPV; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < EPV; ++i) out[i] = to_float(p[i]);
  }
}

// Merge (m2, l2, acc2) into (m, l, acc); an empty side has m = -inf and l = acc = 0.
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

template <typename scalar_t, int EPV, int VPL, int R>
__global__ void __launch_bounds__(kThreads) attend_split_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];  // q [R][D], warp accumulators [kWarps][D], m [kWarps], l [kWarps]
  const int split = blockIdx.x;
  const int s = blockIdx.y;
  const int tile = blockIdx.z;
  const int b = s / p.Hkv, h = s - (s / p.Hkv) * p.Hkv;
  const int len = max(p.lengths[s], 0);
  const int start = split * p.chunk;
  if (split > 0 && start >= len) return;  // whole block: nothing of this segment here
  const int end = min(start + p.chunk, len);
  const int row0 = tile * R;
  const int nrows = min(R, p.rows - row0);
  const int lpt = p.lpt;
  const int gid = threadIdx.x / lpt;
  const int glane = threadIdx.x - gid * lpt;
  const int ngroups = kThreads / lpt;
  const int vpr = p.D / EPV;  // vectors per row
  const scalar_t* q = static_cast<const scalar_t*>(p.q);

  // The R query rows (scaled, fp32) live in shared memory: [R][D]. Rows past nrows are zeros.
  float* q_s = smem;
  int vis[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    const int t = r < nrows ? row % p.T : 0;
    vis[r] = r < nrows ? min(max(len - p.T + t + 1, 0), len) : 0;
  }
  for (int i = threadIdx.x; i < R * p.D; i += kThreads) {
    const int r = i / p.D, d = i - (i / p.D) * p.D;
    float val = 0.0f;
    if (r < nrows) {
      const int row = row0 + r;
      const int g = row / p.T, t = row - (row / p.T) * p.T;
      const int qh = h * p.G + g;
      val = to_float(q[b * p.qs0 + qh * p.qs1 + t * p.qs2 + d]) * p.scale_log2;
    }
    q_s[i] = val;
  }
  __syncthreads();

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

  const int64_t seg_base = static_cast<int64_t>(p.offsets[s]) * p.D;
  const scalar_t* kseg = static_cast<const scalar_t*>(p.k) + seg_base;
  const scalar_t* vseg = static_cast<const scalar_t*>(p.v) + seg_base;

  // Two tokens per lane group per iteration: all four loads are issued before any use.
  for (int j0 = start; j0 < end; j0 += 2 * ngroups) {
    float kf[2][VPL][EPV], vf[2][VPL][EPV];
    int jj[2] = {j0 + gid, j0 + ngroups + gid};
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int k = 0; k < VPL; ++k) {
        const int vec = glane + k * lpt;
        if (jj[u] < end && vec < vpr) {
          load_row_part<scalar_t, EPV>(kseg + static_cast<int64_t>(jj[u]) * p.D + vec * EPV, kf[u][k]);
          load_row_part<scalar_t, EPV>(vseg + static_cast<int64_t>(jj[u]) * p.D + vec * EPV, vf[u][k]);
        } else {
#pragma unroll
          for (int e = 0; e < EPV; ++e) kf[u][k][e] = vf[u][k][e] = 0.0f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int j = jj[u];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < VPL; ++k) {
          const int vec = glane + k * lpt;
          if (vec < vpr) {
            const float* qv = q_s + r * p.D + vec * EPV;
            if constexpr (EPV % 4 == 0) {
#pragma unroll
              for (int e = 0; e < EPV; e += 4) {
                const float4 q4 = *reinterpret_cast<const float4*>(qv + e);
                dot = fmaf(q4.x, kf[u][k][e], dot);
                dot = fmaf(q4.y, kf[u][k][e + 1], dot);
                dot = fmaf(q4.z, kf[u][k][e + 2], dot);
                dot = fmaf(q4.w, kf[u][k][e + 3], dot);
              }
            } else {
#pragma unroll
              for (int e = 0; e < EPV; ++e) dot = fmaf(qv[e], kf[u][k][e], dot);
            }
          }
        }
        // every lane of the warp takes part (the loop trip count is block-uniform)
        for (int o = lpt >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (j < end && j < vis[r]) {
          const float mnew = fmaxf(m[r], dot);
          const float corr = exp2f(m[r] - mnew);  // 0 when m was -inf
          const float pj = exp2f(dot - mnew);
          l[r] = l[r] * corr + pj;
#pragma unroll
          for (int k = 0; k < VPL; ++k)
#pragma unroll
            for (int e = 0; e < EPV; ++e) acc[r][k][e] = fmaf(pj, vf[u][k][e], acc[r][k][e] * corr);
          m[r] = mnew;
        }
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
  float* sm_acc = smem + R * p.D;
  float* sm_m = sm_acc + kWarps * p.D;
  float* sm_l = sm_m + kWarps;
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
          for (int e = 0; e < EPV; ++e) sm_acc[warp * p.D + vec * EPV + e] = acc[r][k][e];
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
      for (int d = threadIdx.x; d < p.D; d += kThreads) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) a = fmaf(sm_acc[w * p.D + d], wt[w], a);
        out[d] = from_float<scalar_t>(a * inv);
      }
    } else {
      const int64_t slot = (rows_total_base + static_cast<int64_t>(qh) * p.T + t) * p.splits + split;
      for (int d = threadIdx.x; d < p.D; d += kThreads) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) a = fmaf(sm_acc[w * p.D + d], wt[w], a);
        p.ws_acc[slot * p.D + d] = a;
      }
      if (threadIdx.x == 0) {
        p.ws_ml[slot * 2] = mm;
        p.ws_ml[slot * 2 + 1] = lsum;
      }
    }
    __syncthreads();  // shared memory is reused by the next row
  }
}

// One block per query row (b, qh, t): merges the partials of the splits that cover its segment.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) attend_combine_kernel(Params p) {
  __shared__ float w[kMaxSplits];
  __shared__ float lw[kMaxSplits];
  const int64_t row = blockIdx.x;  // ((b * Hq + qh) * T + t)
  const int t = static_cast<int>(row % p.T);
  const int64_t bq = row / p.T;
  const int qh = static_cast<int>(bq % p.Hq);
  const int b = static_cast<int>(bq / p.Hq);
  const int s = b * p.Hkv + qh / p.G;
  const int len = max(p.lengths[s], 0);
  const int nsplit = min(p.splits, (len + p.chunk - 1) / p.chunk);
  const float* ml = p.ws_ml + row * p.splits * 2;
  if (threadIdx.x < nsplit) w[threadIdx.x] = ml[threadIdx.x * 2];
  __syncthreads();
  float mm = -INFINITY;
  for (int i = 0; i < nsplit; ++i) mm = fmaxf(mm, w[i]);
  __syncthreads();
  if (threadIdx.x < nsplit) {
    const float wi = mm == -INFINITY ? 0.0f : exp2f(ml[threadIdx.x * 2] - mm);
    w[threadIdx.x] = wi;
    lw[threadIdx.x] = ml[threadIdx.x * 2 + 1] * wi;
  }
  __syncthreads();
  float lsum = 0.0f;
  for (int i = 0; i < nsplit; ++i) lsum += lw[i];
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  const float* acc = p.ws_acc + row * p.splits * p.D;
  scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.os0 + qh * p.os1 + t * p.os2;
  for (int d = threadIdx.x; d < p.D; d += kThreads) {
    float a = 0.0f;
    for (int i = 0; i < nsplit; ++i) a = fmaf(acc[static_cast<int64_t>(i) * p.D + d], w[i], a);
    out[d] = from_float<scalar_t>(a * inv);
  }
}

int next_pow2(int x) {
  int v = 1;
  while (v < x) v <<= 1;
  return v;
}

template <typename scalar_t, int EPV, int VPL, int R>
void launch_split(const Params& p, dim3 grid, size_t smem, cudaStream_t st) {
  attend_split_kernel<scalar_t, EPV, VPL, R><<<grid, kThreads, smem, st>>>(p);
  MIXKV_CUDA_CHECK_LAUNCH();
}

template <typename scalar_t, int EPV, int R>
void launch_vpl(int vpl, const Params& p, dim3 grid, size_t smem, cudaStream_t st) {
  if constexpr (EPV == 1) {
    launch_split<scalar_t, 1, 8, R>(p, grid, smem, st);
    (void)vpl;
  } else {
    switch (vpl) {
      case 1: launch_split<scalar_t, EPV, 1, R>(p, grid, smem, st); break;
      case 2: launch_split<scalar_t, EPV, 2, R>(p, grid, smem, st); break;
      default: launch_split<scalar_t, EPV, 4, R>(p, grid, smem, st); break;
    }
  }
}

template <typename scalar_t, int EPV>
void launch_rows(int vpl, int rtile, const Params& p, dim3 grid, size_t smem, cudaStream_t st) {
  if (rtile == 4) {
    launch_vpl<scalar_t, EPV, 4>(vpl, p, grid, smem, st);
  } else {
    launch_vpl<scalar_t, EPV, 8>(vpl, p, grid, smem, st);
  }
}

}  // namespace

void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, int64_t max_length, float scale, const Tensor& out,
            const Tensor& workspace, std::uintptr_t stream) {
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
  if (vec) {
    require(vpl <= 4, "attend: head_dim ", D, " is too large for the CUDA kernel (at most ", 4 * 32 * epv, ")");
    vpl = vpl <= 1 ? 1 : (vpl <= 2 ? 2 : 4);
  } else {
    require(vpl <= 8, "attend: head_dim ", D, " must be a multiple of ", 16 / es,
            " or at most 256 for the CUDA kernel");
  }
  const int64_t chunk = attend_split_tokens(max_length);
  const int64_t splits = max_length <= 0 ? 1 : (max_length + chunk - 1) / chunk;
  require(splits <= kMaxSplits, "attend: internal split count exceeds its bound");
  const int64_t rows = G * T;
  const int rtile = rows <= 4 ? 4 : 8;

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
  p.scale_log2 = (scale == 0.0f ? 1.0f / std::sqrt(static_cast<float>(D)) : scale) * kLog2e;
  if (splits > 1) {
    float* ws = static_cast<float*>(workspace.data);
    p.ws_ml = ws;
    p.ws_acc = ws + B * Hq * T * splits * 2;
  }
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(S),
                  static_cast<unsigned>((rows + rtile - 1) / rtile));
  const size_t smem = (static_cast<size_t>(rtile + kWarps) * D + 2 * kWarps) * sizeof(float);
  require(smem <= 48 * 1024, "attend: head_dim ", D, " needs too much shared memory");
  auto st = reinterpret_cast<cudaStream_t>(stream);
  MIXKV_DISPATCH_FLOAT(q.dtype, "attend", [&] {
    if (vec) {
      launch_rows<scalar_t, 16 / sizeof(scalar_t)>(vpl, rtile, p, grid, smem, st);
    } else {
      launch_rows<scalar_t, 1>(vpl, rtile, p, grid, smem, st);
    }
    if (splits > 1) {
      attend_combine_kernel<scalar_t><<<static_cast<unsigned>(B * Hq * T), kThreads, 0, st>>>(p);
      MIXKV_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace mixkv::cuda
