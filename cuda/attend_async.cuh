// Asynchronous global -> shared copies (cp.async, sm_80+) for the attention kernel's K/V stages.
#pragma once

#include <cstdint>

namespace mixkv::cuda_detail {

// Copies 16 bytes from global `src` to shared `dst` when `valid`; otherwise fills `dst` with zeros
// and reads nothing (src is then only a placeholder address). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace mixkv::cuda_detail
