// Top-k building blocks spread over a thread-block cluster (sm_90): one row of keys is split into
// consecutive chunks, one per block of the cluster (block rank order = position order). A
// four-pass (8-bit digit) radix select finds the k-th largest key of the whole row: each pass
// builds a per-block histogram in shared memory, and after one cluster barrier every block sums
// the histograms of all blocks (distributed shared memory) and picks the same digit. Integer
// counts only: the result does not depend on timing. Blocks also learn how many chosen keys lie in
// lower-ranked blocks, so that each writes its own chosen entries in position order without a
// further exchange.
//
// Also a block-level select of several segments at once (one histogram per segment).
// Every function must be called by all threads of the block (and of the cluster where it says so).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "cuda_check.cuh"
#include "mixkv/error.hpp"
#include "radix_select.cuh"

namespace mixkv::cuda_detail::csel {

namespace cg = cooperative_groups;
using radix::key_value;
using radix::kNegInfKey;
using radix::order_key;

constexpr int kBins = 256;  // 8-bit digits, four passes
constexpr int kMaxWarps = 32;
constexpr int kMaxCluster = 8;  // portable cluster size
constexpr uint32_t kNone = 0xFFFFFFFFu;

// Thread-block clusters exist from sm_90 on. Device passes for older targets compile the same
// kernels against a one-block stand-in, and the host launches one-block "clusters" on such devices
// (cluster_blocks), so every architecture of the build runs the same algorithm.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
struct Cluster {
  __device__ unsigned num_blocks() const { return 1; }
  __device__ unsigned block_rank() const { return 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ void barrier_arrive() const {}
  __device__ void barrier_wait() const { __syncthreads(); }
  template <typename T>
  __device__ T* map_shared_rank(T* p, int) const { return p; }
};
__device__ inline Cluster this_cluster() { return {}; }
#else
using Cluster = cg::cluster_group;
__device__ inline Cluster this_cluster() { return cg::this_cluster(); }
#endif

// Blocks per row-cluster: about 1k keys per block, up to kMaxCluster; 1 before sm_90.
inline int cluster_blocks(int64_t keys, int device) {
  int major = 0;
  MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return 1;
  const int64_t want = (keys + 1023) / 1024;
  return static_cast<int>(want < 1 ? 1 : (want > kMaxCluster ? kMaxCluster : want));
}

struct Shared {
  uint32_t hist[2][kBins];  // this block's histogram, double-buffered across passes
  uint32_t red_tot[kBins];  // summed over the cluster
  uint32_t red_low[kBins];  // summed over lower-ranked blocks
  uint32_t warp_g[kMaxWarps];
  uint32_t warp_e[kMaxWarps];
  double warp_sum[kMaxWarps];
  double block_sum;  // read by other blocks of the cluster
  uint32_t digit, rem, g_low, e_low, total, total_low;
};

// Where the top `take` keys of a row end: every key above `key` is taken, and the first
// `take_equal` keys equal to it in position order. g_before / e_before: keys above / equal to `key`
// held by lower-ranked blocks of the cluster.
struct Cut {
  uint32_t key;
  uint32_t take_equal;
  uint32_t take;
  uint32_t g_before;
  uint32_t e_before;
};

__device__ __forceinline__ uint32_t warp_inclusive_scan(uint32_t v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t o = __shfl_up_sync(0xFFFFFFFFu, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

// One warp: scanning the bins from the top, the bin where the running count first reaches
// `want` (1 <= want <= total of tot[]). Lane l owns the bins of descending ranks [8l, 8l + 8).
// The one lane that finds it sets digit, rem = want - (count above the bin), and, when `low` is
// given, low_above = sum of low[] above the bin and low_at = low[bin]. Returns the total of tot[]
// (and of low[] in total_low) on every lane.
__device__ __forceinline__ uint32_t warp_find_digit(const uint32_t* tot, const uint32_t* low, uint32_t want,
                                                    uint32_t& total_low, uint32_t& digit, uint32_t& rem,
                                                    uint32_t& low_above, uint32_t& low_at, bool& found) {
  const int lane = threadIdx.x & 31;
  uint32_t t8[8], l8[8], ts = 0, ls = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int bin = kBins - 1 - (lane * 8 + j);
    t8[j] = tot[bin];
    l8[j] = low != nullptr ? low[bin] : 0u;
    ts += t8[j];
    ls += l8[j];
  }
  const uint32_t ti = warp_inclusive_scan(ts, lane), li = warp_inclusive_scan(ls, lane);
  const uint32_t total = __shfl_sync(0xFFFFFFFFu, ti, 31);
  total_low = __shfl_sync(0xFFFFFFFFu, li, 31);
  uint32_t above = ti - ts, lab = li - ls;
  found = false;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (want > 0 && above < want && above + t8[j] >= want) {
      found = true;
      digit = static_cast<uint32_t>(kBins - 1 - (lane * 8 + j));
      rem = want - above;
      low_above = lab;
      low_at = l8[j];
    }
    above += t8[j];
    lab += l8[j];
  }
  return total;
}

// Cluster-wide: the top min(c, keys above -inf) keys of the row whose chunk in this block is
// key_at(0 .. n_local-1). Keys <= order_key(-inf) never count. blockDim.x must be a multiple of 32
// and at least kBins. Every block of the cluster must call it with the same c. Afterwards other
// blocks may still read this block's `sh` until they pass one more cluster barrier (the caller
// arrives after this call and waits before exiting).
template <typename KeyAt>
__device__ Cut cluster_cut(KeyAt key_at, int n_local, uint32_t c, Shared& sh) {
  Cluster cluster = this_cluster();
  const unsigned G = cluster.num_blocks(), rank = cluster.block_rank();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  uint32_t prefix = 0, mask = 0, rem = 0;
  Cut cut{kNone, 0u, 0u, 0u, 0u};
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    uint32_t* hist = sh.hist[pass & 1];
    for (int i = tid; i < kBins; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    // Lanes holding the same digit add once (keys share their top bits often).
    for (int base = warp * 32; base < n_local; base += nwarps * 32) {
      const int i = base + lane;
      uint32_t d = kNone;
      if (i < n_local) {
        const uint32_t key = key_at(i);
        if (key > kNegInfKey && (key & mask) == prefix) d = (key >> shift) & 0xFFu;
      }
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, d);
      if (d != kNone && lane == __ffs(peers) - 1) atomicAdd(&hist[d], static_cast<unsigned>(__popc(peers)));
    }
    cluster.sync();
    if (tid < kBins) {
      uint32_t tot = 0, low = 0;
      for (unsigned r = 0; r < G; ++r) {
        const uint32_t v = cluster.map_shared_rank(hist, static_cast<int>(r))[tid];
        tot += v;
        low += r < rank ? v : 0u;
      }
      sh.red_tot[tid] = tot;
      sh.red_low[tid] = low;
    }
    __syncthreads();
    if (warp == 0) {
      uint32_t total_low = 0, digit = 0, r = 0, low_above = 0, low_at = 0;
      bool found = false;
      // pass 0: the histogram holds every key above -inf, so c can be clamped to it here
      uint32_t want = rem;
      if (pass == 0) {
        uint32_t t_unused = 0, d_unused = 0, r_unused = 0, la_unused = 0, lt_unused = 0;
        bool f_unused = false;
        const uint32_t total =
            warp_find_digit(sh.red_tot, sh.red_low, 0u, t_unused, d_unused, r_unused, la_unused, lt_unused, f_unused);
        want = min(c, total);
      }
      const uint32_t total =
          warp_find_digit(sh.red_tot, sh.red_low, want, total_low, digit, r, low_above, low_at, found);
      if (lane == 0) {
        sh.total = total;
        sh.total_low = total_low;
      }
      if (found) {
        sh.digit = digit;
        sh.rem = r;
        sh.g_low = low_above;
        sh.e_low = low_at;
      }
    }
    __syncthreads();
    if (pass == 0) {
      const uint32_t finite = sh.total;
      cut.take = min(c, finite);
      if (cut.take == 0) return cut;  // nothing is taken
      if (cut.take == finite) {       // everything above -inf is taken
        cut.key = kNegInfKey;
        cut.g_before = sh.total_low;
        return cut;
      }
    }
    prefix |= sh.digit << shift;
    mask |= 0xFFu << shift;
    rem = sh.rem;
    cut.g_before += sh.g_low;
    if (pass == 3) cut.e_before = sh.e_low;
  }
  cut.key = prefix;
  cut.take_equal = rem;
  return cut;
}

// Calls emit(slot, i) for every chosen entry i of this block's chunk, slot = its place among the
// chosen entries of the whole row in position order. Warp w scans a contiguous part of the chunk.
template <typename KeyAt, typename Emit>
__device__ void emit_in_order(KeyAt key_at, int n_local, const Cut& cut, Shared& sh, Emit emit) {
  if (cut.take == 0) return;  // uniform over the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int chunk = ((n_local + nwarps - 1) / nwarps + 31) / 32 * 32;
  const int lo = min(warp * chunk, n_local), hi = min(lo + chunk, n_local);
  const uint32_t T = cut.key;
  uint32_t greater = 0, equal = 0;
  for (int base = lo; base < hi; base += 32) {
    const int i = base + lane;
    const uint32_t key = i < hi ? key_at(i) : 0u;
    greater += __popc(__ballot_sync(0xFFFFFFFFu, i < hi && key > T));
    equal += __popc(__ballot_sync(0xFFFFFFFFu, i < hi && key == T));
  }
  if (lane == 0) {
    sh.warp_g[warp] = greater;
    sh.warp_e[warp] = equal;
  }
  __syncthreads();
  uint32_t g_before = cut.g_before, e_before = cut.e_before;
  for (int w = 0; w < warp; ++w) {
    g_before += sh.warp_g[w];
    e_before += sh.warp_e[w];
  }
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int base = lo; base < hi; base += 32) {
    const int i = base + lane;
    const uint32_t key = i < hi ? key_at(i) : 0u;
    const bool is_g = i < hi && key > T, is_e = i < hi && key == T;
    const unsigned bg = __ballot_sync(0xFFFFFFFFu, is_g), be = __ballot_sync(0xFFFFFFFFu, is_e);
    const uint32_t g = g_before + __popc(bg & lower_lanes), e = e_before + __popc(be & lower_lanes);
    if (is_g) {
      const uint32_t slot = g + min(e, cut.take_equal);
      if (slot < cut.take) emit(slot, i);
    } else if (is_e && e < cut.take_equal) {
      const uint32_t slot = g + e;
      if (slot < cut.take) emit(slot, i);
    }
    g_before += __popc(bg);
    e_before += __popc(be);
  }
}

