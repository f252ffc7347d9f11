// Tensor memory access (sm_90): tile copies global -> shared described by a tensor map, completing on
// an mbarrier by transaction bytes, and the host side that encodes such a map for a 16-bit
// [B, H, N, D] tensor in the 128-byte swizzled layout that warpgroup MMA reads (wgmma.cuh).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "score_mma.cuh"

namespace mixkv::tma_detail {

// Expect `bytes` more transaction bytes on `bar` and arrive once (the producer's arrival).
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(score_detail::smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}

// One box of `map` at coordinates (c0, c1, c2, c3) (innermost first) into shared memory at `dst`; its
// bytes count against the transactions `bar` expects. Out-of-range elements read as zero.
__device__ __forceinline__ void load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                        uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(score_detail::smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(score_detail::smem_u32(bar))
      : "memory");
#endif
}

// Host: the tensor map of a 16-bit tensor with element strides (s0, s1, s2, 1) over dims (B, H, N, D),
// boxes of 64 elements of D × 64 rows of N (one (b, h) each), 128-byte swizzle. The three outer
// dimensions go in the map by increasing stride (N first among equals), so `order` returns, for b, h
// and N, their coordinate slot (1-3). False (map unusable) when the driver lacks the entry point or
// rejects the shape (strides must be multiples of 16 bytes).
inline bool encode_bhnd(CUtensorMap* map, bool bf16, const void* base, int64_t B, int64_t H, int64_t N, int64_t D,
                        int64_t s0, int64_t s1, int64_t s2, std::array<int, 3>& order) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return false;
  struct Dim {
    int which;  // 0 b, 1 h, 2 N
    int64_t size, stride;
  };
  std::array<Dim, 3> dims{{{2, N, s2}, {1, H, s1}, {0, B, s0}}};
  // a dimension of size one may carry any stride: the span of the tensor puts it last
  int64_t span = 8;
  for (const Dim& x : dims) span = std::max(span, x.size * x.stride);
  for (Dim& x : dims)
    if (x.size == 1) x.stride = span;
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  cuuint64_t size[4] = {static_cast<cuuint64_t>(D), 0, 0, 0};
  cuuint64_t stride[3] = {0, 0, 0};
  cuuint32_t box[4] = {64, 1, 1, 1}, estride[4] = {1, 1, 1, 1};
  for (int i = 0; i < 3; ++i) {
    size[i + 1] = static_cast<cuuint64_t>(dims[i].size);
    stride[i] = static_cast<cuuint64_t>(dims[i].stride * 2);
    if (dims[i].which == 2) box[i + 1] = 64;
    order[dims[i].which] = i + 1;
  }
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                            const_cast<void*>(base), size, stride, box, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace mixkv::tma_detail
