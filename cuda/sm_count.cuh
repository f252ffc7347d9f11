// The multiprocessor count of a device, cached per device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "cuda_check.cuh"

namespace mixkv::cuda_detail {

inline int sm_count(int device) {
  static std::atomic<int> cache[64];
  const bool cached = device >= 0 && device < 64;
  int v = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v <= 0) {
    MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    v = v < 1 ? 1 : v;
    if (cached) cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

}  // namespace mixkv::cuda_detail