// Loads n float values src[0 .. n) as order keys into keys[]; U loads per thread in flight.
template <int U>
__device__ __forceinline__ void load_keys(const float* __restrict__ src, int n, uint32_t* keys) {
  for (int base = threadIdx.x; base < n; base += blockDim.x * U) {
    float v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * blockDim.x;
      v[u] = i < n ? src[i] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * blockDim.x;
      if (i < n) keys[i] = order_key(v[u]);
    }
  }
}

// Block-level, several segments at once: for each segment s < S, the want[s]-th largest of the
// keys key_at(s, j), j in [0, n), counting only keys above order_key(-inf) (want[s] must not exceed
// their number; want[s] = 0 selects nothing). On return prefix[s] is that key (kNone when
// want[s] = 0) and rem[s] how many keys equal to it belong to the top want[s].
// Shared arrays: prefix[S], rem[S], hist[S * kBins]. blockDim.x must be a multiple of 32.
template <typename KeyAt>
__device__ void segmented_cut(int S, int n, KeyAt key_at, const uint32_t* want, uint32_t* prefix, uint32_t* rem,
                              uint32_t* hist) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  for (int s = tid; s < S; s += blockDim.x) {
    prefix[s] = want[s] > 0 ? 0u : kNone;
    rem[s] = want[s];
  }
  uint32_t mask = 0;
  const int total = S * n;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = tid; i < S * kBins; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    for (int base = warp * 32; base < total; base += nwarps * 32) {
      const int i = base + lane;
      uint32_t d = kNone;
      if (i < total) {
        const int s = i / n, j = i - s * n;
        if (rem[s] > 0) {
          const uint32_t key = key_at(s, j);
          if (key > kNegInfKey && (key & mask) == prefix[s])
            d = static_cast<uint32_t>(s) * kBins + ((key >> shift) & 0xFFu);
        }
      }
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, d);
      if (d != kNone && lane == __ffs(peers) - 1) atomicAdd(&hist[d], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    for (int s = warp; s < S; s += nwarps) {
      const uint32_t want_s = rem[s];
      if (want_s == 0) continue;  // uniform over the warp
      uint32_t total_low = 0, digit = 0, r = 0, la = 0, lt = 0;
      bool found = false;
      warp_find_digit(hist + s * kBins, nullptr, want_s, total_low, digit, r, la, lt, found);
      __syncwarp();
      if (found) {
        prefix[s] |= digit << shift;
        rem[s] = r;
      }
    }
    mask |= 0xFFu << shift;
    __syncthreads();
  }
}

