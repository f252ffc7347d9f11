// Standalone check of cuda/wgmma.cuh on an sm_90 GPU: one warpgroup multiplies a 64 x K and an N x K
// bfloat16 / half matrix (both K-major, blocked layout, K = 144: nine k-steps) and writes the
// accumulators back by the assumed fragment layout; the host compares with a float reference.
// Build: nvcc -std=c++17 -arch=sm_90a -Icuda -Icpp/include -o /tmp/wgmma_probe scripts/wgmma_probe.cu
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "wgmma.cuh"

using namespace mixkv;

constexpr int K = 144;

template <typename T, int N>
__global__ void probe(const T* a_blocked, const T* b_blocked, float* out, int swap) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + 64 * K;
  for (int i = threadIdx.x; i < 64 * K; i += blockDim.x) sa[i] = a_blocked[i];
  for (int i = threadIdx.x; i < N * K; i += blockDim.x) sb[i] = b_blocked[i];
  wgmma_detail::fence_proxy_async();
  __syncthreads();
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
  wgmma_detail::fence();
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    uint64_t da = wgmma_detail::blocked_desc(sa + ks * 128, K);
    uint64_t db = wgmma_detail::blocked_desc(sb + ks * 128, K);
    if (swap) {  // leading and stride offsets exchanged
      auto sw = [](uint64_t x) {
        const uint64_t lead = (x >> 16) & 0x3FFF, stride = (x >> 32) & 0x3FFF;
        return (x & ~((uint64_t(0x3FFF) << 16) | (uint64_t(0x3FFF) << 32))) | (stride << 16) | (lead << 32);
      };
      da = sw(da), db = sw(db);
    }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgmma_detail::Wgmma<N, T>::run(d, da, db, ks > 0 ? 1 : 0);
#endif
  }
  wgmma_detail::commit();
  wgmma_detail::wait<0>();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * warp + g + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1);
      out[r * N + c] = d[4 * j + e];
    }
}

template <typename T>
float to_f(T x);
template <>
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
float to_f(__half x) { return __half2float(x); }

template <typename T, int N>
int run_case(const char* name) {
  std::mt19937 rng(N);
  std::normal_distribution<float> nd;
  std::vector<T> a(64 * K), b(N * K), ab(64 * K), bb(N * K);
  for (auto& x : a) x = T(nd(rng));
  for (auto& x : b) x = T(nd(rng));
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < K; ++c) ab[wgmma_detail::blocked_offset(r, c, K)] = a[r * K + c];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < K; ++c) bb[wgmma_detail::blocked_offset(r, c, K)] = b[r * K + c];
  T *da, *db;
  float* dout;
  cudaMalloc(&da, ab.size() * sizeof(T));
  cudaMalloc(&db, bb.size() * sizeof(T));
  cudaMalloc(&dout, 64 * N * sizeof(float));
  cudaMemcpy(da, ab.data(), ab.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(db, bb.data(), bb.size() * sizeof(T), cudaMemcpyHostToDevice);
  const int smem = (64 + N) * K * sizeof(T);
  cudaFuncSetAttribute(probe<T, N>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int bad = 0;
  for (int swap = 0; swap < 2; ++swap) {
    cudaMemset(dout, 0xFF, 64 * N * sizeof(float));
    probe<T, N><<<1, 128, smem>>>(da, db, dout, swap);
    const cudaError_t err = cudaDeviceSynchronize();
    std::vector<float> out(64 * N);
    cudaMemcpy(out.data(), dout, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
    double worst = 0.0;
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < N; ++c) {
        double ref = 0.0;
        for (int k = 0; k < K; ++k) ref += double(to_f(a[r * K + k])) * double(to_f(b[c * K + k]));
        const double e = std::fabs(ref - out[r * N + c]);
        worst = std::isnan(e) ? INFINITY : std::fmax(worst, e);
      }
    std::printf("%s N=%d swap=%d err=%s max_abs_err=%.3g %s\n", name, N, swap, cudaGetErrorString(err), worst,
                worst < 1e-2 ? "OK" : "WRONG");
    if (swap == 0 && !(worst < 1e-2)) bad = 1;
  }
  cudaFree(da), cudaFree(db), cudaFree(dout);
  return bad;
}

int main() {
  int bad = 0;
  bad |= run_case<__nv_bfloat16, 64>("bf16");
  bad |= run_case<__half, 64>("f16");
  std::printf(bad ? "wgmma probe: FAILED\n" : "wgmma probe: all OK\n");
  return bad;
}
