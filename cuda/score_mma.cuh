// Warp-level tensor-core and asynchronous-copy primitives used by the scoring kernels (sm_80+).
//
// Fragment layout of mma.m16n8k16 (PTX ISA), lane = 4·g + t:
//   A (16×16, row-major): a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, cols 2t..), a2 = (row g, cols 2t+8..),
//                         a3 = (row g+8, cols 2t+8..).
//   B (16×8): b0 = (k 2t, 2t+1; col g), b1 = (k 2t+8, 2t+9; col g).
//   C (16×8, float): c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.cuh"
#include "pdl.cuh"

namespace mixkv::score_detail {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte asynchronous copy global -> shared; `valid == false` writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// L2 eviction priority of an asynchronous copy: 0 the default, 1 evict first (data read for the last
// time), 2 evict last (data read again soon, e.g. by the next pass).
__device__ __forceinline__ uint64_t l2_policy(int hint) {
  uint64_t pol = 0;
  if (hint == 1)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  else if (hint == 2)
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

// cp_async16 with an L2 cache policy from l2_policy (hint != 0).
__device__ __forceinline__ void cp_async16_hint(void* dst, const void* src, bool valid, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0), "l"(pol)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// Four 8×8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(ptr))
               : "memory");
}

// ldmatrix_x4 with each 8×8 matrix transposed: lane (g, t) gets elements (2t, g) and (2t + 1, g).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(ptr))
               : "memory");
}

// c += a · b for one m16n8k16 tile, float accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_16816: 16-bit types only");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x (approximate, about 2 ulp; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
  uint16_t a, b;
  std::memcpy(&a, &lo, 2);
  std::memcpy(&b, &hi, 2);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// Two adjacent 16-bit elements (4-byte aligned) as floats.
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* ptr) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ptr));
}
__device__ __forceinline__ float2 load_pair(const __half* ptr) {
  return __half22float2(*reinterpret_cast<const __half2*>(ptr));
}

// Eight adjacent 16-bit elements (16-byte aligned, shared memory) as floats.
template <typename T>
__device__ __forceinline__ void load_eight(const T* ptr, float* x) {
  const uint4 u = *reinterpret_cast<const uint4*>(ptr);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T pair[2];
    std::memcpy(pair, &w[i], 4);
    const float2 f = load_pair(pair);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// Programmatic dependent launch (pdl.cuh).
using cuda_detail::grid_dep_launch;
using cuda_detail::grid_dep_wait;

// Logits of a 16-key slab of a key tile in shared memory ([keys][LDK] elements, key-major) against
// one warp's NT·8 packed query rows held as B fragments (qb[nt][ks] = the two registers of rows
// 8nt..8nt+7, k-step ks): acc[nt] is the m16n8 tile (keys × rows), so lane (g, t) gets keys g and
// g + 8 (c0, c1 / c2, c3) of rows 8nt + 2t and 8nt + 2t + 1. `slab` points at the slab's first key.
template <typename T, int KS, int LDK, int NT>
__device__ __forceinline__ void slab_logits(const uint32_t (&qb)[NT][KS][2], const T* slab, int lane,
                                            float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  // ldmatrix.x4 matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
  const T* base = slab + (((lane >> 3) & 1) * 8 + (lane & 7)) * LDK + (lane >> 4) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, base + ks * 16);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mma_16816<T>(acc[nt], a, qb[nt][ks][0], qb[nt][ks][1]);
  }
}