// Largest dynamic shared memory a block may opt in to on `device` (cached per device).
inline int smem_optin(int device) {
  static std::atomic<int> cache[64] = {};
  if (device >= 0 && device < 64) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < 64) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Launch shape of a cluster-per-row kernel: G blocks per row (about 1k keys each, cluster_blocks),
// `chunk` keys per block, the block's keys cached in dynamic shared memory when they fit.
struct RowClusters {
  int64_t rows = 0;
  int G = 1;
  int chunk = 0;
  unsigned threads = 256;
  std::size_t cache_bytes = 0;
  bool cached = false;
};

inline RowClusters plan_row_clusters(int64_t rows, int64_t keys, int device, const char* op) {
  RowClusters p;
  p.rows = rows;
  p.G = cluster_blocks(keys, device);
  require(rows * p.G <= 0x7FFFFFFF, op, ": too many rows for one launch");
  p.chunk = static_cast<int>((keys + p.G - 1) / p.G);
  p.threads = p.chunk > 2048 ? 512u : 256u;
  p.cache_bytes = static_cast<std::size_t>(p.chunk) * sizeof(uint32_t);
  p.cached = p.cache_bytes + sizeof(Shared) + 1024 <= static_cast<std::size_t>(smem_optin(device));
  return p;
}

// Launches `kernel` (its cached or uncached variant, as p.cached says) over p.rows clusters.
template <typename... KernelArgs, typename... Args>
void launch_row_clusters(const RowClusters& p, cudaStream_t stream, void (*kernel)(KernelArgs...), Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(p.rows * p.G));
  cfg.blockDim = dim3(p.threads);
  cfg.dynamicSmemBytes = p.cached ? p.cache_bytes : 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(p.G);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.G > 1 ? 1 : 0;  // no cluster attribute where clusters do not exist
  if (p.cached && p.cache_bytes > 48 * 1024)
    MIXKV_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.cache_bytes)));
  MIXKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

}  // namespace mixkv::cuda_detail::csel
