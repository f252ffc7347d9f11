// Block-wide building blocks for top-k selection: order-preserving float keys, block scans and
// reductions, and a three-pass (11 + 11 + 10 bit) radix select of the k-th largest key.
// Every function here must be called by all threads of the block (they synchronise).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mixkv::cuda_detail::radix {

constexpr int kBins = 2048;  // 11-bit digits
constexpr int kMaxWarps = 32;

// Monotone map float -> uint32 (a < b  <=>  key(a) < key(b) for non-NaN a, b); -0.0 maps like +0.0.
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  return __uint_as_float(u);
}

// order_key(-inf): the smallest key of any non-NaN float.
constexpr uint32_t kNegInfKey = 0x007FFFFFu;

struct Shared {
  unsigned int hist[kBins];
  unsigned int warp_vals[kMaxWarps];
  double warp_dbl[kMaxWarps];
  uint32_t digit;
  uint32_t remaining;
};

// Exclusive prefix sum of one value per thread in thread order; `total` receives the block sum.
__device__ inline uint32_t block_exclusive_scan(uint32_t v, uint32_t& total, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  uint32_t incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t o = __shfl_up_sync(0xFFFFFFFFu, incl, d);
    if (lane >= d) incl += o;
  }
  if (lane == 31) sh.warp_vals[warp] = incl;
  __syncthreads();
  uint32_t before = 0, sum = 0;
  for (int w = 0; w < nwarps; ++w) {
    const uint32_t x = sh.warp_vals[w];
    if (w < warp) before += x;
    sum += x;
  }
  __syncthreads();  // warp_vals may be reused right after
  total = sum;
  return before + incl - v;
}

__device__ inline uint32_t block_sum(uint32_t v, Shared& sh) {
  uint32_t total = 0;
  block_exclusive_scan(v, total, sh);
  return total;
}

// Sum of one double per thread; every thread receives the sum (fixed order: deterministic).
__device__ inline double block_sum(double v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, d);
  if (lane == 0) sh.warp_dbl[warp] = v;
  __syncthreads();
  double sum = 0.0;
  for (int w = 0; w < nwarps; ++w) sum += sh.warp_dbl[w];
  __syncthreads();
  return sum;
}

// The k-th largest (1 <= k <= n) of the keys key_at(i), i in [0, n). On return `threshold` is
// that key and `take_equal` (>= 1) the number of entries equal to it that belong to the top k
// (so exactly k - take_equal keys are greater). blockDim.x must be a multiple of 32.
template <typename KeyAt>
__device__ void select_kth(KeyAt key_at, int n, uint32_t k, Shared& sh, uint32_t& threshold,
                           uint32_t& take_equal) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int per = (kBins + blockDim.x - 1) / blockDim.x;  // bins per thread in the scan
  uint32_t prefix = 0, prefix_mask = 0, remaining = k;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const uint32_t digit_mask = pass == 2 ? 0x3FFu : 0x7FFu;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh.hist[i] = 0u;
    __syncthreads();
    // Histogram of the next digit over the keys that match the prefix so far; lanes holding
    // the same digit add once (equal digits are common: scores share exponents).
    for (int base = warp * 32; base < n; base += nwarps * 32) {
      const int i = base + lane;
      uint32_t d = 0xFFFFFFFFu;
      if (i < n) {
        const uint32_t key = key_at(i);
        if ((key & prefix_mask) == prefix) d = (key >> shift) & digit_mask;
      }
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, d);
      if (d != 0xFFFFFFFFu && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[d], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    // Walk the bins from the top: thread t owns ranks [t*per, (t+1)*per) of bins in descending order.
    uint32_t mine = 0;
    for (int r = threadIdx.x * per; r < (threadIdx.x + 1) * per && r < kBins; ++r) mine += sh.hist[kBins - 1 - r];
    uint32_t total = 0;
    uint32_t above = block_exclusive_scan(mine, total, sh);
    for (int r = threadIdx.x * per; r < (threadIdx.x + 1) * per && r < kBins; ++r) {
      const uint32_t c = sh.hist[kBins - 1 - r];
      if (above < remaining && above + c >= remaining) {
        sh.digit = static_cast<uint32_t>(kBins - 1 - r);
        sh.remaining = remaining - above;
      }
      above += c;
    }
    __syncthreads();
    prefix |= sh.digit << shift;
    prefix_mask |= digit_mask << shift;
    remaining = sh.remaining;
    __syncthreads();  // sh.digit / sh.remaining are rewritten by the next pass
  }
  threshold = prefix;
  take_equal = remaining;
}

}  // namespace mixkv::cuda_detail::radix
