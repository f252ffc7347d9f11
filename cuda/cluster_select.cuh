// Top-k building blocks spread over a thread-block cluster (sm_90): one row of keys is split into
// consecutive chunks, one per block of the cluster (block rank order = position order). A radix
// select (8-bit digits from the highest bit in which the row's keys differ, at most four passes)
// finds the k-th largest key of the whole row: each pass
// builds a per-block histogram in shared memory, and after one cluster barrier every block sums
// the histograms of all blocks (distributed shared memory) and picks the same digit. Integer
// counts only: the result does not depend on timing. Blocks also learn how many chosen keys lie in
// lower-ranked blocks, so that each writes its own chosen entries in position order without a
// further exchange. Up to two cuts (two different k) of the same row come out of one set of passes.
//
// Rows of up to kKeysPerBlock keys take one block and no cluster (block barriers only); that is
// also the only shape before sm_90, where a one-block stand-in replaces the cluster.
// Every function must be called by all threads of the block (and of the cluster where it says so).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "cuda_check.cuh"
#include "dynamic_smem.cuh"
#include "pdl.cuh"
#include "mixkv/error.hpp"
#include "radix_select.cuh"

namespace mixkv::cuda_detail::csel {

namespace cg = cooperative_groups;
using radix::key_value;
using radix::kNegInfKey;
using radix::order_key;

constexpr int kBins = 256;  // 8-bit digits, at most four passes
constexpr int kGroups = kBins / 32;
constexpr int kMaxWarps = 32;
constexpr int kPortableCluster = 8;
constexpr int kMaxCluster = 16;  // above 8: non-portable cluster sizes (sm_90 allows 16)
constexpr int kMaxTargets = 2;
constexpr uint32_t kNone = 0xFFFFFFFFu;
// cluster_cut's span step (one more row barrier, to start the passes at the highest bit in which the
// row's keys differ) pays on rows of up to kSpanMaxBlocks blocks; on longer ones its barrier cost more
// than the passes it saved (H100: select of 4 x 31,968 keys 13.8 against 12.1 us, of 4 x 2,016 keys 6.1
// against 6.7; the compression step at 8k 3 us faster with AdaKV). kSpanAuto takes it there only.
constexpr int kSpanAuto = 2;
constexpr int kSpanMaxBlocks = 2;

// Thread-block clusters exist from sm_90 on. Device passes for older targets compile the same
// kernels against a one-block stand-in, and the host launches one block per row on such devices
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

// A barrier over the blocks of a row: the cluster's, or the block's when the row has one block.
__device__ __forceinline__ void row_sync(const Cluster& cluster, unsigned G) {
  if (G > 1) {
    cluster.sync();
  } else {
    __syncthreads();
  }
}

template <int NT>
struct alignas(16) SharedT {
  uint32_t hist[3][NT][kBins];  // this block's histograms (one per target), one buffer per pass mod 3
  uint32_t sum_tot[NT][kBins];  // summed over the cluster (clusters of more than one block)
  uint32_t sum_low[NT][kBins];  // the same over lower-ranked blocks only
  uint32_t warp_g[kMaxWarps];
  uint32_t warp_e[kMaxWarps];
  double warp_sum[2][kMaxWarps];
  uint32_t span[2];  // smallest and largest key above -inf of this block's chunk (cluster_cut)
};
using Shared = SharedT<1>;

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

// Histogram of 256 bins as one warp sees it: lane l holds the bins of ranks [8l, 8l + 8) from the
// top (t[j]: rank 8l + j), and the counts above its first bin.
struct WarpBins {
  uint32_t t[8], l[8];
  uint32_t t_above, l_above, total, total_low;
};

__device__ __forceinline__ void load8_desc(const uint32_t* bins, int lane, uint32_t (&v)[8]) {
  const uint4 hi = *reinterpret_cast<const uint4*>(bins + kBins - 4 - 8 * lane);
  const uint4 lo = *reinterpret_cast<const uint4*>(bins + kBins - 8 - 8 * lane);
  v[0] = hi.w;
  v[1] = hi.z;
  v[2] = hi.y;
  v[3] = hi.x;
  v[4] = lo.w;
  v[5] = lo.z;
  v[6] = lo.y;
  v[7] = lo.x;
}

// tot / low: 16-byte aligned arrays of kBins counts; low may be null (all zero).
__device__ __forceinline__ WarpBins warp_bins(const uint32_t* tot, const uint32_t* low) {
  const int lane = threadIdx.x & 31;
  WarpBins w;
  load8_desc(tot, lane, w.t);
  if (low != nullptr) {
    load8_desc(low, lane, w.l);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) w.l[j] = 0u;
  }
  uint32_t ts = 0, ls = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    ts += w.t[j];
    ls += w.l[j];
  }
  const uint32_t ti = warp_inclusive_scan(ts, lane), li = warp_inclusive_scan(ls, lane);
  w.t_above = ti - ts;
  w.l_above = li - ls;
  w.total = __shfl_sync(0xFFFFFFFFu, ti, 31);
  w.total_low = __shfl_sync(0xFFFFFFFFu, li, 31);
  return w;
}

