// CUDA budget policies. Closed-form policies use one thread per (b, h). AdaKV (layers from
// `skip` on) takes two launches: a thread-block cluster per (b, h) row keeps the row's top
// min(Hkv * base, P_b) scores as candidates and, from the same radix passes, the float64 sums of
// all its valid scores and of its top base ones; then a cluster per sequence computes f_h,
// radix-selects the k-th largest float32 scaled candidate over all heads and counts each head's
// slots (ties: lower head first).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "cuda_check.cuh"
#include "device_guard.cuh"
#include "pdl.cuh"
#include "mixkv/budget.hpp"
#include "mixkv/error.hpp"
#include "cluster_select.cuh"
#include "radix_select.cuh"

namespace mixkv {
namespace {

namespace rx = cuda_detail::radix;
namespace csel = cuda_detail::csel;
namespace cg = cooperative_groups;

struct BudgetArgs {
  const float* imp;
  int64_t i_b, i_h;
  const int32_t* lengths;  // null: every prefix is P
  int64_t l_b;
  const float* head_scores;  // sparsemm only
  int64_t hs_h;
  int32_t* out;
  int64_t o_b, o_h;
  int B, H, P;
  int64_t base, window, layer_idx, num_layers;
  int policy;
  double beta, alpha, ratio;
  bool normalize;
  int64_t skip;
  int span;  // cluster_cut's span step (csel::span_mode)
};

__device__ __forceinline__ int64_t prefix_of(const BudgetArgs& a, int b) {
  if (a.lengths == nullptr) return a.P;
  int64_t n = a.lengths[b * a.l_b];
  n = n < 0 ? 0 : n;
  const int64_t pb = n - a.window;
  return pb < 0 ? 0 : (pb > a.P ? a.P : pb);
}

__device__ __forceinline__ int32_t clamp_count(int64_t c, int64_t hi) {
  return static_cast<int32_t>(c < 0 ? 0 : (c > hi ? hi : c));
}

// round half to even of x, clamped to [0, hi]; NaN maps to 0 (same as the CPU twin).
__device__ __forceinline__ int32_t round_clamp(double x, int64_t hi) {
  if (!(x > 0.0)) return 0;
  if (x >= static_cast<double>(hi)) return static_cast<int32_t>(hi);
  const double r = rint(x);
  return static_cast<int32_t>(r > static_cast<double>(hi) ? static_cast<double>(hi) : r);
}

__device__ __forceinline__ bool adakv_ranks(const BudgetArgs& a, int64_t pb) {
  return a.policy == static_cast<int>(Policy::adakv) && a.layer_idx >= a.skip && pb > a.base;
}

// One thread per (b, h): every capacity that needs no ranking.
__global__ void closed_form_kernel(BudgetArgs a) {
  cuda_detail::grid_dep_wait();  // the previous kernel's results (pdl.cuh)
  cuda_detail::grid_dep_launch();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= static_cast<int64_t>(a.B) * a.H) return;
  const int b = static_cast<int>(t / a.H), h = static_cast<int>(t % a.H);
  const int64_t pb = prefix_of(a, b);
  if (adakv_ranks(a, pb)) return;  // written by adakv_slots_kernel
  int32_t c = clamp_count(a.base, pb);
  if (a.policy == static_cast<int>(Policy::pyramidkv)) {
    int64_t mn = static_cast<int64_t>(floor(__ddiv_rn(static_cast<double>(a.base), a.beta)));
    int64_t mx = 2 * a.base - mn;
    if (mx >= pb) {
      mx = pb;
      mn = 2 * a.base - mx;
    }
    int64_t step = 0;
    if (a.num_layers > 1) {
      const int64_t d = mx - mn, l1 = a.num_layers - 1;
      step = d >= 0 ? d / l1 : -((-d + l1 - 1) / l1);
    }
    c = clamp_count(mx - a.layer_idx * step, pb);
  } else if (a.policy == static_cast<int>(Policy::sparsemm)) {
    const int64_t mn = static_cast<int64_t>(floor(__dmul_rn(static_cast<double>(a.base), a.ratio)));
    const double pool = static_cast<double>((a.base - mn) * a.num_layers * a.H);
    const double s = static_cast<double>(a.head_scores[h * a.hs_h]);
    c = round_clamp(__dadd_rn(__dmul_rn(s, pool), static_cast<double>(mn)), pb);
  }
  a.out[b * a.o_b + h * a.o_h] = c;
}

// AdaKV ranks through candidates. s = float32(double(A) * f_h) does not decrease as A grows, so
// the s values of a head's top m = min(Hkv * base, P_b) scores by A are its m largest s values,
// and every member of the global top Hkv * base lies among them. Slots won are counts per head, so
// ties inside one head need no order, and ties across heads go to the lower head: the flat order
// of the candidates (head-major) ranks them exactly like the flat index of the reference.
struct AdaWork {
  double* parts;       // [B * H, kMaxCluster, 2]: per block of a row, float64 sums of all / top-base scores
  int top_blocks;      // blocks per row of adakv_top_kernel
  uint32_t* counts;    // [B * H]: candidates kept per row
  float* candidates;   // [B * H, stride]: each row's top m scores (any order)
  int stride;          // min(H * base, P)
};

__host__ __device__ inline std::size_t align256(std::size_t x) { return (x + 255) / 256 * 256; }

// One cluster per (b, h) row: the row's top m scores and, with normalize (NT = 2), the float64 sums
// of all its valid scores and of its top base ones (a second cut of the same passes), per block.
template <bool kCached, int NT>
__global__ void __launch_bounds__(512, 1) adakv_top_kernel(BudgetArgs a, AdaWork w) {
  cuda_detail::grid_dep_wait();  // the previous kernel's results (pdl.cuh)
  cuda_detail::grid_dep_launch();
  extern __shared__ uint32_t cached_keys[];
  __shared__ csel::SharedT<NT> sh;
  csel::Cluster cluster = csel::this_cluster();
  const int G = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int row = static_cast<int>(blockIdx.x) / G;
  const int b = row / a.H;
  const int h = row % a.H;
  const int64_t pb64 = prefix_of(a, b);
  if (!adakv_ranks(a, pb64)) return;  // uniform over the cluster
  const int pb = static_cast<int>(pb64);
  const int chunk = (pb + G - 1) / G;
  const int lo = min(rank * chunk, pb), n_local = min(lo + chunk, pb) - lo;
  const float* src = a.imp + b * a.i_b + h * a.i_h + (a.P - pb) + lo;
  const auto key_at = csel::row_keys<kCached>(src, n_local, cached_keys);
  const int64_t m64 = a.base * a.H < pb64 ? a.base * a.H : pb64;
  uint32_t c[NT];
  c[0] = static_cast<uint32_t>(m64);
  if constexpr (NT == 2) c[1] = static_cast<uint32_t>(a.base);
  csel::Cut cut[NT];
  csel::cluster_cut<NT>(key_at, kCached ? cached_keys : nullptr, n_local, c, sh, cut, a.span);
  if (G > 1) cluster.barrier_arrive();  // this block reads no other block's memory from here on
  if constexpr (NT == 2) {
    // this block's sums, fixed order: per thread strided, then lanes, then warps in order
    const uint32_t T = cut[1].key;
    double all = 0.0, top = 0.0;
    for (int i = threadIdx.x; i < n_local; i += blockDim.x) {
      const uint32_t key = key_at(i);
      const double v = static_cast<double>(rx::key_value(key));
      all += v;
      top += cut[1].take > 0 && key > T ? v : 0.0;
    }
    csel::block_sum2(all, top, sh);
    if (threadIdx.x == 0) {
      if (rank == 0 && cut[1].take_equal > 0)
        top += static_cast<double>(cut[1].take_equal) * static_cast<double>(rx::key_value(T));
      double* part = w.parts + (static_cast<int64_t>(row) * csel::kMaxCluster + rank) * 2;
      part[0] = all;
      part[1] = top;
    }
  }
  if (rank == 0 && threadIdx.x == 0) w.counts[row] = cut[0].take;
  float* cand = w.candidates + static_cast<int64_t>(row) * w.stride;
  csel::emit_in_order(key_at, n_local, cut[0], sh, [&](uint32_t slot, int i) { cand[slot] = rx::key_value(key_at(i)); });
  if (G > 1) cluster.barrier_wait();
}

// Shared-memory arrays of adakv_alloc_kernel ahead of its cached keys, H heads.
struct AllocLayout {
  std::size_t f, count, ge, g_sum, e_sum, bytes;
  __host__ __device__ explicit AllocLayout(int H) {
    const std::size_t h = static_cast<std::size_t>(H);
    f = 0;
    count = f + 8 * h;
    ge = count + 4 * h;  // [H][2]: keys above / equal to the cut
    g_sum = ge + 8 * h;
    e_sum = g_sum + 4 * h;
    bytes = (e_sum + 4 * h + 15) / 16 * 16;
  }
};

// One cluster per sequence over its H * stride candidates (head-major; entries past a head's count
// are padding): f_h from the per-block sums of adakv_top_kernel, the global top H * base of the
// float32 scaled candidates (cluster_cut), slots per head (ties to lower heads) and the capacities.
// Also writes the capacities of sequences that do not rank (P_b <= base).
template <bool kCached>
__global__ void __launch_bounds__(512) adakv_alloc_kernel(BudgetArgs a, AdaWork w, int chunk) {
  cuda_detail::grid_dep_wait();  // the previous kernel's results (pdl.cuh)
  cuda_detail::grid_dep_launch();
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ csel::Shared sh;
  csel::Cluster cluster = csel::this_cluster();
  const int G = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int b = static_cast<int>(blockIdx.x) / G, H = a.H, M = w.stride;
  const int64_t pb64 = prefix_of(a, b);
  if (!adakv_ranks(a, pb64)) {  // uniform over the cluster
    if (rank == 0)
      for (int h = threadIdx.x; h < H; h += blockDim.x) a.out[b * a.o_b + h * a.o_h] = clamp_count(a.base, pb64);
    return;
  }
  const AllocLayout L(H);
  double* f = reinterpret_cast<double*>(smem + L.f);
  uint32_t* count = reinterpret_cast<uint32_t*>(smem + L.count);
  uint32_t* ge = reinterpret_cast<uint32_t*>(smem + L.ge);
  uint32_t* g_sum = reinterpret_cast<uint32_t*>(smem + L.g_sum);
  uint32_t* e_sum = reinterpret_cast<uint32_t*>(smem + L.e_sum);
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem + L.bytes);
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    const int row = b * H + h;
    count[h] = min(w.counts[row], static_cast<uint32_t>(M));
    double fh = 1.0;
    if (a.normalize) {
      const double* part = w.parts + static_cast<int64_t>(row) * csel::kMaxCluster * 2;
      double all = 0.0, top = 0.0;
      for (int r = 0; r < w.top_blocks; ++r) {
        all += part[2 * r];
        top += part[2 * r + 1];
      }
      fh = all != 0.0 ? __ddiv_rn(top, all) : 1.0;
    }
    f[h] = fh;
    ge[2 * h] = 0u;
    ge[2 * h + 1] = 0u;
  }
  __syncthreads();
  const int n_all = H * M;
  const int lo = min(rank * chunk, n_all), n_local = min(lo + chunk, n_all) - lo;
  const float* cand = w.candidates + static_cast<int64_t>(b) * H * M + lo;
  auto scaled_key = [&](int i, float v) -> uint32_t {
    const int h = (lo + i) / M;
    if (lo + i - h * M >= static_cast<int>(count[h])) return 0u;  // padding: never counts
    return rx::order_key(__double2float_rn(__dmul_rn(static_cast<double>(v), f[h])));
  };
  if constexpr (kCached) {
    constexpr int U = 4;
    for (int base = threadIdx.x; base < n_local; base += blockDim.x * U) {
      float v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * blockDim.x;
        v[u] = i < n_local ? cand[i] : 0.0f;  // padding entries hold stale values: masked below
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * blockDim.x;
        if (i < n_local) keys[i] = scaled_key(i, v[u]);
      }
    }
  }
  auto key_at = [&](int i) -> uint32_t {
    if constexpr (kCached) {
      return keys[i];
    } else {
      return scaled_key(i, cand[i]);
    }
  };
  const uint32_t k = static_cast<uint32_t>(a.base) * static_cast<uint32_t>(H);
  const csel::Cut cut = csel::cluster_cut(key_at, kCached ? keys : nullptr, n_local, k, sh, a.span);
  // keys of this chunk above / equal to the cut, per head
  if (cut.take > 0) {
    for (int i = threadIdx.x; i < n_local; i += blockDim.x) {
      const uint32_t key = key_at(i);
      const int h = (lo + i) / M;
      if (key >= cut.key) atomicAdd(&ge[2 * h + (key == cut.key ? 1 : 0)], 1u);
    }
  }
  csel::row_sync(cluster, static_cast<unsigned>(G));  // every block's counts are complete
  if (rank == 0) {
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
      uint32_t gs = 0, es = 0;
      if (G == 1) {
        gs = ge[2 * h];
        es = ge[2 * h + 1];
      } else {
        for (int r = 0; r < G; ++r) {
          gs += *cluster.map_shared_rank(&ge[2 * h], r);
          es += *cluster.map_shared_rank(&ge[2 * h + 1], r);
        }
      }
      g_sum[h] = gs;
      e_sum[h] = es;
    }
  }
  if (G > 1) cluster.barrier_arrive();  // rank 0 has read every block's counts
  if (rank == 0) {
    __syncthreads();
    if (threadIdx.x < 32) {  // one warp hands out the ties, lower heads first
      const int lane = threadIdx.x;
      const double floor_slots = floor(__dmul_rn(a.alpha, static_cast<double>(a.base)));
      uint32_t equal_before = 0;
      const uint32_t ties = cut.take_equal;
      for (int h0 = 0; h0 < H; h0 += 32) {
        const int h = h0 + lane;
        const uint32_t e = h < H ? e_sum[h] : 0u;
        const uint32_t incl = csel::warp_inclusive_scan(e, lane);
        const uint32_t before = equal_before + incl - e;
        if (h < H) {
          const uint32_t left = ties > before ? ties - before : 0u;
          const double won = static_cast<double>(g_sum[h] + (e < left ? e : left));
          a.out[b * a.o_b + h * a.o_h] = round_clamp(__dadd_rn(__dmul_rn(won, 1.0 - a.alpha), floor_slots), pb64);
        }
        equal_before += __shfl_sync(0xFFFFFFFFu, incl, 31);
      }
    }
  }
  if (G > 1) cluster.barrier_wait();  // the others may read this block's memory until they arrive
}

}  // namespace

