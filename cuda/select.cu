// CUDA top-c selection: one block per (b, h) row up to 4k positions, longer rows one thread-block
// cluster (up to 8 blocks, ~4k positions each). Each block caches its chunk of the row as
// order-preserving keys in shared memory, a cluster-wide radix select (at most four passes) finds
// the c-th largest key, and each block writes its chosen positions at their place in the ascending
// output (cluster_select.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cuda_check.cuh"
#include "device_guard.cuh"
#include "pdl.cuh"
#include "mixkv/error.hpp"
#include "mixkv/select.hpp"
#include "cluster_select.cuh"
#include "radix_select.cuh"

namespace mixkv {
namespace {

namespace csel = cuda_detail::csel;
namespace cg = cooperative_groups;

struct SelectArgs {
  const float* scores;
  int64_t s_b, s_h;
  const int32_t* caps;
  int64_t c_b, c_h;
  int32_t* positions;
  int64_t p_b, p_h;
  int32_t* counts;
  int64_t n_b, n_h;
  int H, P, C;
  int span;  // cluster_cut's span step (csel::span_mode)
};

// One cluster of G blocks per (b, h) row; block r of the cluster holds positions
// [r * chunk, (r + 1) * chunk) of the row (as order keys in shared memory when kCached).
template <bool kCached>
__global__ void __launch_bounds__(512) select_rows_kernel(SelectArgs a, int chunk) {
  cuda_detail::grid_dep_wait();  // the scores and capacities of the kernels before (pdl.cuh)
  cuda_detail::grid_dep_launch();
  extern __shared__ uint32_t cached_keys[];
  __shared__ csel::Shared sh;
  csel::Cluster cluster = csel::this_cluster();
  const int G = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int row = static_cast<int>(blockIdx.x) / G;
  const int b = row / a.H, h = row % a.H;
  const int lo = min(rank * chunk, a.P), n_local = min(lo + chunk, a.P) - lo;
  const float* src = a.scores + b * a.s_b + h * a.s_h + lo;
  int32_t* out = a.positions + b * a.p_b + h * a.p_h;
  const int cap = a.caps[b * a.c_b + h * a.c_h];  // in flight while the keys load
  const auto key_at = csel::row_keys<kCached>(src, n_local, cached_keys);
  const uint32_t c = static_cast<uint32_t>(min(max(cap, 0), min(a.P, a.C)));
  const csel::Cut cut = csel::cluster_cut(key_at, kCached ? cached_keys : nullptr, n_local, c, sh, a.span);
  if (G > 1) cluster.barrier_arrive();  // this block reads no other block's memory from here on
  csel::emit_in_order(key_at, n_local, cut, sh, [&](uint32_t slot, int i) { out[slot] = lo + i; });
  const int stride = G * static_cast<int>(blockDim.x);
  for (int i = static_cast<int>(cut.take) + rank * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
       i < a.C; i += stride)
    out[i] = -1;
  if (rank == 0 && threadIdx.x == 0) a.counts[b * a.n_b + h * a.n_h] = static_cast<int32_t>(cut.take);
  if (G > 1) cluster.barrier_wait();  // the others may read this block's histograms until they arrive
}

// Rows of a cluster whose blocks' shortlists fit one block (G · C <= kMergeMax): each block cuts its own
// chunk to its top c (block barriers only) and writes those candidates, in position order, into block 0's
// shared memory (G slots of C keys and positions, unused entries below -inf); after one cluster barrier
// block 0 cuts the G · C candidates to the row's top c and writes them. A key of the row's top c is in
// its block's top c (the row's order restricted to a chunk is the chunk's order), and the candidates lie
// in position order, so ties go to the lower position as in the one-pass cut. One cluster-wide exchange
// instead of one per radix pass.
template <bool kCached>
__global__ void __launch_bounds__(512) select_merge_kernel(SelectArgs a, int chunk) {
  cuda_detail::grid_dep_wait();
  cuda_detail::grid_dep_launch();
  extern __shared__ uint32_t dyn[];
  __shared__ csel::Shared sh;
  csel::Cluster cluster = csel::this_cluster();
  const int G = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  cluster.barrier_arrive();  // every block has started before any block writes into block 0 (waited below)
  const int row = static_cast<int>(blockIdx.x) / G;
  const int b = row / a.H, h = row % a.H;
  const int lo = min(rank * chunk, a.P), n_local = min(lo + chunk, a.P) - lo;
  const float* src = a.scores + b * a.s_b + h * a.s_h + lo;
  const int slots = G * a.C;
  uint32_t* mkey = dyn;  // [G][C] candidates' keys (block 0's copy is the one read)
  int32_t* mpos = reinterpret_cast<int32_t*>(dyn + slots);
  uint32_t* cached_keys = dyn + 2 * ((slots + 3) / 4 * 4);
  const int cap = a.caps[b * a.c_b + h * a.c_h];
  const auto key_at = csel::row_keys<kCached>(src, n_local, cached_keys);
  const uint32_t c = static_cast<uint32_t>(min(max(cap, 0), min(a.P, a.C)));
  const csel::Cut mine = csel::cluster_cut<true>(key_at, kCached ? cached_keys : nullptr, n_local, c, sh, a.span);
  csel::push_shortlist(key_at, n_local, mine, sh, cluster, rank, csel::Shortlist{mkey, mpos}, a.C, lo, true);
  if (rank != 0) return;  // block 0 holds every block's candidates
  int32_t* out = a.positions + b * a.p_b + h * a.p_h;
  const auto cand_at = [mkey](int i) { return mkey[i]; };
  const csel::Cut cut = csel::cluster_cut<true>(cand_at, mkey, slots, c, sh, a.span);
  csel::emit_in_order(cand_at, slots, cut, sh, [&](uint32_t slot, int i) { out[slot] = mpos[i]; });
  for (int i = static_cast<int>(cut.take) + static_cast<int>(threadIdx.x); i < a.C; i += blockDim.x) out[i] = -1;
  if (threadIdx.x == 0) a.counts[b * a.n_b + h * a.n_h] = static_cast<int32_t>(cut.take);
}

}  // namespace

namespace cuda {

void select(const Tensor& scores, const Tensor& capacities, const Tensor& positions, const Tensor& counts,
            const Tensor&, std::uintptr_t stream) {
  const int64_t B = scores.shape[0], H = scores.shape[1], P = scores.shape[2], C = positions.shape[2];
  require(P <= (int64_t{1} << 30), "select: P must be at most 2^30 on CUDA, got ", P);
  require(C <= (int64_t{1} << 30), "select: positions may have at most 2^30 columns on CUDA, got ", C);
  const int64_t rows = B * H;
  if (rows == 0) return;
  require(rows <= 0x7FFFFFFF, "select: too many rows for one launch");
  cuda_detail::DeviceGuard guard(scores.device_id);
  SelectArgs a{scores.ptr<float>(), scores.stride[0], scores.stride[1], capacities.ptr<int32_t>(),
               capacities.stride[0], capacities.stride[1], positions.ptr<int32_t>(), positions.stride[0],
               positions.stride[1], counts.ptr<int32_t>(), counts.stride[0], counts.stride[1],
               static_cast<int>(H), static_cast<int>(P), static_cast<int>(C), csel::span_mode()};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  // The shortlist form where the blocks' candidates fit one block (MIXKV_SELECT_MERGE=0 turns it off)
  const int G = csel::cluster_blocks(P, scores.device_id);
  if (G > 1 && G * C <= csel::kMergeMax && csel::env_int("MIXKV_SELECT_MERGE", 1) == 1) {
    const std::size_t merge_bytes = 2 * static_cast<std::size_t>((G * C + 3) / 4 * 4) * sizeof(uint32_t);
    const csel::RowClusters plan =
        csel::plan_row_clusters(rows, P, scores.device_id, "select", sizeof(csel::Shared), merge_bytes);
    if (plan.cached) {
      csel::launch_row_clusters(plan, s, select_merge_kernel<true>, a, plan.chunk);
    } else {
      csel::launch_row_clusters(plan, s, select_merge_kernel<false>, a, plan.chunk);
    }
    MIXKV_CUDA_CHECK_LAUNCH();
    return;
  }
  const csel::RowClusters plan = csel::plan_row_clusters(rows, P, scores.device_id, "select", sizeof(csel::Shared));
  if (plan.cached) {
    csel::launch_row_clusters(plan, s, select_rows_kernel<true>, a, plan.chunk);
  } else {
    csel::launch_row_clusters(plan, s, select_rows_kernel<false>, a, plan.chunk);
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mixkv
