// Tensor-core rate of the scoring passes' logit shapes on an sm_90 GPU: one block per SM, operands
// resident in shared memory (no copies, no softmax), cycles per 64-key tile of 256 packed query rows
// (2 · 256 · 64 · 128 flops) for several ways of issuing the same products:
//   rs64      NW = 4 warpgroups, query rows in registers, m64n64k16 × 8 per tile, wait after each chain
//             (the warpgroup passes as they are)
//   rs64x2    the same with two chains in flight per warpgroup (two accumulator sets, wait<1>)
//   ss64      both operands from shared memory, m64n64k16, wait after each chain
//   rs128     NW = 4, m64n128k16 (two key tiles per chain), wait after each chain
//   ss256t    transposed: each warpgroup its own key tile as A (64 keys), all 256 rows as B, m64n256k16
// Build: python3 scripts/gen_wgmma.py --extra 128 256 --out /tmp/wgmma_extra.cuh &&
//   nvcc -std=c++17 -arch=sm_90a -Icuda -Icpp/include -I/tmp -o /tmp/wgmma_rate scripts/wgmma_rate.cu
#include <cuda_bf16.h>

#include <cstdio>

#include "wgmma.cuh"
#include "wgmma_extra.cuh"

using namespace mixkv;
using T = __nv_bfloat16;

constexpr int C = 128;    // head dimension
constexpr int Rows = 256;  // packed query rows
constexpr int Iters = 512;

enum Mode { rs64, rs64x2, ss64, rs128, ss256t, rs64e, rs64x2e };

// The pass-1 softmax work per accumulator: one FFMA, one EX2, one FADD.
template <int R>
__device__ __forceinline__ float exp_all(const float (&d)[R]) {
  float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
  for (int i = 0; i < R; i += 2) {
    s0 += score_detail::fast_exp2(fmaf(d[i], 0.01f, -1.0f));
    s1 += score_detail::fast_exp2(fmaf(d[i + 1], 0.01f, -1.0f));
  }
  return s0 + s1;
}

template <int Mode>
__global__ void __launch_bounds__(Mode == ss256t ? 256 : 512, 1) rate(long long* cycles, float* sink) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem[];
  T* keys = reinterpret_cast<T*>(smem);  // [128 keys][C] blocked
  T* q = keys + 128 * C;                 // [Rows][C] blocked
  for (int i = threadIdx.x; i < (128 + Rows) * C; i += blockDim.x) keys[i] = __float2bfloat16(0.001f * (i % 17));
  wgmma_detail::fence_proxy_async();
  __syncthreads();
  const int wg = threadIdx.x >> 7;
  uint32_t qa[C / 16][4];
#pragma unroll
  for (int ks = 0; ks < C / 16; ++ks)