struct Digit {
  uint32_t digit;      // the bin where the running count from the top first reaches `want`
  uint32_t above;      // keys in higher bins
  uint32_t at;         // keys in the bin
  uint32_t low_above;  // the same two, counting lower-ranked blocks only
  uint32_t low_at;
};

// Every lane gets the same answer; 1 <= want <= w.total.
__device__ __forceinline__ Digit warp_find(const WarpBins& w, uint32_t want) {
  const int lane = threadIdx.x & 31;
  uint32_t above = w.t_above, lab = w.l_above;
  Digit mine{0u, 0u, 0u, 0u, 0u};
  bool found = false;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (above < want && above + w.t[j] >= want) {
      found = true;
      mine = Digit{static_cast<uint32_t>(kBins - 1 - (lane * 8 + j)), above, w.t[j], lab, w.l[j]};
    }
    above += w.t[j];
    lab += w.l[j];
  }
  const int src = __ffs(__ballot_sync(0xFFFFFFFFu, found)) - 1;
  Digit d;
  d.digit = __shfl_sync(0xFFFFFFFFu, mine.digit, src);
  d.above = __shfl_sync(0xFFFFFFFFu, mine.above, src);
  d.at = __shfl_sync(0xFFFFFFFFu, mine.at, src);
  d.low_above = __shfl_sync(0xFFFFFFFFu, mine.low_above, src);
  d.low_at = __shfl_sync(0xFFFFFFFFu, mine.low_at, src);
  return d;
}

// Calls f(key) for each of the block's n_local keys, spread over its threads: from `cached` four at a
// time (16-byte shared loads) when set, else through key_at.
template <typename KeyAt, typename F>
__device__ __forceinline__ void for_each_key(KeyAt key_at, const uint32_t* cached, int n_local, F& f) {
  const int tid = threadIdx.x;
  if (cached != nullptr) {
    const int n4 = n_local >> 2;
    const uint4* k4 = reinterpret_cast<const uint4*>(cached);
    for (int i = tid; i < n4; i += blockDim.x) {
      const uint4 v = k4[i];
      f(v.x);
      f(v.y);
      f(v.z);
      f(v.w);
    }
    for (int i = 4 * n4 + tid; i < n_local; i += blockDim.x) f(cached[i]);
  } else {
    for (int i = tid; i < n_local; i += blockDim.x) f(key_at(i));
  }
}

// The highest bit in which the row's keys above -inf differ (0 when they are all equal, and any value
// when there are none: the caller's first histogram then counts nothing), and in `common` the bits
// above it that they all share. Each block folds its chunk's minimum and maximum; the blocks exchange
// them over one row barrier. Every thread of the cluster gets the same answer.
template <int NT, typename KeyAt>
__device__ __forceinline__ int row_span_top(KeyAt key_at, const uint32_t* cached, int n_local, SharedT<NT>& sh,
                            const Cluster& cluster, unsigned G, uint32_t& common) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  uint32_t lo = 0xFFFFFFFFu, hi = 0u;
  auto see = [&](uint32_t k) {
    if (k > kNegInfKey) lo = min(lo, k), hi = max(hi, k);
  };
  for_each_key(key_at, cached, n_local, see);
  lo = __reduce_min_sync(0xFFFFFFFFu, lo);
  hi = __reduce_max_sync(0xFFFFFFFFu, hi);
  if (lane == 0) sh.warp_g[warp] = lo, sh.warp_e[warp] = hi;
  __syncthreads();
  if (warp == 0) {
    lo = __reduce_min_sync(0xFFFFFFFFu, lane < nwarps ? sh.warp_g[lane] : 0xFFFFFFFFu);
    hi = __reduce_max_sync(0xFFFFFFFFu, lane < nwarps ? sh.warp_e[lane] : 0u);
    if (lane == 0) sh.span[0] = lo, sh.span[1] = hi;
  }
  row_sync(cluster, G);  // every block's span is written (and, for one block, visible to all warps)
  if (G > 1) {
    const bool mine = lane < static_cast<int>(G);
    lo = mine ? *cluster.map_shared_rank(&sh.span[0], lane) : 0xFFFFFFFFu;
    hi = mine ? *cluster.map_shared_rank(&sh.span[1], lane) : 0u;
    lo = __reduce_min_sync(0xFFFFFFFFu, lo);
    hi = __reduce_max_sync(0xFFFFFFFFu, hi);
  } else {
    lo = sh.span[0], hi = sh.span[1];
  }
  if (lo > hi) {  // no key above -inf anywhere in the row
    common = 0u;
    return 31;
  }
  const uint32_t diff = lo ^ hi;
  const int top = diff == 0u ? 0 : 31 - __clz(diff);
  common = top == 31 ? 0u : lo & ~((2u << top) - 1u);
  return top;
}