// Squared norms of the 16 rows of a slab ([16][LDK] elements, row-major, shared memory) on the tensor
// cores: the diagonal of the Gram matrix S·Sᵀ, as two m16n8 tiles whose B operands are the slab's own
// A fragments (B = rows 0-7: a0, a2; rows 8-15: a1, a3). Lane (g, t = g / 2) gets the squared norms
// of rows g and g + 8 in n0, n1. With kDot, also S·mfᵀ for `mf`, two rows of KS·16 elements in shared
// memory (the B operand's columns 0 and 1; the other columns are zero): lane (g, 0) gets
// (S·mf₀ + S·mf₁) of rows g and g + 8 in d0, d1.
// Products of 16-bit inputs are exact in float; the sums are the tensor cores' float accumulation.
// slab_norms_at takes any layout in which each 8-element row piece is 16 contiguous bytes: `base` is
// this lane's ldmatrix row address for k-step 0 (slab row ((lane >> 3) & 1) · 8 + (lane & 7), columns
// 8 · (lane >> 4) ..), `kstep` the elements from one k-step's address to the next; slab_norms is the
// row-major case ([16][LDK] from `slab`).
// slab_norms_by takes the lane's ldmatrix row address of each k-step from `at(ks)` (any layout, e.g. a
// swizzled one).
template <typename T, int KS, bool kDot, typename At>
__device__ __forceinline__ void slab_norms_by(At at, const T* mf, int lane, float& n0, float& n1, float& d0,
                                              float& d1) {
  float ca[4] = {0.0f, 0.0f, 0.0f, 0.0f}, cb[4] = {0.0f, 0.0f, 0.0f, 0.0f}, cm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const bool mrow = lane < 8;  // B column g = lane / 4 is 0 or 1
  const T* mbase = kDot ? mf + (lane >> 2) * KS * 16 + 2 * (lane & 3) : mf;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, at(ks));
    mma_16816<T>(ca, a, a[0], a[2]);
    mma_16816<T>(cb, a, a[1], a[3]);
    if constexpr (kDot) {
      const uint32_t b0 = mrow ? *reinterpret_cast<const uint32_t*>(mbase + ks * 16) : 0u;
      const uint32_t b1 = mrow ? *reinterpret_cast<const uint32_t*>(mbase + ks * 16 + 8) : 0u;
      mma_16816<T>(cm, a, b0, b1);
    }
  }
  const bool odd = (lane >> 2) & 1;
  n0 = odd ? ca[1] : ca[0];
  n1 = odd ? cb[3] : cb[2];
  d0 = cm[0] + cm[1];
  d1 = cm[2] + cm[3];
}

template <typename T, int KS, bool kDot>
__device__ __forceinline__ void slab_norms_at(const T* base, int kstep, const T* mf, int lane, float& n0, float& n1,
                                              float& d0, float& d1) {
  slab_norms_by<T, KS, kDot>([=](int ks) { return base + ks * kstep; }, mf, lane, n0, n1, d0, d1);
}

template <typename T, int KS, int LDK, bool kDot>
__device__ __forceinline__ void slab_norms(const T* slab, const T* mf, int lane, float& n0, float& n1, float& d0,
                                           float& d1) {
  const T* base = slab + (((lane >> 3) & 1) * 8 + (lane & 7)) * LDK + (lane >> 4) * 8;
  slab_norms_at<T, KS, kDot>(base, 16, mf, lane, n0, n1, d0, d1);
}

