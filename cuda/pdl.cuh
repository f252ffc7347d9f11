// Programmatic dependent launch (sm_90+; no-ops before): a kernel launched with the programmatic
// stream-serialisation attribute may start while its predecessor on the stream finishes; it must call
// grid_dep_wait() before touching anything the predecessor writes (and before it exits, so that its
// own completion implies its predecessors'). grid_dep_launch() lets the successor's blocks be
// scheduled early. pdl_supported() tells the host whether a device takes the attribute.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "cuda_check.cuh"

namespace mixkv::cuda_detail {

__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dep_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Compute capability 9.0 or newer, cached per device.
inline bool pdl_supported(int device) {
  static std::atomic<int> cache[64];  // 0 unknown, 1 no, 2 yes
  const int slot = device < 0 || device >= 64 ? 63 : device;
  int v = cache[slot].load();
  if (v == 0) {
    int major = 0;
    MIXKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    v = major >= 9 ? 2 : 1;
    cache[slot].store(v);
  }
  return v == 2;
}

// The launch attribute that lets a kernel start while its predecessor finishes.
inline cudaLaunchAttribute pdl_attribute() {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return attr;
}

}  // namespace mixkv::cuda_detail