// Cluster-wide: for each target q < NT, the top min(c[q], keys above -inf) keys of the row whose
// chunk in this block is key_at(0 .. n_local-1). Keys <= order_key(-inf) never count. blockDim.x
// must be a multiple of 32. Every block of the cluster must call it with the same c[]. The keys must
// be readable by every thread after the first block barrier here (callers may cache them right
// before the call). Afterwards other blocks may still read this block's `sh` until they pass one
// more cluster barrier (the caller arrives after this call and waits before exiting).
// Per pass: one row barrier (cluster, or block for one-block rows) and, in clusters, one block
// barrier after summing the histograms of all blocks. Every block sees the same summed histograms,
// so every decision below is uniform over the cluster; every warp locates the digit itself. A target
// stops early when its cut falls on a bin boundary (every key of the chosen bin is taken); two
// targets share one histogram while their prefixes agree. Histograms take one shared atomic per
// counted key (measured faster than warp aggregation, __match_any_sync or ballots, on sm_90).
// cached: the chunk's keys in shared memory (16-byte aligned; read four at a time), or null.
// kLocal: the cut of this block's keys alone, as if the row had one block (block barriers only; callable by
// one block of a cluster, the others not taking part).
template <int NT, bool kLocal = false, typename KeyAt>
__device__ void cluster_cut(KeyAt key_at, const uint32_t* cached, int n_local, const uint32_t (&c)[NT],
                            SharedT<NT>& sh, Cut (&cut)[NT], int span = kSpanAuto) {
  static_assert(NT >= 1 && NT <= kMaxTargets, "one or two targets");
  Cluster cluster = this_cluster();
  const unsigned G = kLocal ? 1u : cluster.num_blocks(), rank = kLocal ? 0u : cluster.block_rank();
  const int tid = threadIdx.x;
  uint32_t prefix[NT], rem[NT];
  bool active[NT];
#pragma unroll
  for (int q = 0; q < NT; ++q) {
    cut[q] = Cut{kNone, 0u, 0u, 0u, 0u};
    prefix[q] = 0u;
    rem[q] = 0u;
    active[q] = true;
  }
  // buffers 0 and 1 now; buffer (p + 2) % 3 after the row barrier of pass p: its last readers
  // (pass p - 1) are past that barrier, its next writers (pass p + 2) behind the next one
  for (int i = tid; i < 2 * NT * kBins; i += blockDim.x) (&sh.hist[0][0][0])[i] = 0u;
  // The row's keys above -inf share every bit above the highest bit in which their minimum and
  // maximum differ: the passes start there (scores of one row usually share their sign and most of
  // their exponent, which a first digit on the top eight bits would spend a pass, and one shared
  // atomic address per key, on).
  __syncthreads();  // the buffers are clear and the keys the caller cached are visible to every thread
  uint32_t common = 0u;
  int top = 31;  // without the span step: every pass from the top bit
  if (span == kSpanAuto ? G <= kSpanMaxBlocks : span != 0)
    top = row_span_top(key_at, cached, n_local, sh, cluster, G, common);
  uint32_t mask = top == 31 ? 0u : ~((2u << top) - 1u);
#pragma unroll
  for (int q = 0; q < NT; ++q) prefix[q] = common;
  int shift = top >= 7 ? top - 7 : 0, width = top - shift + 1;
  for (int pass = 0;; ++pass) {
    const int buf = pass % 3;
    const uint32_t dmask = (1u << width) - 1u;
    // histogram slot of each target: target 1 reads target 0's while their prefixes agree
    int slot[NT];
    bool built[NT];
#pragma unroll
    for (int q = 0; q < NT; ++q) {
      slot[q] = q == 1 && active[0] && prefix[0] == prefix[1] ? 0 : q;
      built[q] = active[q] && slot[q] == q;
    }
    uint32_t* hist = &sh.hist[buf][0][0];
    auto count = [&](uint32_t key) {
      if (key <= kNegInfKey) return;
#pragma unroll
      for (int q = 0; q < NT; ++q)
        if (built[q] && (key & mask) == prefix[q]) {
          atomicAdd(&hist[q * kBins + ((key >> shift) & dmask)], 1u);
          return;  // prefixes of built slots differ: a key counts once
        }
    };
    for_each_key(key_at, cached, n_local, count);
    row_sync(cluster, G);  // every block's histograms of this pass are complete
    for (int i = tid; i < NT * kBins; i += blockDim.x) (&sh.hist[(pass + 2) % 3][0][0])[i] = 0u;
    if (G > 1) {
      for (int q = tid; q < NT * kBins; q += blockDim.x) {
        const int s = q / kBins, bin = q % kBins;
        bool use = false;
#pragma unroll
        for (int k = 0; k < NT; ++k) use = use || (k == s && built[k]);
        if (!use) continue;
        uint32_t v[kMaxCluster];  // every remote load in flight at once
#pragma unroll
        for (int r = 0; r < kMaxCluster; ++r)
          v[r] = r < static_cast<int>(G) ? *cluster.map_shared_rank(&sh.hist[buf][s][bin], r) : 0u;
        uint32_t tot = 0, low = 0;
#pragma unroll
        for (int r = 0; r < kMaxCluster; ++r) {
          tot += v[r];
          low += r < static_cast<int>(rank) ? v[r] : 0u;
        }
        sh.sum_tot[s][bin] = tot;
        sh.sum_low[s][bin] = low;
      }
      __syncthreads();
    }
    bool more = false;
#pragma unroll
    for (int q = 0; q < NT; ++q) {
      if (!active[q]) continue;
      const int s = slot[q];
      const WarpBins wb = G > 1 ? warp_bins(sh.sum_tot[s], sh.sum_low[s]) : warp_bins(sh.hist[buf][s], nullptr);
      if (pass == 0) {  // the histogram of pass 0 holds every key above -inf
        cut[q].take = min(c[q], wb.total);
        if (cut[q].take == 0) {  // nothing is taken
          active[q] = false;
          continue;
        }
        if (cut[q].take == wb.total) {  // everything above -inf is taken
          cut[q].key = kNegInfKey;
          cut[q].g_before = wb.total_low;
          active[q] = false;
          continue;
        }
        rem[q] = cut[q].take;
      }
      const Digit d = warp_find(wb, rem[q]);
      const uint32_t p = prefix[q] | (d.digit << shift);
      if (d.at == rem[q] - d.above && p > kNegInfKey) {  // the whole bin is taken: exactly the keys >= p
        cut[q].key = p - 1u;
        cut[q].take_equal = 0u;
        cut[q].g_before += d.low_above + d.low_at;
        active[q] = false;
        continue;
      }
      prefix[q] = p;
      rem[q] -= d.above;
      cut[q].g_before += d.low_above;
      if (shift == 0) {  // every bit decided: the ties at p are taken in position order
        cut[q].key = p;
        cut[q].take_equal = rem[q];
        cut[q].e_before = d.low_at;
        active[q] = false;
      }
      more = more || active[q];
    }
    if (!more) return;
    mask |= dmask << shift;
    width = shift < 8 ? shift : 8;
    shift -= width;
  }
}

