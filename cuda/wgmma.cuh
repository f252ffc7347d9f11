// Warpgroup matrix multiply (sm_90a) around wgmma_ops.cuh: shared-memory matrix descriptors for the
// non-swizzled K-major layout, and the fence / commit / wait steps an asynchronous wgmma batch needs.
//
// Layout ("blocked"): a 16-bit matrix of R rows and C columns (C a multiple of 8) stored as 8×8 core
// matrices of 128 contiguous bytes, row-major inside; core matrix (r / 8, c / 8) starts at element
// ((r / 8) · C / 8 + c / 8) · 64. Along K (columns) neighbouring core matrices are 128 bytes apart,
// along M / N (rows) C · 16 bytes. blocked_offset() gives an element's offset.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "score_mma.cuh"
#include "wgmma_ops.cuh"

namespace mixkv::wgmma_detail {

__host__ __device__ constexpr int blocked_offset(int r, int c, int cols) {
  return ((r >> 3) * (cols >> 3) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
}

// Descriptor of the K-major matrix starting at `ptr` (16-byte aligned) in the blocked layout with
// `cols` columns: k-direction core matrices 128 bytes apart (leading offset), row groups cols · 16
// bytes apart (stride offset), no swizzle.
__device__ __forceinline__ uint64_t blocked_desc(const void* ptr, int cols) {
  const uint64_t addr = score_detail::smem_u32(ptr);
  const uint64_t lead = 128, stride = uint64_t(cols) * 16;
  return ((addr & 0x3FFFF) >> 4) | (((lead >> 4) & 0x3FFF) << 16) | (((stride >> 4) & 0x3FFF) << 32);
}

// Descriptor of a K-major matrix in the 128-byte swizzled layout (rows of 128 bytes, 16-byte pieces
// exchanged by row % 8 inside each 1024-byte group of eight rows, as a tensor-map copy with 128-byte
// swizzle writes it) starting at `ptr` (1024-byte aligned): row groups 1024 bytes apart. A k-step of 16
// elements inside the 128-byte row adds 32 bytes to the start address.
__device__ __forceinline__ uint64_t sw128_desc(const void* ptr) {
  const uint64_t addr = score_detail::smem_u32(ptr);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Element offset of (r, c) in a [rows][64] 16-bit matrix in that layout (1024-byte aligned base).
__host__ __device__ constexpr int sw128_offset(int r, int c) {
  return r * 64 + ((((c >> 3) ^ r) & 7) << 3) + (c & 7);
}

__device__ __forceinline__ void fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int Pending>
__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
}

// Make this thread's earlier generic-proxy shared-memory writes (plain stores, cp.async) visible to
// the asynchronous proxy that wgmma reads its operands through (and order them before its reads).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Bulk prefetch of `bytes` (a multiple of 16) from global memory at `ptr` (16-byte aligned) into L2.
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(ptr), "r"(bytes) : "memory");
#endif
}

// Keeps the compiler from moving accumulator reads or writes across an in-flight wgmma batch.
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

}  // namespace mixkv::wgmma_detail
