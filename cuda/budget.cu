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
#include "mixkv/capacities_select.hpp"
#include "mixkv/select.hpp"
#include "mixkv/error.hpp"
#include "cluster_select.cuh"
#include "radix_select.cuh"
#include "sm_count.cuh"

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
__device__ __forceinline__ void adakv_top_row(const BudgetArgs& a, const AdaWork& w, int row, const csel::Cluster& cluster,
                                              int G, int rank, uint32_t* cached_keys, csel::SharedT<NT>& sh) {
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

template <bool kCached, int NT>
__global__ void __launch_bounds__(512, 1) adakv_top_kernel(BudgetArgs a, AdaWork w) {
  cuda_detail::grid_dep_wait();  // the previous kernel's results (pdl.cuh)
  cuda_detail::grid_dep_launch();
  extern __shared__ uint32_t cached_keys[];
  __shared__ csel::SharedT<NT> sh;
  csel::Cluster cluster = csel::this_cluster();
  const int G = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  adakv_top_row<kCached, NT>(a, w, static_cast<int>(blockIdx.x) / G, cluster, G, rank, cached_keys, sh);
}

// The selection side of the fused capacities + selection (AdaKV): every (b, h) row's top m selection
// scores, m = min(Hkv * base, P) >= every capacity AdaKV can give, as candidates (positions ascending,
// order keys), and -1 in the output columns from m on, which no capacity reaches.
struct CandWork {
  const float* scores;
  int64_t s_b, s_h;
  int32_t* positions;  // the caller's output
  int64_t p_b, p_h;
  int C;
  uint32_t* count;  // [B * H]: candidates per row (min(m, scores above -inf))
  int32_t* pos;     // [B * H, m]
  uint32_t* key;    // [B * H, m]
  int m;
};

template <bool kCached>
__device__ __forceinline__ void candidate_row(const BudgetArgs& a, const CandWork& c, int row, const csel::Cluster& cluster,
                                              int G, int rank, uint32_t* cached_keys, csel::Shared& sh) {
  const int b = row / a.H, h = row % a.H;
  const int chunk = (a.P + G - 1) / G;
  const int lo = min(rank * chunk, a.P), n_local = min(lo + chunk, a.P) - lo;
  const auto key_at = csel::row_keys<kCached>(c.scores + b * c.s_b + h * c.s_h + lo, n_local, cached_keys);
  const csel::Cut cut =
      csel::cluster_cut(key_at, kCached ? cached_keys : nullptr, n_local, static_cast<uint32_t>(c.m), sh, a.span);
  if (G > 1) cluster.barrier_arrive();  // this block reads no other block's memory from here on
  int32_t* cpos = c.pos + static_cast<int64_t>(row) * c.m;
  uint32_t* ckey = c.key + static_cast<int64_t>(row) * c.m;
  csel::emit_in_order(key_at, n_local, cut, sh, [&](uint32_t slot, int i) {
    cpos[slot] = lo + i;
    ckey[slot] = key_at(i);
  });
  int32_t* out = c.positions + b * c.p_b + h * c.p_h;
  const int stride = G * static_cast<int>(blockDim.x);
  for (int i = c.m + rank * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x); i < c.C; i += stride) out[i] = -1;
  if (rank == 0 && threadIdx.x == 0) c.count[row] = cut.take;
  if (G > 1) cluster.barrier_wait();
}

template <int NT>
union TopCandShared {
  csel::SharedT<NT> top;
  csel::Shared cand;
};

