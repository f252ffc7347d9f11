// Device-side element types and dtype dispatch for kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mixkv/error.hpp"
#include "mixkv/tensor.hpp"

namespace mixkv::cuda_detail {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace mixkv::cuda_detail

// Calls `__VA_ARGS__` (a generic lambda body) with `scalar_t` bound to the element type of `dt`.
#define MIXKV_DISPATCH_FLOAT(dt, name, ...)                                              \
  [&] {                                                                                  \
    switch (dt) {                                                                        \
      case ::mixkv::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }        \
      case ::mixkv::DType::f16: { using scalar_t = __half; return __VA_ARGS__(); }       \
      case ::mixkv::DType::bf16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: ::mixkv::fail(name, ": unsupported dtype ", ::mixkv::dtype_name(dt));     \
    }                                                                                    \
  }()
