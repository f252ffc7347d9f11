// mbarrier primitives (sm_80+; sm_90 waits with try_wait) for a ring of key (or value) tiles in shared memory filled by one warp's
// cp.async copies and tracked per slot by two barriers, so that warps wait only for the tile they read
// ("full") and the warp that refills a slot only for the warps still reading it ("empty") — no
// block-wide barrier per tile.
//
// Slot s holds tiles s, s + S, s + 2S, ...; tile x is the (x / S)-th use of its slot, so its waits use
// parity (x / S) & 1 on both barriers. `full` expects 32 arrivals (the filling warp's lanes, each when
// its copies have landed); `empty` one arrival per reading thread (each releases its own reads, so
// no warp-level step is needed before the arrival).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "score_mma.cuh"

namespace mixkv::ring_detail {

using score_detail::smem_u32;

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// Arrive (release semantics at block scope: this thread's earlier shared-memory accesses are done).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared.b64 st, [%0];\n}\n" ::"r"(smem_u32(bar)) : "memory");
}

// Wait until the phase with the given parity has completed (acquire semantics at block scope).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred done;\n"
      "wait_%=:\n"
      " mbarrier.try_wait.parity.shared.b64 done, [%0], %1;\n"
      " @!done bra wait_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
#else
  asm volatile(
      "{\n .reg .pred done;\n"
      "wait_%=:\n"
      " mbarrier.test_wait.parity.shared.b64 done, [%0], %1;\n"
      " @!done bra wait_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
#endif
}

// The barrier receives one arrival once every cp.async this thread issued so far has landed (the
// arrival is not counted in advance: `full` is initialised with the number of filling threads).
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

}  // namespace mixkv::ring_detail