// Sums of the unit keys k / max(|k|, 1e-12) of a 16-key slab ([16][LDK] elements, shared memory), added
// to u on the tensor cores: u[ds] is the m16n8 tile (16 head dims × 8) of Sᵀ·B for head dims
// 16ds..16ds+15, where B's columns 0, 1 and 2 hold the keys' inverse norms rounded to T and the next two
// rounding remainders (so their sum carries about 24 significant bits, a float's), the other columns
// zero. unit_sum_pair(u[ds]) gives lane (g, 0) the unit-key sums of dims 16ds + g and 16ds + g + 8
// (columns 0-1 in its own tile, column 2 in lane (g, 1)'s); the other lanes' values are partial.
// 16-bit types whose range holds 1e12 (bfloat16): a zero key gets the inverse norm 1e12 and contributes 0.
// slab_unit_sums_at takes any layout in which each 8-element row piece is 16 contiguous bytes: `nbase` is
// this lane's ldmatrix row address for the norms (as slab_norms_at), `tbase` its address for the
// transposed loads (slab row ((lane >> 4) & 1) · 8 + (lane & 7), columns 8 · ((lane >> 3) & 1) ..), and
// `kstep` the elements from one 16-column step's address to the next; slab_unit_sums is the row-major
// case ([16][LDK] from `slab`).
// slab_unit_sums_by takes both addresses per step from `nat(ks)` and `tat(ds)` (any layout).
template <typename T, int KS, typename NAt, typename TAt>
__device__ __forceinline__ void slab_unit_sums_by(NAt nat, TAt tat, int lane, float (&u)[KS][4]) {
  float n0, n1, d0, d1;
  slab_norms_by<T, KS, false>(nat, static_cast<const T*>(nullptr), lane, n0, n1, d0, d1);
  // lane (g, g / 2) holds the squared norms of keys g and g + 8
  const float i0 = rsqrtf(fmaxf(n0, 1e-24f)), i1 = rsqrtf(fmaxf(n1, 1e-24f));
  const int g = lane >> 2, t = lane & 3;
  // B fragment of lane (g, t): keys 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) of column g; the norm of key
  // j < 8 sits in lane 4j + j / 2, so keys 2t and 2t + 1 come from lanes 9t and 9t + 4.
  const float x0 = __shfl_sync(0xffffffffu, i0, 9 * t), x1 = __shfl_sync(0xffffffffu, i0, 9 * t + 4);
  const float y0 = __shfl_sync(0xffffffffu, i1, 9 * t), y1 = __shfl_sync(0xffffffffu, i1, 9 * t + 4);
  auto part = [g](float x) {  // column g < 3: part g of x
    const T p0 = cuda_detail::from_float<T>(x);
    const float r1 = x - cuda_detail::to_float(p0);
    const T p1 = cuda_detail::from_float<T>(r1);
    return g == 0 ? p0 : (g == 1 ? p1 : cuda_detail::from_float<T>(r1 - cuda_detail::to_float(p1)));
  };
  const uint32_t b0 = g < 3 ? pack_pair(part(x0), part(x1)) : 0u;
  const uint32_t b1 = g < 3 ? pack_pair(part(y0), part(y1)) : 0u;
  // A = Sᵀ (head dims × keys) by transposed loads; matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15),
  // (keys 8-15, d 0-7), (keys 8-15, d 8-15) give a0..a3.
#pragma unroll
  for (int ds = 0; ds < KS; ++ds) {
    uint32_t a[4];
    ldmatrix_x4_trans(a, tat(ds));
    mma_16816<T>(u[ds], a, b0, b1);
  }
}

template <typename T, int KS>
__device__ __forceinline__ void slab_unit_sums_at(const T* nbase, const T* tbase, int kstep, int lane,
                                                  float (&u)[KS][4]) {
  slab_unit_sums_by<T, KS>([=](int ks) { return nbase + ks * kstep; }, [=](int ds) { return tbase + ds * kstep; },
                           lane, u);
}

// The unit-key sums of one head-dimension step from slab_unit_sums' tile (every lane calls it; lane (g, 0)
// gets dims 16ds + g and 16ds + g + 8): columns 0 and 1 of its own tile plus column 2 of lane (g, 1).
__device__ __forceinline__ float2 unit_sum_pair(const float (&u)[4]) {
  const float c2a = __shfl_down_sync(0xffffffffu, u[0], 1), c2b = __shfl_down_sync(0xffffffffu, u[2], 1);
  return make_float2(u[0] + u[1] + c2a, u[2] + u[3] + c2b);
}

template <typename T, int KS, int LDK>
__device__ __forceinline__ void slab_unit_sums(const T* slab, int lane, float (&u)[KS][4]) {
  slab_unit_sums_at<T, KS>(slab + (((lane >> 3) & 1) * 8 + (lane & 7)) * LDK + (lane >> 4) * 8,
                           slab + (((lane >> 4) & 1) * 8 + (lane & 7)) * LDK + ((lane >> 3) & 1) * 8, 16, lane, u);
}
}  // namespace mixkv::score_detail