// The shortlist forms of the two row kinds (rows of G blocks whose G · m candidates fit one block; see
// select_merge_kernel and csel::push_shortlist): each block cuts its chunk to its top m alone and writes
// those keys (and positions) into block 0's shared memory; block 0 then cuts the G · m candidates. The row's
// top m (and top base) lie among them.
template <bool kCached, int NT>
__device__ __forceinline__ void adakv_top_row_merge(const BudgetArgs& a, const AdaWork& w, int row,
                                                    const csel::Cluster& cluster, int G, int rank, const csel::Shortlist& mg,
                                                    uint32_t* cached_keys, TopCandShared<NT>& u) {
  csel::SharedT<NT>& sh = u.top;  // the two-target view (sums, the shortlist's cut)
  csel::Shared& sh1 = u.cand;     // and the one-target view of the same storage (this block's cut)
  const int b = row / a.H, h = row % a.H;
  const int64_t pb64 = prefix_of(a, b);
  if (!adakv_ranks(a, pb64)) return;  // uniform over the cluster
  cluster.barrier_arrive();
  const int pb = static_cast<int>(pb64);
  const int chunk = (pb + G - 1) / G;
  const int lo = min(rank * chunk, pb), n_local = min(lo + chunk, pb) - lo;
  const float* src = a.imp + b * a.i_b + h * a.i_h + (a.P - pb) + lo;
  const auto key_at = csel::row_keys<kCached>(src, n_local, cached_keys);
  const int m = static_cast<int>(a.base * a.H < pb64 ? a.base * a.H : pb64);
  const csel::Cut mine = csel::cluster_cut<true>(key_at, kCached ? cached_keys : nullptr, n_local,
                                                 static_cast<uint32_t>(m), sh1, a.span);
  double* part = w.parts + static_cast<int64_t>(row) * csel::kMaxCluster * 2;
  if constexpr (NT == 2) {  // this block's sum of all its scores (fixed order, as adakv_top_row)
    double all = 0.0, none = 0.0;
    for (int i = threadIdx.x; i < n_local; i += blockDim.x) all += static_cast<double>(rx::key_value(key_at(i)));
    csel::block_sum2(all, none, sh);
    if (threadIdx.x == 0) part[2 * rank] = all, part[2 * rank + 1] = 0.0;
    __syncthreads();  // thread 0 has read the warps' sums before the storage is reused
  }
  csel::push_shortlist(key_at, n_local, mine, sh1, cluster, rank, mg, m, lo, false);
  if (rank != 0) return;
  const auto cand_at = [&mg](int i) { return mg.key[i]; };
  uint32_t c[NT];
  c[0] = static_cast<uint32_t>(m);
  if constexpr (NT == 2) c[1] = static_cast<uint32_t>(a.base);
  csel::Cut cut[NT];
  csel::cluster_cut<NT, true>(cand_at, mg.key, G * m, c, sh, cut, a.span);
  if constexpr (NT == 2) {  // the sum of the row's top base scores, all from the shortlist
    const uint32_t T = cut[1].key;
    double top = 0.0, none = 0.0;
    for (int i = threadIdx.x; i < G * m; i += blockDim.x) {
      const uint32_t key = mg.key[i];
      top += cut[1].take > 0 && key > T ? static_cast<double>(rx::key_value(key)) : 0.0;
    }
    csel::block_sum2(top, none, sh);
    if (threadIdx.x == 0) {
      if (cut[1].take_equal > 0) top += static_cast<double>(cut[1].take_equal) * static_cast<double>(rx::key_value(T));
      part[1] = top;
    }
  }
  if (threadIdx.x == 0) w.counts[row] = cut[0].take;
  float* cand = w.candidates + static_cast<int64_t>(row) * w.stride;
  csel::emit_in_order(cand_at, G * m, cut[0], sh, [&](uint32_t slot, int i) { cand[slot] = rx::key_value(mg.key[i]); });
}

template <bool kCached>
__device__ __forceinline__ void candidate_row_merge(const BudgetArgs& a, const CandWork& c, int row,
                                                    const csel::Cluster& cluster, int G, int rank, const csel::Shortlist& mg,
                                                    uint32_t* cached_keys, csel::Shared& sh) {
  cluster.barrier_arrive();
  const int b = row / a.H, h = row % a.H;
  const int chunk = (a.P + G - 1) / G;
  const int lo = min(rank * chunk, a.P), n_local = min(lo + chunk, a.P) - lo;
  const auto key_at = csel::row_keys<kCached>(c.scores + b * c.s_b + h * c.s_h + lo, n_local, cached_keys);
  const csel::Cut mine =
      csel::cluster_cut<true>(key_at, kCached ? cached_keys : nullptr, n_local, static_cast<uint32_t>(c.m), sh, a.span);
  int32_t* out = c.positions + b * c.p_b + h * c.p_h;
  const int stride = G * static_cast<int>(blockDim.x);
  for (int i = c.m + rank * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x); i < c.C; i += stride) out[i] = -1;
  csel::push_shortlist(key_at, n_local, mine, sh, cluster, rank, mg, c.m, lo, true);
  if (rank != 0) return;
  const auto cand_at = [&mg](int i) { return mg.key[i]; };
  const csel::Cut cut = csel::cluster_cut<true>(cand_at, mg.key, G * c.m, static_cast<uint32_t>(c.m), sh, a.span);
  int32_t* cpos = c.pos + static_cast<int64_t>(row) * c.m;
  uint32_t* ckey = c.key + static_cast<int64_t>(row) * c.m;
  csel::emit_in_order(cand_at, G * c.m, cut, sh, [&](uint32_t slot, int i) {
    cpos[slot] = mg.pos[i];
    ckey[slot] = mg.key[i];
  });
  if (threadIdx.x == 0) c.count[row] = cut.take;
}


