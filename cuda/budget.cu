// CUDA budget policies. Closed-form policies use one thread per (b, h). AdaKV (layers from
// `skip` on) takes two launches: a thread-block cluster per (b, h) row keeps the row's top
// min(Hkv * base, P_b) scores as candidates and sums all its valid scores (float64); then one
// block per sequence computes f_h from the candidates, radix-selects the k-th largest float32
// scaled candidate over all heads and counts each head's slots (ties: lower head first).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "cuda_check.cuh"
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
// and every member of the global top Hkv * base lies among them; the top-base sum behind f_h is
// a sum over them too. Slots won are counts per head, so ties inside one head need no order.
struct AdaWork {
  double* sums;        // [B * H]: float64 sum of each row's valid scores
  uint32_t* counts;    // [B * H]: candidates kept per row
  float* candidates;   // [B * H, stride]: each row's top m scores (any order)
  int stride;          // min(H * base, P)
};

__host__ __device__ inline std::size_t align256(std::size_t x) { return (x + 255) / 256 * 256; }

// One cluster per (b, h) row: the row's top m scores and the sum of all its valid scores.
template <bool kCached>
__global__ void __launch_bounds__(512) adakv_top_kernel(BudgetArgs a, AdaWork w) {
  extern __shared__ uint32_t cached_keys[];
  __shared__ csel::Shared sh;
  csel::Cluster cluster = csel::this_cluster();
  const int G = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int row = static_cast<int>(blockIdx.x) / G;
  const int b = row / a.H, h = row % a.H;
  const int64_t pb64 = prefix_of(a, b);
  if (!adakv_ranks(a, pb64)) return;  // uniform over the cluster
  const int pb = static_cast<int>(pb64);
  const int chunk = (pb + G - 1) / G;
  const int lo = min(rank * chunk, pb), n_local = min(lo + chunk, pb) - lo;
  const float* src = a.imp + b * a.i_b + h * a.i_h + (a.P - pb) + lo;
  if constexpr (kCached) csel::load_keys<8>(src, n_local, cached_keys);
  auto key_at = [&](int i) -> uint32_t {
    if constexpr (kCached) {
      return cached_keys[i];
    } else {
      return rx::order_key(src[i]);
    }
  };
  // this block's float64 sum, fixed order: per thread strided, then warps, then warp order
  double part = 0.0;
  for (int i = threadIdx.x; i < n_local; i += blockDim.x) part += static_cast<double>(rx::key_value(key_at(i)));
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) part += __shfl_down_sync(0xFFFFFFFFu, part, d);
  if ((threadIdx.x & 31) == 0) sh.warp_sum[threadIdx.x >> 5] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int wi = 0; wi < static_cast<int>(blockDim.x >> 5); ++wi) sum += sh.warp_sum[wi];
    sh.block_sum = sum;  // read by rank 0 after the first cluster barrier inside cluster_cut
  }
  const int64_t m64 = a.base * a.H < pb64 ? a.base * a.H : pb64;
  const csel::Cut cut = csel::cluster_cut(key_at, n_local, static_cast<uint32_t>(m64), sh);
  if (rank == 0 && threadIdx.x == 0) {
    double total = 0.0;
    for (int r = 0; r < G; ++r) total += *cluster.map_shared_rank(&sh.block_sum, r);
    w.sums[row] = total;
    w.counts[row] = cut.take;
  }
  cluster.barrier_arrive();
  float* cand = w.candidates + static_cast<int64_t>(row) * w.stride;
  csel::emit_in_order(key_at, n_local, cut, sh, [&](uint32_t slot, int i) { cand[slot] = rx::key_value(key_at(i)); });
  cluster.barrier_wait();
}

// Shared-memory layout of adakv_alloc_kernel for H heads and `cached` candidate values.
struct AllocLayout {
  std::size_t f, count, want, prefix, rem, greater, equal, hist, vals, bytes;
  __host__ __device__ AllocLayout(int H, int stride, bool cached) {
    const std::size_t h = static_cast<std::size_t>(H);
    f = 0;
    count = f + 8 * h;
    want = count + 4 * h;
    prefix = want + 4 * h;
    rem = prefix + 4 * h;
    greater = rem + 4 * h;
    equal = greater + 4 * h;
    hist = equal + 4 * h;
    vals = hist + 4 * h * csel::kBins;
    bytes = vals + (cached ? 4 * h * static_cast<std::size_t>(stride) : 0);
  }
};

