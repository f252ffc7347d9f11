// Loading a few consecutive 16-bit (or float) elements of a shared-memory row as floats.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "dtype.cuh"

namespace mixkv::cuda_detail {

// EPV consecutive elements of a shared-memory row as floats (one 16-byte load when they fill it).
template <typename scalar_t, int EPV>
__device__ __forceinline__ void load_smem_part(const scalar_t* p, float (&out)[EPV]) {
  if constexpr (EPV * sizeof(scalar_t) == 16 && std::is_same_v<scalar_t, __nv_bfloat16>) {
    // bf16 -> fp32 is a placement of the 16 bits in the high half: one integer op per element
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else if constexpr (EPV * sizeof(scalar_t) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int i = 0; i < EPV; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < EPV; ++i) out[i] = to_float(p[i]);
  }
}

}  // namespace mixkv::cuda_detail