// Clusters [0, B * H) of the grid: adakv_top_row; clusters [B * H, 2 B * H): candidate_row. Both
// halves read rows of P scores, so they share the launch shape and run side by side.
// kMerge: the shortlist forms (G · m <= kMergeMax; dynamic shared memory holds the Shortlist arrays, 2 ·
// round4(G · m) words, ahead of the cached keys).
template <bool kCached, int NT, bool kMerge = false>
__global__ void __launch_bounds__(512, 1) adakv_top_candidates_kernel(BudgetArgs a, AdaWork w, CandWork c) {
  cuda_detail::grid_dep_wait();  // the previous kernel's results (pdl.cuh)
  cuda_detail::grid_dep_launch();
  extern __shared__ uint32_t cached_keys[];
  __shared__ TopCandShared<NT> sh;
  csel::Cluster cluster = csel::this_cluster();
  const int G = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int index = static_cast<int>(blockIdx.x) / G, cells = a.B * a.H;
  if constexpr (kMerge) {
    const int words = (G * c.m + 3) / 4 * 4;
    const csel::Shortlist mg{cached_keys, reinterpret_cast<int32_t*>(cached_keys + words)};
    uint32_t* keys = cached_keys + 2 * words;
    if (index < cells) {
      adakv_top_row_merge<kCached, NT>(a, w, index, cluster, G, rank, mg, keys, sh);
    } else {
      candidate_row_merge<kCached>(a, c, index - cells, cluster, G, rank, mg, keys, sh.cand);
    }
  } else if (index < cells) {
    adakv_top_row<kCached, NT>(a, w, index, cluster, G, rank, cached_keys, sh.top);
  } else {
    candidate_row<kCached>(a, c, index - cells, cluster, G, rank, cached_keys, sh.cand);
  }
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

// The last step of the fused capacities + selection: each (b, h) row keeps the top c of its m
// candidates (c from adakv_alloc_kernel, clamped to [0, min(P, C)] like select's), positions ascending,
// then -1 up to column m (candidate_row wrote the columns past m). Candidates sit in position order, so
// "lower position" is "lower index" here.
struct PickArgs {
  const int32_t* caps;
  int64_t c_b, c_h;
  const uint32_t* count;
  const int32_t* pos;
  const uint32_t* key;
  int m;
  int32_t* positions;
  int64_t p_b, p_h;
  int C;
  int32_t* counts;
  int64_t n_b, n_h;
  int H, P;
  int span;
};

constexpr int kPickRankMax = 256;  // up to this many candidates per row: each thread ranks one

__device__ __forceinline__ uint32_t pick_take(const PickArgs& p, int b, int h, uint32_t n) {
  const int cap = p.caps[b * p.c_b + h * p.c_h];
  const uint32_t c = static_cast<uint32_t>(min(max(cap, 0), min(p.P, p.C)));
  return c < n ? c : n;
}

// m <= kPickRankMax, one block of kPickRankMax threads per row: thread i counts the candidates ranked
// above its own (higher key, or equal key at a lower index) and keeps it when that count is below c.
__global__ void __launch_bounds__(kPickRankMax) pick_rank_kernel(PickArgs p) {
  cuda_detail::grid_dep_wait();  // the capacities and candidates of the kernels before (pdl.cuh)
  cuda_detail::grid_dep_launch();
  __shared__ __align__(16) uint32_t keys[kPickRankMax];
  __shared__ uint32_t warp_n[kPickRankMax / 32];
  const int row = static_cast<int>(blockIdx.x), b = row / p.H, h = row % p.H;
  const int i = static_cast<int>(threadIdx.x), lane = i & 31, warp = i >> 5;
  const uint32_t n = min(p.count[row], static_cast<uint32_t>(p.m));
  const uint32_t take = pick_take(p, b, h, n);
  const int64_t at = static_cast<int64_t>(row) * p.m + i;
  const bool valid = static_cast<uint32_t>(i) < n;
  // entries past n hold 0, below every candidate's key (kNegInfKey and above): they never rank above
  const uint32_t mine = valid ? p.key[at] : 0u;
  keys[i] = mine;
  __syncthreads();
  uint32_t above = 0;
  const int n4 = static_cast<int>((n + 3) / 4);
  for (int j4 = 0; j4 < n4; ++j4) {
    const uint4 k = reinterpret_cast<const uint4*>(keys)[j4];
    const int j = 4 * j4;
    above += (k.x > mine || (k.x == mine && j < i)) ? 1u : 0u;
    above += (k.y > mine || (k.y == mine && j + 1 < i)) ? 1u : 0u;
    above += (k.z > mine || (k.z == mine && j + 2 < i)) ? 1u : 0u;
    above += (k.w > mine || (k.w == mine && j + 3 < i)) ? 1u : 0u;
  }
  const bool keep = valid && above < take;
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, keep);
  if (lane == 0) warp_n[warp] = static_cast<uint32_t>(__popc(ballot));
  __syncthreads();
  uint32_t before = static_cast<uint32_t>(__popc(ballot & ((1u << lane) - 1u)));
  for (int v = 0; v < warp; ++v) before += warp_n[v];
  int32_t* out = p.positions + b * p.p_b + h * p.p_h;
  if (keep) out[before] = p.pos[at];
  const int end = min(p.m, p.C);
  for (int j = static_cast<int>(take) + i; j < end; j += static_cast<int>(blockDim.x)) out[j] = -1;
  if (i == 0) p.counts[b * p.n_b + h * p.n_h] = static_cast<int32_t>(take);
}