#pragma unroll
    for (int i = 0; i < 4; ++i) qa[ks][i] = 0x3c003c00u + threadIdx.x + ks + i;
  const uint64_t kdesc = wgmma_detail::blocked_desc(keys, C);
  const uint64_t qdesc = wgmma_detail::blocked_desc(q + wg * 64 * C, C);
  const uint64_t qall = wgmma_detail::blocked_desc(q, C);
  const uint64_t mine = wgmma_detail::blocked_desc(keys + (wg & 1) * 64 * C, C);
  constexpr uint64_t kstep = 2 * 64 * sizeof(T) / 16;  // two core matrices per k-step
  float sum = 0.0f;
  __syncthreads();
  const long long t0 = clock64();
  if constexpr (Mode == rs64 || Mode == ss64 || Mode == rs64e) {
    float acc[32];
    for (int it = 0; it < Iters; ++it) {
      wgmma_detail::fence();
#pragma unroll
      for (int ks = 0; ks < C / 16; ++ks) {
        if constexpr (Mode == rs64)
          wgmma_detail::WgmmaRA<64, T>::run(acc, qa[ks], kdesc + ks * kstep, ks > 0);
        else
          wgmma_detail::Wgmma<64, T>::run(acc, qdesc + ks * kstep, kdesc + ks * kstep, ks > 0);
      }
      wgmma_detail::commit();
      wgmma_detail::wait<0>();
      wgmma_detail::fence_regs(acc);
      if constexpr (Mode == rs64e)
        sum += exp_all(acc);
      else
        sum += acc[0] + acc[31];
    }
  } else if constexpr (Mode == rs64x2 || Mode == rs64x2e) {
    float a0[32], a1[32];
    for (int it = 0; it < Iters; it += 2) {
      wgmma_detail::fence();
#pragma unroll
      for (int ks = 0; ks < C / 16; ++ks) wgmma_detail::WgmmaRA<64, T>::run(a0, qa[ks], kdesc + ks * kstep, ks > 0);
      wgmma_detail::commit();
      wgmma_detail::wait<1>();
      wgmma_detail::fence_regs(a1);
      if (it > 0) sum += Mode == rs64x2e ? exp_all(a1) : a1[5];
      wgmma_detail::fence();
#pragma unroll
      for (int ks = 0; ks < C / 16; ++ks) wgmma_detail::WgmmaRA<64, T>::run(a1, qa[ks], kdesc + ks * kstep, ks > 0);
      wgmma_detail::commit();
      wgmma_detail::wait<1>();
      wgmma_detail::fence_regs(a0);
      sum += Mode == rs64x2e ? exp_all(a0) : a0[7];
    }
    wgmma_detail::wait<0>();
    wgmma_detail::fence_regs(a1);
    sum += a1[0];
  } else if constexpr (Mode == rs128) {
    float acc[64];
    for (int it = 0; it < Iters; it += 2) {
      wgmma_detail::fence();
#pragma unroll
      for (int ks = 0; ks < C / 16; ++ks) wgmma_detail::WgmmaRA<128, T>::run(acc, qa[ks], kdesc + ks * kstep, ks > 0);
      wgmma_detail::commit();
      wgmma_detail::wait<0>();
      wgmma_detail::fence_regs(acc);
      sum += acc[0] + acc[63];
    }
  } else {
    float acc[128];
    for (int it = 0; it < Iters; it += 4) {  // 2 blocks of 2 warpgroups per SM: one 64-key tile each per chain
      wgmma_detail::fence();
#pragma unroll
      for (int ks = 0; ks < C / 16; ++ks) wgmma_detail::Wgmma<256, T>::run(acc, mine + ks * kstep, qall + ks * kstep, ks > 0);
      wgmma_detail::commit();
      wgmma_detail::wait<0>();
      wgmma_detail::fence_regs(acc);
      sum += acc[0] + acc[127];
    }
  }
  const long long t1 = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
  sink[blockIdx.x * blockDim.x + threadIdx.x] = sum;
#endif
}

template <int Mode>
void run(const char* name, int sms) {
  long long* cycles;
  float* sink;
  cudaMalloc(&cycles, sms * sizeof(long long));
  cudaMalloc(&sink, 2 * sms * 512 * sizeof(float));
  const int bytes = (128 + Rows) * C * sizeof(T) + 1024;
  cudaFuncSetAttribute(rate<Mode>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  const int blocks = Mode == ss256t ? 2 * sms : sms, threads = Mode == ss256t ? 256 : 512;
  for (int rep = 0; rep < 2; ++rep) rate<Mode><<<blocks, threads, bytes>>>(cycles, sink);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0);
  rate<Mode><<<blocks, threads, bytes>>>(cycles, sink);
  cudaEventRecord(e1);
  const cudaError_t err = cudaDeviceSynchronize();
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, e0, e1);
  long long c = 0;
  cudaMemcpy(&c, cycles, sizeof(long long), cudaMemcpyDeviceToHost);
  const double flops = 2.0 * Rows * 64 * C * Iters * sms;
  std::printf("%-8s %s  cycles/tile %7.1f  %6.1f TFLOP/s (event %.1f us)\n", name, cudaGetErrorString(err),
              double(c) / Iters, flops / (ms * 1e-3) / 1e12, ms * 1e3);
  cudaFree(cycles);
  cudaFree(sink);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  run<rs64>("rs64", sms);
  run<rs64x2>("rs64x2", sms);
  run<ss64>("ss64", sms);
  run<rs128>("rs128", sms);
  run<ss256t>("ss256t", sms);
  run<rs64e>("rs64e", sms);
  run<rs64x2e>("rs64x2e", sms);
  return 0;
}
