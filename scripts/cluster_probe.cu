// Standalone probe: can a thread-block-cluster kernel be launched through cudaLaunchKernelEx in this
// environment (natively and under compute-sanitizer)? Used to tell a limitation of the tool from a
// fault of the library's cluster launches. Build: nvcc -std=c++17 -arch=sm_90 cluster_probe.cu
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>

namespace cg = cooperative_groups;

// Every block writes its rank into shared memory; after a cluster barrier each block reads its
// neighbour's value through distributed shared memory.
__global__ void probe_kernel(int* out) {
  extern __shared__ int dyn[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  if (threadIdx.x == 0) dyn[0] = static_cast<int>(rank) + 1;
  cluster.sync();
  const unsigned peer = (rank + 1) % cluster.num_blocks();
  const int* remote = cluster.map_shared_rank(dyn, peer);
  if (threadIdx.x == 0) out[blockIdx.x] = remote[0];
  cluster.sync();
}

__global__ void __cluster_dims__(3, 1, 1) probe_static_kernel(int* out) {
  extern __shared__ int dyn[];
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) dyn[0] = static_cast<int>(cluster.block_rank()) + 1;
  cluster.sync();
  const int* remote = cluster.map_shared_rank(dyn, (cluster.block_rank() + 1) % cluster.num_blocks());
  if (threadIdx.x == 0) out[blockIdx.x] = remote[0];
  cluster.sync();
}

static int check_out(const int* d_out, int blocks, int G) {
  int host[64] = {};
  if (cudaMemcpy(host, d_out, sizeof(int) * blocks, cudaMemcpyDeviceToHost) != cudaSuccess) return -1;
  int bad = 0;
  for (int b = 0; b < blocks; ++b) bad += host[b] != static_cast<int>((b % G + 1) % G) + 1;
  return bad;
}

static void try_launch(const char* name, void (*kernel)(int*), int G, int clusters, unsigned threads,
                       size_t smem, bool with_attr, int* d_out) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(G * clusters));
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(G);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = with_attr ? 1 : 0;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  int active = -1;
  const cudaError_t occ = cudaOccupancyMaxActiveClusters(&active, kernel, &cfg);
  cudaFuncAttributes fa{};
  cudaFuncGetAttributes(&fa, kernel);
  cudaMemset(d_out, 0, sizeof(int) * 64);
  const cudaError_t launch = cudaLaunchKernelEx(&cfg, kernel, d_out);
  const cudaError_t sync = cudaDeviceSynchronize();
  const int bad = launch == cudaSuccess && sync == cudaSuccess ? check_out(d_out, G * clusters, G) : -1;
  std::printf("%-28s G=%d threads=%u smem=%zu regs=%d maxThreads=%d occupancy(%s)=%d launch=%s sync=%s wrong=%d\n",
              name, G, threads, smem, fa.numRegs, fa.maxThreadsPerBlock, cudaGetErrorName(occ), active,
              cudaGetErrorName(launch), cudaGetErrorName(sync), bad);
  cudaGetLastError();
}

int main() {
  int* d_out = nullptr;
  if (cudaMalloc(&d_out, sizeof(int) * 64) != cudaSuccess) {
    std::printf("cudaMalloc failed\n");
    return 1;
  }
  try_launch("runtime cluster", probe_kernel, 3, 4, 256, 16 * 1024, true, d_out);
  try_launch("runtime cluster 512", probe_kernel, 3, 4, 512, 16 * 1024, true, d_out);
  try_launch("runtime cluster 2", probe_kernel, 2, 4, 256, 1024, true, d_out);
  try_launch("runtime cluster 8", probe_kernel, 8, 2, 256, 1024, true, d_out);
  try_launch("runtime cluster big smem", probe_kernel, 3, 4, 256, 100 * 1024, true, d_out);
  try_launch("compile-time cluster", probe_static_kernel, 3, 4, 256, 16 * 1024, false, d_out);
  cudaFree(d_out);
  return 0;
}