// m > kPickRankMax (at most csel::kKeysPerBlock), one block per row: a one-block radix cut over the
// row's candidates held in shared memory.
__global__ void __launch_bounds__(512) pick_radix_kernel(PickArgs p) {
  cuda_detail::grid_dep_wait();  // the capacities and candidates of the kernels before (pdl.cuh)
  cuda_detail::grid_dep_launch();
  extern __shared__ __align__(16) uint32_t cand_keys[];
  __shared__ csel::Shared sh;
  const int row = static_cast<int>(blockIdx.x), b = row / p.H, h = row % p.H;
  const uint32_t n = min(p.count[row], static_cast<uint32_t>(p.m));
  const uint32_t take = pick_take(p, b, h, n);
  const int64_t first = static_cast<int64_t>(row) * p.m;
  for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(n); i += static_cast<int>(blockDim.x))
    cand_keys[i] = p.key[first + i];
  const csel::RowKeys<true> key_at{nullptr, cand_keys};
  const csel::Cut cut = csel::cluster_cut(key_at, cand_keys, static_cast<int>(n), take, sh, p.span);
  int32_t* out = p.positions + b * p.p_b + h * p.p_h;
  csel::emit_in_order(key_at, static_cast<int>(n), cut, sh, [&](uint32_t slot, int i) { out[slot] = p.pos[first + i]; });
  const int end = min(p.m, p.C);
  for (int j = static_cast<int>(cut.take + threadIdx.x); j < end; j += static_cast<int>(blockDim.x)) out[j] = -1;
  if (threadIdx.x == 0) p.counts[b * p.n_b + h * p.n_h] = static_cast<int32_t>(cut.take);
}

}  // namespace

