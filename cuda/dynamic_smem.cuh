// Dynamic shared memory beyond a kernel's default limit.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda_check.cuh"
#include "mixkv/error.hpp"

namespace mixkv::cuda_detail {

// Lets the next launches of `kernel` on the current device take `bytes` of dynamic shared memory.
// A function's default limit is 48 KiB minus its static shared memory (not 48 KiB), so the check
// goes by the function's own attribute; the limit is raised only when the launch needs more. `op`
// names the operation in the error for a request the device cannot hold.
// Whether the current device can give `kernel` `bytes` of dynamic shared memory per block (with the
// opt-in limit, on top of the kernel's static shared memory).
template <typename Kernel>
bool dynamic_smem_fits(Kernel kernel, std::size_t bytes) {
  cudaFuncAttributes fa{};
  MIXKV_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  int device = 0;
  int optin = 0;
  MIXKV_CUDA_CHECK(cudaGetDevice(&device));
  MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes + fa.sharedSizeBytes <= static_cast<std::size_t>(optin);
}

template <typename Kernel>
void fit_dynamic_smem(Kernel kernel, std::size_t bytes, const char* op) {
  cudaFuncAttributes fa{};
  MIXKV_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  if (bytes <= static_cast<std::size_t>(fa.maxDynamicSharedSizeBytes)) return;
  int device = 0;
  int optin = 0;
  MIXKV_CUDA_CHECK(cudaGetDevice(&device));
  MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  require(bytes + fa.sharedSizeBytes <= static_cast<std::size_t>(optin), op, ": this shape needs ",
          bytes + fa.sharedSizeBytes, " bytes of shared memory per block, the device offers ", optin);
  MIXKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace mixkv::cuda_detail
