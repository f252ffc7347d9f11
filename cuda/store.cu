// CUDA kernels of the varlen KV store: prefill gather, in-place append, segment copy.
// Rows are copied as raw bytes in the widest unit (16, 8, 4 or 2 bytes) that every address,
// stride and the row size allow, so one kernel serves every dtype.
#include <algorithm>
#include <cstdint>

#include "cuda_check.cuh"
#include "device_guard.cuh"
#include "mixkv/error.hpp"
#include "mixkv/store.hpp"

namespace mixkv::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksPerSegment = 64;

// Largest unit in {16, 8, 4, 2} dividing every value (addresses and byte strides).
int pick_unit(std::initializer_list<uint64_t> values) {
  for (int unit : {16, 8, 4, 2}) {
    bool ok = true;
    for (uint64_t v : values) ok = ok && (v % static_cast<uint64_t>(unit) == 0);
    if (ok) return unit;
  }
  return 1;
}

template <int U> struct Unit;
template <> struct Unit<16> { using type = uint4; };
template <> struct Unit<8> { using type = uint2; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<1> { using type = uint8_t; };

template <typename F>
void with_unit(int unit, F&& f) {
  switch (unit) {
    case 16: f(Unit<16>{}); break;
    case 8: f(Unit<8>{}); break;
    case 4: f(Unit<4>{}); break;
    case 2: f(Unit<2>{}); break;
    default: f(Unit<1>{}); break;
  }
}

int blocks_for(int64_t items) {
  return static_cast<int>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, kMaxBlocksPerSegment));
}

// ---- build --------------------------------------------------------------------------------------

struct BuildArgs {
  const char* keys;
  const char* values;
  int64_t ks[3], vs[3];  // byte strides of dims 0..2
  const int32_t* positions;
  int64_t C;
  const int32_t* counts;
  const int32_t* valid;  // may be null
  int64_t N, H, window;
  const int32_t* offsets;
  char* kbuf;
  char* vbuf;
  int64_t slots, row_bytes;
  int32_t* lengths;
};

template <typename U>
__global__ void build_kernel(BuildArgs a) {
  const int64_t s = blockIdx.y;
  const int64_t b = s / a.H, h = s % a.H;
  int64_t nb = a.valid ? a.valid[b] : a.N;
  nb = nb < 0 ? 0 : (nb > a.N ? a.N : nb);
  const int64_t wstart = max(a.N - a.window, a.N - nb);
  int64_t c = a.counts[s];
  c = c < 0 ? 0 : (c > a.C ? a.C : c);
  const int64_t total = c + (a.N - wstart);
  if (blockIdx.x == 0 && threadIdx.x == 0) a.lengths[s] = static_cast<int32_t>(total);
  const int64_t units = a.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t off = a.offsets[s];
  const int64_t items = total * 2 * units;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / (2 * units);
    const int64_t rem = i - row * 2 * units;
    const bool is_v = rem >= units;
    const int64_t u = is_v ? rem - units : rem;
    const int64_t dst_row = off + row;
    if (dst_row < 0 || dst_row >= a.slots) continue;  // the caller sized the buffers; never write outside
    const int64_t p = row < c ? static_cast<int64_t>(a.positions[s * a.C + row]) : wstart + (row - c);
    U* dst = reinterpret_cast<U*>((is_v ? a.vbuf : a.kbuf) + dst_row * a.row_bytes) + u;
    if (p < 0 || p >= a.N) {  // invalid position (validated by the Python layer): defined as zeros
      *dst = U{};
      continue;
    }
    const char* src = is_v ? a.values + b * a.vs[0] + h * a.vs[1] + p * a.vs[2]
                           : a.keys + b * a.ks[0] + h * a.ks[1] + p * a.ks[2];
    *dst = reinterpret_cast<const U*>(src)[u];
  }
}

// ---- append -------------------------------------------------------------------------------------

struct AppendArgs {
  const char* k;
  const char* v;
  int64_t ks[3], vs[3];  // byte strides of dims 0..2
  int64_t H, T;
  const int32_t* offsets;
  int32_t* lengths;
  char* kbuf;
  char* vbuf;
  int64_t slots, row_bytes;
};

