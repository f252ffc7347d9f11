// CUDA top-c selection: one block per (b, h) row. The row's order-preserving keys are cached in
// shared memory when they fit (up to ~55k positions on sm_90), a three-pass radix select finds
// the c-th largest key, and an in-order compaction writes the chosen positions ascending.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cuda_check.cuh"
#include "mixkv/error.hpp"
#include "mixkv/select.hpp"
#include "radix_select.cuh"

namespace mixkv {
namespace {

namespace rx = cuda_detail::radix;

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
};

template <bool kCached>
__global__ void __launch_bounds__(1024) select_rows_kernel(SelectArgs a) {
  extern __shared__ uint32_t cached_keys[];
  __shared__ rx::Shared sh;
  __shared__ uint32_t warp_greater[rx::kMaxWarps], warp_equal[rx::kMaxWarps];
  const int b = blockIdx.x / a.H, h = blockIdx.x % a.H;
  const float* row = a.scores + b * a.s_b + h * a.s_h;
  int32_t* out = a.positions + b * a.p_b + h * a.p_h;
  const int P = a.P;
  auto key_at = [&](int i) -> uint32_t {
    if constexpr (kCached) {
      return cached_keys[i];
    } else {
      return rx::order_key(row[i]);
    }
  };

  uint32_t valid = 0;
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const uint32_t key = rx::order_key(row[i]);
    if constexpr (kCached) cached_keys[i] = key;
    valid += key > rx::kNegInfKey ? 1u : 0u;
  }
  const uint32_t finite = rx::block_sum(valid, sh);  // also orders the cache writes before reads
  const int cap = a.caps[b * a.c_b + h * a.c_h];
  const uint32_t c = static_cast<uint32_t>(min(max(cap, 0), min(P, a.C)));
  const uint32_t take = min(c, finite);

  uint32_t threshold, take_equal;
  if (take == 0) {
    threshold = 0xFFFFFFFFu;  // nothing is greater
    take_equal = 0;
  } else if (take == finite) {
    threshold = rx::kNegInfKey;  // everything above -inf
    take_equal = 0;
  } else {
    rx::select_kth(key_at, P, take, sh, threshold, take_equal);
  }

  // Compaction in position order: warp w scans the contiguous chunk [w*chunk, (w+1)*chunk).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int chunk = ((P + nwarps - 1) / nwarps + 31) / 32 * 32;
  const int lo = min(warp * chunk, P), hi = min(lo + chunk, P);
  uint32_t greater = 0, equal = 0;
  for (int base = lo; base < hi; base += 32) {
    const int i = base + lane;
    const uint32_t key = i < hi ? key_at(i) : 0u;
    greater += __popc(__ballot_sync(0xFFFFFFFFu, i < hi && key > threshold));
    equal += __popc(__ballot_sync(0xFFFFFFFFu, i < hi && key == threshold));
  }
  if (lane == 0) {
    warp_greater[warp] = greater;
    warp_equal[warp] = equal;
  }
  __syncthreads();
  uint32_t g_before = 0, e_before = 0;
  for (int w = 0; w < warp; ++w) {
    g_before += warp_greater[w];
    e_before += warp_equal[w];
  }
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int base = lo; base < hi; base += 32) {
    const int i = base + lane;
    const uint32_t key = i < hi ? key_at(i) : 0u;
    const bool is_g = i < hi && key > threshold, is_e = i < hi && key == threshold;
    const unsigned bg = __ballot_sync(0xFFFFFFFFu, is_g), be = __ballot_sync(0xFFFFFFFFu, is_e);
    const uint32_t g = g_before + __popc(bg & lower_lanes), e = e_before + __popc(be & lower_lanes);
    // slot = entries chosen before i: every greater one, and the first take_equal equal ones
    if (is_g) {
      const uint32_t slot = g + min(e, take_equal);
      if (slot < take) out[slot] = i;
    } else if (is_e && e < take_equal) {
      const uint32_t slot = g + e;
      if (slot < take) out[slot] = i;
    }
    g_before += __popc(bg);
    e_before += __popc(be);
  }
  for (int i = static_cast<int>(take) + threadIdx.x; i < a.C; i += blockDim.x) out[i] = -1;
  if (threadIdx.x == 0) a.counts[b * a.n_b + h * a.n_h] = static_cast<int32_t>(take);
}

// Largest dynamic shared memory a block may opt in to on `device` (cached per device).
int smem_optin(int device) {
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
  rx::DeviceGuard guard(scores.device_id);
  SelectArgs a{scores.ptr<float>(), scores.stride[0], scores.stride[1], capacities.ptr<int32_t>(),
               capacities.stride[0], capacities.stride[1], positions.ptr<int32_t>(), positions.stride[0],
               positions.stride[1], counts.ptr<int32_t>(), counts.stride[0], counts.stride[1],
               static_cast<int>(H), static_cast<int>(P), static_cast<int>(C)};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int threads = P > 4096 ? 1024 : 256;
  const std::size_t static_bytes = sizeof(rx::Shared) + 2 * rx::kMaxWarps * sizeof(uint32_t);
  const std::size_t cache_bytes = static_cast<std::size_t>(P) * sizeof(uint32_t);
  const int optin = smem_optin(scores.device_id);
  if (cache_bytes + static_bytes + 1024 <= static_cast<std::size_t>(optin)) {
    if (cache_bytes > 48 * 1024)
      MIXKV_CUDA_CHECK(cudaFuncSetAttribute(select_rows_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(cache_bytes)));
    select_rows_kernel<true><<<static_cast<unsigned>(rows), threads, cache_bytes, s>>>(a);
  } else {
    select_rows_kernel<false><<<static_cast<unsigned>(rows), threads, 0, s>>>(a);
  }
  MIXKV_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mixkv
