// Makes a tensor's device current for the lifetime of the guard, then restores the previous one.
#pragma once

#include <cuda_runtime.h>

#include "cuda_check.cuh"

namespace mixkv::cuda_detail {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MIXKV_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MIXKV_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace mixkv::cuda_detail