// One block per segment: every thread reads the old length, copies, and after a barrier one
// thread publishes the new length (so no thread can see a half-updated value).
template <typename U>
__global__ void append_kernel(AppendArgs a) {
  const int64_t s = blockIdx.x;
  const int64_t b = s / a.H, h = s % a.H;
  const int64_t len = a.lengths[s];
  const int64_t base = static_cast<int64_t>(a.offsets[s]) + len;
  const int64_t units = a.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t items = a.T * 2 * units;
  for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
    const int64_t t = i / (2 * units);
    const int64_t rem = i - t * 2 * units;
    const bool is_v = rem >= units;
    const int64_t u = is_v ? rem - units : rem;
    const int64_t dst_row = base + t;
    if (dst_row < 0 || dst_row >= a.slots) continue;
    const char* src = is_v ? a.v + b * a.vs[0] + h * a.vs[1] + t * a.vs[2] : a.k + b * a.ks[0] + h * a.ks[1] + t * a.ks[2];
    reinterpret_cast<U*>((is_v ? a.vbuf : a.kbuf) + dst_row * a.row_bytes)[u] = reinterpret_cast<const U*>(src)[u];
  }
  __syncthreads();
  if (threadIdx.x == 0) a.lengths[s] = static_cast<int32_t>(len + a.T);
}

// ---- copy segments ------------------------------------------------------------------------------

struct CopyArgs {
  const char* sk;
  const char* sv;
  const int32_t* soff;
  const int32_t* slen;
  int64_t s_src, slots_src;
  const int32_t* index;
  const int32_t* doff;
  char* dk;
  char* dv;
  int32_t* dlen;
  int64_t slots_dst, row_bytes;
};

template <typename U>
__global__ void copy_kernel(CopyArgs a) {
  const int64_t i = blockIdx.y;
  const int64_t j = a.index[i];
  const bool ok = j >= 0 && j < a.s_src;
  int64_t n = ok ? static_cast<int64_t>(a.slen[j]) : 0;
  const int64_t so = ok ? static_cast<int64_t>(a.soff[j]) : 0;
  const int64_t dof = a.doff[i];
  // never read or write outside the buffers (the caller guarantees the sizes)
  n = max(int64_t{0}, min(n, min(a.slots_src - so, a.slots_dst - dof)));
  if (so < 0 || dof < 0) n = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) a.dlen[i] = static_cast<int32_t>(n);
  const int64_t units = n * a.row_bytes / static_cast<int64_t>(sizeof(U));
  const U* srck = reinterpret_cast<const U*>(a.sk + so * a.row_bytes);
  const U* srcv = reinterpret_cast<const U*>(a.sv + so * a.row_bytes);
  U* dstk = reinterpret_cast<U*>(a.dk + dof * a.row_bytes);
  U* dstv = reinterpret_cast<U*>(a.dv + dof * a.row_bytes);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < units;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dstk[e] = srck[e];
    dstv[e] = srcv[e];
  }
}

uint64_t addr(const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); }

}  // namespace

void store_build(const Tensor& keys, const Tensor& values, const Tensor& positions, const Tensor& counts,
                 const Tensor& valid_lengths, int64_t window, const Tensor& offsets, const Tensor& k_buf,
                 const Tensor& v_buf, const Tensor& lengths, std::uintptr_t stream) {
  const int64_t B = keys.shape[0], H = keys.shape[1], N = keys.shape[2], D = keys.shape[3];
  const int64_t es = dtype_size(keys.dtype);
  const int64_t S = B * H;
  if (S == 0) return;
  require(S <= 65535, "store_build: at most 65535 segments (B * Hkv) per call, got ", S);
  const cuda_detail::DeviceGuard guard(keys.device_id);
  BuildArgs a{};
  a.keys = static_cast<const char*>(keys.data);
  a.values = static_cast<const char*>(values.data);
  for (int i = 0; i < 3; ++i) {
    a.ks[i] = keys.stride[i] * es;
    a.vs[i] = values.stride[i] * es;
  }
  a.positions = positions.ptr<int32_t>();
  a.C = positions.shape[2];
  a.counts = counts.ptr<int32_t>();
  a.valid = valid_lengths.present ? valid_lengths.ptr<int32_t>() : nullptr;
  a.N = N;
  a.H = H;
  a.window = window;
  a.offsets = offsets.ptr<int32_t>();
  a.kbuf = static_cast<char*>(k_buf.data);
  a.vbuf = static_cast<char*>(v_buf.data);
  a.slots = k_buf.shape[0];
  a.row_bytes = D * es;
  a.lengths = lengths.ptr<int32_t>();
  const int unit = pick_unit({addr(a.keys), addr(a.values), addr(a.kbuf), addr(a.vbuf),
                              static_cast<uint64_t>(a.row_bytes), static_cast<uint64_t>(a.ks[0]),
                              static_cast<uint64_t>(a.ks[1]), static_cast<uint64_t>(a.ks[2]),
                              static_cast<uint64_t>(a.vs[0]), static_cast<uint64_t>(a.vs[1]),
                              static_cast<uint64_t>(a.vs[2])});
  const int64_t upper_rows = a.C + std::min(window, N);
  const dim3 grid(blocks_for(upper_rows * 2 * std::max<int64_t>(a.row_bytes / unit, 1)), static_cast<unsigned>(S));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  with_unit(unit, [&](auto u) {
    using U = typename decltype(u)::type;
    build_kernel<U><<<grid, kThreads, 0, st>>>(a);
    MIXKV_CUDA_CHECK_LAUNCH();
  });
}