namespace cuda {

void capacities(const BudgetOptions& o, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out, const Tensor& workspace, std::uintptr_t stream) {
  const int64_t B = importance.shape[0], H = importance.shape[1], P = importance.shape[2];
  if (B * H == 0) return;
  require(B * H <= 0x7FFFFFFF && P <= (int64_t{1} << 30), "capacities: importance is too large for CUDA");
  require(o.policy != Policy::adakv || H * P <= (int64_t{1} << 30),
          "capacities: adakv on CUDA needs Hkv * P <= 2^30");
  cuda_detail::DeviceGuard guard(importance.device_id);
  BudgetArgs a{};
  a.imp = importance.ptr<float>();
  a.i_b = importance.stride[0];
  a.i_h = importance.stride[1];
  a.lengths = valid_lengths.present ? valid_lengths.ptr<int32_t>() : nullptr;
  a.l_b = valid_lengths.present ? valid_lengths.stride[0] : 0;
  a.head_scores = head_scores.present ? head_scores.ptr<float>() : nullptr;
  a.hs_h = head_scores.present ? head_scores.stride[0] : 0;
  a.out = out.ptr<int32_t>();
  a.o_b = out.stride[0];
  a.o_h = out.stride[1];
  a.B = static_cast<int>(B);
  a.H = static_cast<int>(H);
  a.P = static_cast<int>(P);
  a.base = o.budget > o.window ? o.budget - o.window : 0;
  a.window = o.window;
  a.layer_idx = o.layer_idx;
  a.num_layers = o.num_layers;
  a.policy = static_cast<int>(o.policy);
  a.beta = o.pyramid_beta;
  a.alpha = o.ada_floor;
  a.ratio = o.sparsemm_ratio;
  a.normalize = o.ada_normalize;
  a.skip = o.ada_skip;
  a.span = csel::span_mode();
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t cells = B * H;
  const bool ranks = o.policy == Policy::adakv && o.layer_idx >= o.ada_skip;
  if (!ranks) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>((cells + 127) / 128));
    cfg.blockDim = dim3(128);
    cfg.stream = s;
    cudaLaunchAttribute attr[1] = {cuda_detail::pdl_attribute()};
    cfg.attrs = attr;
    cfg.numAttrs = cuda_detail::pdl_supported(importance.device_id) ? 1 : 0;
    MIXKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, closed_form_kernel, a));
    MIXKV_CUDA_CHECK_LAUNCH();
    return;
  }
  require(workspace.present, "capacities: adakv needs a workspace on CUDA");
  auto* ws = static_cast<unsigned char*>(workspace.data);
  AdaWork w{};
  const std::size_t parts_bytes = align256(16 * csel::kMaxCluster * static_cast<std::size_t>(cells));
  w.parts = reinterpret_cast<double*>(ws);
  w.counts = reinterpret_cast<uint32_t*>(ws + parts_bytes);
  w.candidates = reinterpret_cast<float*>(ws + parts_bytes + align256(4 * static_cast<std::size_t>(cells)));
  w.stride = static_cast<int>(std::min<int64_t>(a.base * H, P));
  const int device = importance.device_id;
  if (o.ada_normalize) {
    const csel::RowClusters top = csel::plan_row_clusters(cells, P, device, "capacities", sizeof(csel::SharedT<2>));
    w.top_blocks = top.G;
    if (top.cached) {
      csel::launch_row_clusters(top, s, adakv_top_kernel<true, 2>, a, w);
    } else {
      csel::launch_row_clusters(top, s, adakv_top_kernel<false, 2>, a, w);
    }
  } else {
    const csel::RowClusters top = csel::plan_row_clusters(cells, P, device, "capacities", sizeof(csel::SharedT<1>));
    w.top_blocks = top.G;
    if (top.cached) {
      csel::launch_row_clusters(top, s, adakv_top_kernel<true, 1>, a, w);
    } else {
      csel::launch_row_clusters(top, s, adakv_top_kernel<false, 1>, a, w);
    }
  }
  MIXKV_CUDA_CHECK_LAUNCH();
  // one cluster per sequence over its H * stride candidates
  const csel::RowClusters alloc = csel::plan_row_clusters(B, H * static_cast<int64_t>(w.stride), device, "capacities",
                                                          sizeof(csel::Shared), AllocLayout(static_cast<int>(H)).bytes);
  if (alloc.cached) {
    csel::launch_row_clusters(alloc, s, adakv_alloc_kernel<true>, a, w, alloc.chunk);
  } else {
    csel::launch_row_clusters(alloc, s, adakv_alloc_kernel<false>, a, w, alloc.chunk);
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mixkv
