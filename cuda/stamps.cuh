// Phase stamps for kernel development (built only with -DMIXKV_STAMPS; scripts/stamps_score.py reads
// them): the first thread of each warpgroup (128 threads) records its SM clock at numbered points (and
// the global timer, ns) and prints one line at the block's end, for the phases of a kernel across blocks
// and warpgroups. Without the macro every call is empty.
#pragma once

#include <cstdint>
#include <cstdio>

namespace mixkv::cuda_detail {

struct Stamps {
#if defined(MIXKV_STAMPS)
  static constexpr int kMax = 12;
  unsigned long long g[kMax];
  long long c[kMax];
  int n = 0;
  __device__ __forceinline__ void at(int i) {
    if ((threadIdx.x & 127) != 0 || i >= kMax) return;
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g[i] = t;
    c[i] = clock64();
    n = i + 1 > n ? i + 1 : n;
  }
  // "<tag><warpgroup> x y smid extra g0 g_last : dc1 .. dc11" (cycles since point 0; -1: not reached).
  __device__ void print(const char* tag, int extra) const {
    if ((threadIdx.x & 127) != 0) return;
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    long long d[kMax];
    for (int i = 0; i < kMax; ++i) d[i] = i < n ? c[i] - c[0] : -1;
    printf("%s%d %d %d %u %d %llu %llu : %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld\n", tag,
           threadIdx.x >> 7, blockIdx.x, blockIdx.y, smid, extra, g[0], g[n - 1], d[1], d[2], d[3], d[4], d[5], d[6],
           d[7], d[8], d[9], d[10], d[11]);
  }
#else
  __device__ __forceinline__ void at(int) {}
  __device__ __forceinline__ void print(const char*, int) const {}
#endif
};

}  // namespace mixkv::cuda_detail