namespace {

BudgetArgs budget_args(const BudgetOptions& o, const Tensor& importance, const Tensor& valid_lengths,
                       const Tensor& head_scores, const Tensor& out) {
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
  a.B = static_cast<int>(importance.shape[0]);
  a.H = static_cast<int>(importance.shape[1]);
  a.P = static_cast<int>(importance.shape[2]);
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
  return a;
}

void check_sizes(const Tensor& importance, const BudgetOptions& o) {
  const int64_t B = importance.shape[0], H = importance.shape[1], P = importance.shape[2];
  require(B * H <= 0x7FFFFFFF && P <= (int64_t{1} << 30), "capacities: importance is too large for CUDA");
  require(o.policy != Policy::adakv || H * P <= (int64_t{1} << 30),
          "capacities: adakv on CUDA needs Hkv * P <= 2^30");
}

// The capacities workspace (capacities_workspace_bytes) carved into AdaKV's arrays.
AdaWork ada_work(const Tensor& workspace, const BudgetArgs& a) {
  require(workspace.present, "capacities: adakv needs a workspace on CUDA");
  auto* ws = static_cast<unsigned char*>(workspace.data);
  const std::size_t cells = static_cast<std::size_t>(a.B) * static_cast<std::size_t>(a.H);
  AdaWork w{};
  const std::size_t parts_bytes = align256(16 * csel::kMaxCluster * cells);
  w.parts = reinterpret_cast<double*>(ws);
  w.counts = reinterpret_cast<uint32_t*>(ws + parts_bytes);
  w.candidates = reinterpret_cast<float*>(ws + parts_bytes + align256(4 * cells));
  w.stride = static_cast<int>(std::min<int64_t>(a.base * a.H, a.P));
  return w;
}

// One cluster per sequence over its H * stride candidates (adakv_alloc_kernel).
void launch_alloc(const BudgetArgs& a, const AdaWork& w, int device, cudaStream_t s) {
  const csel::RowClusters alloc = csel::plan_row_clusters(a.B, static_cast<int64_t>(a.H) * w.stride, device, "capacities",
                                                          sizeof(csel::Shared), AllocLayout(a.H).bytes);
  if (alloc.cached) {
    csel::launch_row_clusters(alloc, s, adakv_alloc_kernel<true>, a, w, alloc.chunk);
  } else {
    csel::launch_row_clusters(alloc, s, adakv_alloc_kernel<false>, a, w, alloc.chunk);
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

template <int NT>
void launch_top(const BudgetArgs& a, AdaWork& w, int device, cudaStream_t s) {
  const csel::RowClusters top = csel::plan_row_clusters(static_cast<int64_t>(a.B) * a.H, a.P, device, "capacities",
                                                        sizeof(csel::SharedT<NT>));
  w.top_blocks = top.G;
  if (top.cached) {
    csel::launch_row_clusters(top, s, adakv_top_kernel<true, NT>, a, w);
  } else {
    csel::launch_row_clusters(top, s, adakv_top_kernel<false, NT>, a, w);
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

// The shortlist forms where a row's G blocks' m candidates each fit one block (MIXKV_SELECT_MERGE=0: never).
inline bool merge_shortlists(int64_t m, int64_t P, int device) {
  const int G = csel::cluster_blocks(P, device);
  return G > 1 && G * m <= csel::kMergeMax && csel::env_int("MIXKV_SELECT_MERGE", 1) == 1;
}

template <int NT>
csel::RowClusters plan_top_candidates(const BudgetArgs& a, int64_t m, bool merge, int device) {
  const int G = csel::cluster_blocks(a.P, device);
  const std::size_t merge_bytes = merge ? 2 * static_cast<std::size_t>((G * m + 3) / 4 * 4) * sizeof(uint32_t) : 0;
  return csel::plan_row_clusters(2 * static_cast<int64_t>(a.B) * a.H, a.P, device, "capacities_select",
                                 sizeof(TopCandShared<NT>), merge_bytes);
}

template <int NT, bool kMerge>
void launch_top_candidates(const csel::RowClusters& plan, const BudgetArgs& a, AdaWork& w, const CandWork& c,
                           cudaStream_t s) {
  w.top_blocks = plan.G;
  if (plan.cached) {
    csel::launch_row_clusters(plan, s, adakv_top_candidates_kernel<true, NT, kMerge>, a, w, c);
  } else {
    csel::launch_row_clusters(plan, s, adakv_top_candidates_kernel<false, NT, kMerge>, a, w, c);
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

static_assert(kFusedMaxCandidates <= csel::kKeysPerBlock, "the last step holds a row's candidates in one block");

}  // namespace

namespace cuda {

void capacities(const BudgetOptions& o, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out, const Tensor& workspace, std::uintptr_t stream) {
  const int64_t B = importance.shape[0], H = importance.shape[1];
  if (B * H == 0) return;
  check_sizes(importance, o);
  cuda_detail::DeviceGuard guard(importance.device_id);
  const BudgetArgs a = budget_args(o, importance, valid_lengths, head_scores, out);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool ranks = o.policy == Policy::adakv && o.layer_idx >= o.ada_skip;
  if (!ranks) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>((B * H + 127) / 128));
    cfg.blockDim = dim3(128);
    cfg.stream = s;
    cudaLaunchAttribute attr[1] = {cuda_detail::pdl_attribute()};
    cfg.attrs = attr;
    cfg.numAttrs = cuda_detail::pdl_supported(importance.device_id) ? 1 : 0;
    MIXKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, closed_form_kernel, a));
    MIXKV_CUDA_CHECK_LAUNCH();
    return;
  }
  AdaWork w = ada_work(workspace, a);
  const int device = importance.device_id;
  if (o.ada_normalize) {
    launch_top<2>(a, w, device, s);
  } else {
    launch_top<1>(a, w, device, s);
  }
  launch_alloc(a, w, device, s);
}

void capacities_select(const BudgetOptions& o, const Tensor& importance, const Tensor& scores,
                       const Tensor& valid_lengths, const Tensor& head_scores, const Tensor& caps,
                       const Tensor& positions, const Tensor& counts, const Tensor& workspace, std::uintptr_t stream) {
  const int64_t B = importance.shape[0], H = importance.shape[1], P = importance.shape[2];
  const int64_t m = fused_candidates(o, H, P);
  auto unfused = [&] {  // the two operations one after the other
    mixkv::cuda::capacities(o, importance, valid_lengths, head_scores, caps, workspace, stream);
    mixkv::cuda::select(scores, caps, positions, counts, Tensor{}, stream);
  };
  if (B * H == 0 || m == 0) return unfused();
  check_sizes(importance, o);
  const int64_t C = positions.shape[2];
  require(C <= (int64_t{1} << 30), "capacities_select: positions may have at most 2^30 columns on CUDA, got ", C);
  cuda_detail::DeviceGuard guard(importance.device_id);
  const int device = importance.device_id;
  const BudgetArgs a = budget_args(o, importance, valid_lengths, head_scores, caps);
  const bool merge = merge_shortlists(m, P, device);
  const csel::RowClusters plan =
      o.ada_normalize ? plan_top_candidates<2>(a, m, merge, device) : plan_top_candidates<1>(a, m, merge, device);
  // The candidate rows run beside the ranking only while both halves fit one wave of one block per
  // multiprocessor (H100: B = 1, Hkv = 4 at 2k-32k: 8-64 blocks); in more waves they add their own
  // (B = 8, Hkv = 32, P = 2,000: 47.4 us fused against 40.7 for the two operations).
  if (plan.rows * plan.G > cuda_detail::sm_count(device)) return unfused();
  auto s = reinterpret_cast<cudaStream_t>(stream);
  AdaWork w = ada_work(workspace, a);
  const std::size_t cells = static_cast<std::size_t>(B * H);
  auto* extra = static_cast<unsigned char*>(workspace.data) + capacities_workspace_bytes(B, H, P);
  CandWork c{};
  c.scores = scores.ptr<float>();
  c.s_b = scores.stride[0];
  c.s_h = scores.stride[1];
  c.positions = positions.ptr<int32_t>();
  c.p_b = positions.stride[0];
  c.p_h = positions.stride[1];
  c.C = static_cast<int>(C);
  c.count = reinterpret_cast<uint32_t*>(extra);
  c.pos = reinterpret_cast<int32_t*>(extra + align256(4 * cells));
  c.key = reinterpret_cast<uint32_t*>(extra + align256(4 * cells) + align256(4 * cells * static_cast<std::size_t>(m)));
  c.m = static_cast<int>(m);
  if (merge) {
    if (o.ada_normalize) {
      launch_top_candidates<2, true>(plan, a, w, c, s);
    } else {
      launch_top_candidates<1, true>(plan, a, w, c, s);
    }
  } else if (o.ada_normalize) {
    launch_top_candidates<2, false>(plan, a, w, c, s);
  } else {
    launch_top_candidates<1, false>(plan, a, w, c, s);
  }
  launch_alloc(a, w, device, s);
  PickArgs p{caps.ptr<int32_t>(), caps.stride[0], caps.stride[1], c.count, c.pos, c.key, c.m,
             c.positions, c.p_b, c.p_h, c.C, counts.ptr<int32_t>(), counts.stride[0], counts.stride[1],
             a.H, a.P, a.span};
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(cells));
  cfg.stream = s;
  cudaLaunchAttribute attr[1] = {cuda_detail::pdl_attribute()};
  cfg.attrs = attr;
  cfg.numAttrs = cuda_detail::pdl_supported(device) ? 1 : 0;
  if (m <= kPickRankMax) {
    cfg.blockDim = dim3(kPickRankMax);
    MIXKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, pick_rank_kernel, p));
  } else {
    cfg.blockDim = dim3(512);
    cfg.dynamicSmemBytes = static_cast<std::size_t>(m) * sizeof(uint32_t);
    cuda_detail::fit_dynamic_smem(pick_radix_kernel, cfg.dynamicSmemBytes, "capacities_select");
    MIXKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, pick_radix_kernel, p));
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mixkv