void store_append(const Tensor& k_new, const Tensor& v_new, const Tensor& offsets, const Tensor& lengths,
                  const Tensor& k_buf, const Tensor& v_buf, std::uintptr_t stream) {
  const int64_t B = k_new.shape[0], H = k_new.shape[1], T = k_new.shape[2], D = k_new.shape[3];
  const int64_t es = dtype_size(k_new.dtype);
  const int64_t S = B * H;
  if (S == 0) return;
  require(S <= 2147483647LL, "store_append: too many segments");
  const cuda_detail::DeviceGuard guard(k_new.device_id);
  AppendArgs a{};
  a.k = static_cast<const char*>(k_new.data);
  a.v = static_cast<const char*>(v_new.data);
  for (int i = 0; i < 3; ++i) {
    a.ks[i] = k_new.stride[i] * es;
    a.vs[i] = v_new.stride[i] * es;
  }
  a.H = H;
  a.T = T;
  a.offsets = offsets.ptr<int32_t>();
  a.lengths = lengths.ptr<int32_t>();
  a.kbuf = static_cast<char*>(k_buf.data);
  a.vbuf = static_cast<char*>(v_buf.data);
  a.slots = k_buf.shape[0];
  a.row_bytes = D * es;
  const int unit = pick_unit({addr(a.k), addr(a.v), addr(a.kbuf), addr(a.vbuf), static_cast<uint64_t>(a.row_bytes),
                              static_cast<uint64_t>(a.ks[0]), static_cast<uint64_t>(a.ks[1]),
                              static_cast<uint64_t>(a.ks[2]), static_cast<uint64_t>(a.vs[0]),
                              static_cast<uint64_t>(a.vs[1]), static_cast<uint64_t>(a.vs[2])});
  const int64_t items = T * 2 * std::max<int64_t>(a.row_bytes / unit, 1);
  const int threads = static_cast<int>(std::clamp<int64_t>((items + 31) / 32 * 32, 32, kThreads));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  with_unit(unit, [&](auto u) {
    using U = typename decltype(u)::type;
    append_kernel<U><<<static_cast<unsigned>(S), threads, 0, st>>>(a);
    MIXKV_CUDA_CHECK_LAUNCH();
  });
}

void store_copy_segments(const Tensor& src_k, const Tensor& src_v, const Tensor& src_offsets,
                         const Tensor& src_lengths, const Tensor& src_index, const Tensor& dst_offsets,
                         const Tensor& dst_k, const Tensor& dst_v, const Tensor& dst_lengths,
                         std::uintptr_t stream) {
  const int64_t S_dst = src_index.shape[0], S_src = src_offsets.shape[0];
  if (S_dst == 0) return;
  require(S_dst <= 65535, "store_copy_segments: at most 65535 destination segments per call, got ", S_dst);
  const cuda_detail::DeviceGuard guard(src_k.device_id);
  CopyArgs a{};
  a.sk = static_cast<const char*>(src_k.data);
  a.sv = static_cast<const char*>(src_v.data);
  a.soff = src_offsets.ptr<int32_t>();
  a.slen = src_lengths.ptr<int32_t>();
  a.s_src = S_src;
  a.slots_src = src_k.shape[0];
  a.index = src_index.ptr<int32_t>();
  a.doff = dst_offsets.ptr<int32_t>();
  a.dk = static_cast<char*>(dst_k.data);
  a.dv = static_cast<char*>(dst_v.data);
  a.dlen = dst_lengths.ptr<int32_t>();
  a.slots_dst = dst_k.shape[0];
  a.row_bytes = src_k.shape[1] * dtype_size(src_k.dtype);
  const int unit =
      pick_unit({addr(a.sk), addr(a.sv), addr(a.dk), addr(a.dv), static_cast<uint64_t>(a.row_bytes)});
  const int64_t per_segment = S_src > 0 ? (a.slots_src + S_src - 1) / S_src : 1;
  const dim3 grid(blocks_for(per_segment * std::max<int64_t>(a.row_bytes / unit, 1)), static_cast<unsigned>(S_dst));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  with_unit(unit, [&](auto u) {
    using U = typename decltype(u)::type;
    copy_kernel<U><<<grid, kThreads, 0, st>>>(a);
    MIXKV_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mixkv::cuda
