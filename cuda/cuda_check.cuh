// Checked CUDA calls: every runtime call and every launch goes through these.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>

namespace mixkv::cuda_detail {

[[noreturn]] inline void raise_cuda(cudaError_t err, const char* what, const char* file, int line) {
  std::ostringstream os;
  os << "CUDA error " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ") in " << what
     << " at " << file << ":" << line;
  throw std::runtime_error(os.str());
}

}  // namespace mixkv::cuda_detail

#define MIXKV_CUDA_CHECK(call)                                                        \
  do {                                                                                \
    cudaError_t mixkv_err_ = (call);                                                  \
    if (mixkv_err_ != cudaSuccess)                                                    \
      ::mixkv::cuda_detail::raise_cuda(mixkv_err_, #call, __FILE__, __LINE__);        \
  } while (0)

// After a kernel launch: catches launch-configuration errors without synchronizing.
#define MIXKV_CUDA_CHECK_LAUNCH() MIXKV_CUDA_CHECK(cudaGetLastError())