// One target: the top min(c, keys above -inf) keys (see above).
template <bool kLocal = false, typename KeyAt>
__device__ Cut cluster_cut(KeyAt key_at, const uint32_t* cached, int n_local, uint32_t c, Shared& sh,
                           int span = kSpanAuto) {
  const uint32_t cs[1] = {c};
  Cut cut[1];
  cluster_cut<1, kLocal>(key_at, cached, n_local, cs, sh, cut, span);
  return cut[0];
}

// Calls emit(slot, i) for every chosen entry i of this block's chunk, slot = its place among the
// chosen entries of the whole row in position order. Warp w scans a contiguous part of the chunk.
template <int NT, typename KeyAt, typename Emit>
__device__ void emit_in_order(KeyAt key_at, int n_local, const Cut& cut, SharedT<NT>& sh, Emit emit) {
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
  // counts of the lower warps, lane w reading warp w's
  uint32_t g_before = cut.g_before + __reduce_add_sync(0xFFFFFFFFu, lane < warp ? sh.warp_g[lane] : 0u);
  uint32_t e_before = cut.e_before + __reduce_add_sync(0xFFFFFFFFu, lane < warp ? sh.warp_e[lane] : 0u);
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

// A cluster's shortlists (rows whose G blocks' candidates fit one block): block 0's shared arrays of G slots
// of m keys and positions, slot r holding block r's candidates in position order (entries past them below
// -inf); the other blocks' copies go unused.
struct Shortlist {
  uint32_t* key;  // [G][m]
  int32_t* pos;
};

// Writes this block's chosen entries (cut `mine` of its chunk: order keys, positions lo + i when with_pos)
// into slot `rank` of block 0's Shortlist, keys below -inf past them. The caller arrived on the cluster
// barrier at its start (every block has started before a remote write) and this waits for that phase
// first; it ends with a cluster barrier, after which block 0 holds every block's entries.
template <typename KeyAt>
__device__ __forceinline__ void push_shortlist(KeyAt key_at, int n_local, const Cut& mine, Shared& sh,
                                               const Cluster& cluster, int rank, const Shortlist& mg, int m, int lo,
                                               bool with_pos) {
  cluster.barrier_wait();
  uint32_t* to_key = cluster.map_shared_rank(mg.key, 0) + rank * m;
  int32_t* to_pos = cluster.map_shared_rank(mg.pos, 0) + rank * m;
  emit_in_order(key_at, n_local, mine, sh, [&](uint32_t slot, int i) {
    to_key[slot] = key_at(i);
    if (with_pos) to_pos[slot] = lo + i;
  });
  for (int i = static_cast<int>(mine.take) + static_cast<int>(threadIdx.x); i < m; i += blockDim.x) to_key[i] = 0u;
  cluster.sync();
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

// The order key of a block's local position i: from the keys the block cached in shared memory
// (kCached), or read from global memory and converted on every call.
template <bool kCached>
struct RowKeys {
  const float* __restrict__ src;
  const uint32_t* cached;
  __device__ __forceinline__ uint32_t operator()(int i) const {
    if constexpr (kCached) {
      return cached[i];
    } else {
      return order_key(src[i]);
    }
  }
};

// The block's n keys src[0 .. n) as RowKeys, cached into `cached` first when kCached.
template <bool kCached>
__device__ __forceinline__ RowKeys<kCached> row_keys(const float* __restrict__ src, int n, uint32_t* cached) {
  if constexpr (kCached) load_keys<8>(src, n, cached);
  return RowKeys<kCached>{src, cached};
}

// Fixed-order float64 sums of two values per thread over the block (thread 0's result is exact to
// the order: lanes, then warps in order). Returns the sums on thread 0 only.
template <int NT>
__device__ __forceinline__ void block_sum2(double& x, double& y, SharedT<NT>& sh) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    x += __shfl_down_sync(0xFFFFFFFFu, x, d);
    y += __shfl_down_sync(0xFFFFFFFFu, y, d);
  }
  if ((threadIdx.x & 31) == 0) {
    sh.warp_sum[0][threadIdx.x >> 5] = x;
    sh.warp_sum[1][threadIdx.x >> 5] = y;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    x = 0.0;
    y = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
      x += sh.warp_sum[0][w];
      y += sh.warp_sum[1][w];
    }
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

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// When cluster_cut starts at the row's highest differing bit: MIXKV_SELECT_SPAN (read per call; for
// measurements and tests) 0 never, 1 always, else kSpanAuto.
inline int span_mode() {
  const int v = env_int("MIXKV_SELECT_SPAN", kSpanAuto);
  return v == 0 || v == 1 ? v : kSpanAuto;
}

// Rows of up to this many keys take one block without a cluster; longer rows about this many keys
// per block of their cluster.
constexpr int kKeysPerBlock = 4096;
// Most candidates (blocks x columns) a cluster's shortlists may hold for one block to merge them.
constexpr int kMergeMax = 4096;

// Blocks per row-cluster: 1 up to kKeysPerBlock keys and before sm_90, else up to kPortableCluster.
// MIXKV_SELECT_MAX_CLUSTER (environment, read per call; for tests) caps it: 1 runs the one-block
// path of older devices on sm_90.
inline int cluster_blocks(int64_t keys, int device) {
  int major = 0;
  MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return 1;
  const int per_block = kKeysPerBlock;
  int gmax = env_int("MIXKV_SELECT_MAX_CLUSTER", kPortableCluster);
  gmax = gmax < 1 ? 1 : (gmax > kMaxCluster ? kMaxCluster : gmax);
  const int64_t want = (keys + per_block - 1) / per_block;
  return static_cast<int>(want < 1 ? 1 : (want > gmax ? gmax : want));
}

// Launch shape of a cluster-per-row kernel: G blocks per row (cluster_blocks), `chunk` keys per
// block, `extra` bytes of dynamic shared memory ahead of the block's keys, which are cached in
// dynamic shared memory when they fit.
struct RowClusters {
  int64_t rows = 0;
  int G = 1;
  int chunk = 0;
  unsigned threads = 256;
  std::size_t extra = 0;
  std::size_t dyn_bytes = 0;
  bool cached = false;
  bool pdl = false;  // launched with programmatic dependence (the kernel waits first: pdl.cuh)
};

inline RowClusters plan_row_clusters(int64_t rows, int64_t keys, int device, const char* op,
                                     std::size_t static_bytes, std::size_t extra = 0) {
  RowClusters p;
  p.rows = rows;
  p.pdl = pdl_supported(device);
  p.G = cluster_blocks(keys, device);
  require(rows * p.G <= 0x7FFFFFFF, op, ": too many rows for one launch");
  p.chunk = static_cast<int>((keys + p.G - 1) / p.G);
  p.threads = p.chunk > 1024 ? 512u : 256u;
  p.extra = (extra + 15) / 16 * 16;
  const std::size_t optin = static_cast<std::size_t>(smem_optin(device));
  require(p.extra + static_bytes + 1024 <= optin, op, ": too many kv heads for the shared memory of one block");
  const std::size_t cache_bytes = static_cast<std::size_t>(p.chunk) * sizeof(uint32_t);
  p.cached = p.extra + cache_bytes + static_bytes + 1024 <= optin;
  p.dyn_bytes = p.extra + (p.cached ? cache_bytes : 0);
  return p;
}

// Launches `kernel` (its cached or uncached variant, as p.cached says) over p.rows clusters; with p.pdl
// programmatically dependent on the previous kernel (every kernel launched here calls grid_dep_wait first).
template <typename... KernelArgs, typename... Args>
void launch_row_clusters(const RowClusters& p, cudaStream_t stream, void (*kernel)(KernelArgs...), Args... args) {
  // never more threads than the function allows (instrumenting tools may lower the limit); every
  // kernel here works with any multiple of 32 threads
  cudaFuncAttributes fa{};
  MIXKV_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  const unsigned limit = static_cast<unsigned>(fa.maxThreadsPerBlock) / 32u * 32u;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(p.rows * p.G));
  cfg.blockDim = dim3(limit >= 32u && limit < p.threads ? limit : p.threads);
  cfg.dynamicSmemBytes = p.dyn_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned count = 0;
  if (p.G > 1) {  // one block per row: no cluster
    attr[count].id = cudaLaunchAttributeClusterDimension;
    attr[count].val.clusterDim.x = static_cast<unsigned>(p.G);
    attr[count].val.clusterDim.y = 1;
    attr[count].val.clusterDim.z = 1;
    ++count;
  }
  if (p.pdl) attr[count++] = pdl_attribute();
  cfg.attrs = attr;
  cfg.numAttrs = count;
  fit_dynamic_smem(kernel, p.dyn_bytes, "select");
  if (p.G > kPortableCluster)
    MIXKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  // Tools that instrument kernels (compute-sanitizer) can raise the registers a thread needs above
  // what the compiled kernel reports, so a 512-thread block may no longer fit (a cluster launch
  // then reports an invalid value). Every kernel here works with any multiple of 32 threads: the
  // launch is retried once with 256.
  if ((err == cudaErrorInvalidValue || err == cudaErrorLaunchOutOfResources) && cfg.blockDim.x > 256u) {
    const cudaError_t cleared = cudaGetLastError();  // the failed launch's error, handled here
    (void)cleared;
    cfg.blockDim = dim3(256u);
    err = cudaLaunchKernelEx(&cfg, kernel, args...);
  }
  MIXKV_CUDA_CHECK(err);
}

}  // namespace mixkv::cuda_detail::csel