// One block per sequence: f_h from each head's candidates, then the global top H * base of the
// scaled candidates, slots per head (ties to lower heads) and the capacities. Also writes the
// capacities of sequences that do not rank (P_b <= base).
template <bool kCached>
__global__ void __launch_bounds__(512) adakv_alloc_kernel(BudgetArgs a, AdaWork w) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int b = blockIdx.x, H = a.H, M = w.stride;
  const int64_t pb64 = prefix_of(a, b);
  if (!adakv_ranks(a, pb64)) {
    for (int h = threadIdx.x; h < H; h += blockDim.x) a.out[b * a.o_b + h * a.o_h] = clamp_count(a.base, pb64);
    return;
  }
  const AllocLayout L(H, M, kCached);
  double* f = reinterpret_cast<double*>(smem + L.f);
  uint32_t* count = reinterpret_cast<uint32_t*>(smem + L.count);
  uint32_t* want = reinterpret_cast<uint32_t*>(smem + L.want);
  uint32_t* prefix = reinterpret_cast<uint32_t*>(smem + L.prefix);
  uint32_t* rem = reinterpret_cast<uint32_t*>(smem + L.rem);
  uint32_t* greater = reinterpret_cast<uint32_t*>(smem + L.greater);
  uint32_t* equal = reinterpret_cast<uint32_t*>(smem + L.equal);
  uint32_t* hist = reinterpret_cast<uint32_t*>(smem + L.hist);
  float* vals = reinterpret_cast<float*>(smem + L.vals);
  const float* cand = w.candidates + static_cast<int64_t>(b) * H * M;
  const int base = static_cast<int>(a.base);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    count[h] = min(w.counts[b * H + h], static_cast<uint32_t>(M));
    want[h] = a.normalize ? static_cast<uint32_t>(base) : 0u;
  }
  __syncthreads();
  if constexpr (kCached) {
    for (int i = threadIdx.x; i < H * M; i += blockDim.x) {
      const int h = i / M;
      if (i - h * M < static_cast<int>(count[h])) vals[i] = cand[i];
    }
    __syncthreads();
  }
  auto value = [&](int h, int j) -> float {
    if constexpr (kCached) {
      return vals[h * M + j];
    } else {
      return cand[h * M + j];
    }
  };
  // f_h: the base-th largest candidate of each head, then the top-base sum (one warp per head).
  if (a.normalize)
    csel::segmented_cut(
        H, M,
        [&](int h, int j) -> uint32_t { return j < static_cast<int>(count[h]) ? rx::order_key(value(h, j)) : 0u; },
        want, prefix, rem, hist);
  for (int h = warp; h < H; h += nwarps) {
    if (!a.normalize) {
      if (lane == 0) f[h] = 1.0;
      continue;
    }
    const uint32_t T = prefix[h];
    double top = 0.0;
    for (int j = lane; j < static_cast<int>(count[h]); j += 32) {
      const float v = value(h, j);
      if (rx::order_key(v) > T) top += static_cast<double>(v);
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) top += __shfl_xor_sync(0xFFFFFFFFu, top, d);
    if (lane == 0) {
      if (T != csel::kNone) top += static_cast<double>(rem[h]) * static_cast<double>(rx::key_value(T));
      const double total = w.sums[b * H + h];
      f[h] = total != 0.0 ? __ddiv_rn(top, total) : 1.0;
    }
  }
  __syncthreads();
  // the global top H * base of the scaled candidates
  auto scaled_key = [&](int h, int j) -> uint32_t {
    if (j >= static_cast<int>(count[h])) return 0u;
    return rx::order_key(__double2float_rn(__dmul_rn(static_cast<double>(value(h, j)), f[h])));
  };
  const uint32_t k = static_cast<uint32_t>(base) * static_cast<uint32_t>(H);
  if (threadIdx.x == 0) want[0] = k;
  __syncthreads();
  csel::segmented_cut(
      1, H * M,
      [&](int, int i) -> uint32_t {
        const int h = i / M;
        return scaled_key(h, i - h * M);
      },
      want, prefix, rem, hist);
  const uint32_t T = prefix[0];
  for (int h = warp; h < H; h += nwarps) {
    uint32_t g = 0, e = 0;
    for (int j = lane; j < static_cast<int>(count[h]); j += 32) {
      const uint32_t key = scaled_key(h, j);
      g += key > T ? 1u : 0u;
      e += key == T ? 1u : 0u;
    }
    g = __reduce_add_sync(0xFFFFFFFFu, g);
    e = __reduce_add_sync(0xFFFFFFFFu, e);
    if (lane == 0) {
      greater[h] = g;
      equal[h] = e;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const double floor_slots = floor(__dmul_rn(a.alpha, static_cast<double>(a.base)));
    uint32_t equal_left = T != csel::kNone ? rem[0] : 0u;  // ties still to hand out, lower heads first
    for (int h = 0; h < H; ++h) {
      const uint32_t from_ties = equal[h] < equal_left ? equal[h] : equal_left;
      equal_left -= from_ties;
      const double won = static_cast<double>(greater[h] + from_ties);
      a.out[b * a.o_b + h * a.o_h] = round_clamp(__dadd_rn(__dmul_rn(won, 1.0 - a.alpha), floor_slots), pb64);
    }
  }
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
  rx::DeviceGuard guard(importance.device_id);
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
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t cells = B * H;
  const bool ranks = o.policy == Policy::adakv && o.layer_idx >= o.ada_skip;
  if (!ranks) {
    closed_form_kernel<<<static_cast<unsigned>((cells + 127) / 128), 128, 0, s>>>(a);
    MIXKV_CUDA_CHECK_LAUNCH();
    return;
  }
  require(workspace.present, "capacities: adakv needs a workspace on CUDA");
  auto* ws = static_cast<unsigned char*>(workspace.data);
  AdaWork w{};
  w.sums = reinterpret_cast<double*>(ws);
  w.counts = reinterpret_cast<uint32_t*>(ws + align256(8 * static_cast<std::size_t>(cells)));
  w.candidates = reinterpret_cast<float*>(ws + align256(8 * static_cast<std::size_t>(cells)) +
                                          align256(4 * static_cast<std::size_t>(cells)));
  w.stride = static_cast<int>(std::min<int64_t>(a.base * H, P));
  const csel::RowClusters plan = csel::plan_row_clusters(cells, P, importance.device_id, "capacities");
  if (plan.cached) {
    csel::launch_row_clusters(plan, s, adakv_top_kernel<true>, a, w);
  } else {
    csel::launch_row_clusters(plan, s, adakv_top_kernel<false>, a, w);
  }
  const int optin = csel::smem_optin(importance.device_id);
  // one block per sequence; candidate values cached in shared memory when they fit
  const AllocLayout with_vals(static_cast<int>(H), w.stride, true), without_vals(static_cast<int>(H), w.stride, false);
  const bool alloc_cached = with_vals.bytes <= std::min<std::size_t>(96 * 1024, static_cast<std::size_t>(optin));
  const std::size_t alloc_bytes = alloc_cached ? with_vals.bytes : without_vals.bytes;
  require(alloc_bytes <= static_cast<std::size_t>(optin), "capacities: adakv on CUDA supports at most ",
          (optin - 1024) / (4 * csel::kBins + 32), " kv heads");
  const int alloc_threads = H * w.stride > 4096 ? 512 : 256;
  if (alloc_cached) {
    if (alloc_bytes > 48 * 1024)
      MIXKV_CUDA_CHECK(cudaFuncSetAttribute(adakv_alloc_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(alloc_bytes)));
    adakv_alloc_kernel<true><<<static_cast<unsigned>(B), alloc_threads, alloc_bytes, s>>>(a, w);
  } else {
    if (alloc_bytes > 48 * 1024)
      MIXKV_CUDA_CHECK(cudaFuncSetAttribute(adakv_alloc_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(alloc_bytes)));
    adakv_alloc_kernel<false><<<static_cast<unsigned>(B), alloc_threads, alloc_bytes, s>>>(a, w);
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mixkv
