// CUDA budget policies. Closed-form policies (and the trivial AdaKV cases) use one thread per
// (b, h). AdaKV proper: one block per (b, h) computes f_h (float64 sums of the top-base and of
// all valid scores, via a radix select of the base-th largest), then one block per sequence
// radix-selects the k-th largest float32 scaled score over all heads and counts each head's
// slots (ties in flat order: lower head first).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "mixkv/budget.hpp"
#include "mixkv/error.hpp"
#include "radix_select.cuh"

namespace mixkv {
namespace {

namespace rx = cuda_detail::radix;

struct BudgetArgs {
  const float* imp;
  int64_t i_b, i_h;
  const int32_t* lengths;  // null: every prefix is P
  int64_t l_b;
  const float* head_scores;  // sparsemm only
  int64_t hs_h;
  int32_t* out;
  int64_t o_b, o_h;
  double* factors;  // adakv: f[b * H + h]
  int B, H, P;
  int64_t base, window, layer_idx, num_layers;
  int policy;
  double beta, alpha, ratio;
  bool normalize;
  int64_t skip;
};

__device__ __forceinline__ int64_t prefix_of(const BudgetArgs& a, int b) {
  if (a.lengths == nullptr) return a.P;
  int64_t n = a.lengths[b * a.l_b];
  n = n < 0 ? 0 : n;
  const int64_t pb = n - a.window;
  return pb < 0 ? 0 : (pb > a.P ? a.P : pb);
}

__device__ __forceinline__ int32_t clamp_count(int64_t c, int64_t hi) {
  return static_cast<int32_t>(c < 0 ? 0 : (c > hi ? hi : c));
}

// round half to even of x, clamped to [0, hi]; NaN maps to 0 (same as the CPU twin).
__device__ __forceinline__ int32_t round_clamp(double x, int64_t hi) {
  if (!(x > 0.0)) return 0;
  if (x >= static_cast<double>(hi)) return static_cast<int32_t>(hi);
  const double r = rint(x);
  return static_cast<int32_t>(r > static_cast<double>(hi) ? static_cast<double>(hi) : r);
}

__device__ __forceinline__ bool adakv_ranks(const BudgetArgs& a, int64_t pb) {
  return a.policy == static_cast<int>(Policy::adakv) && a.layer_idx >= a.skip && pb > a.base;
}

// One thread per (b, h): every capacity that needs no ranking.
__global__ void closed_form_kernel(BudgetArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= static_cast<int64_t>(a.B) * a.H) return;
  const int b = static_cast<int>(t / a.H), h = static_cast<int>(t % a.H);
  const int64_t pb = prefix_of(a, b);
  if (adakv_ranks(a, pb)) return;  // written by adakv_slots_kernel
  int32_t c = clamp_count(a.base, pb);
  if (a.policy == static_cast<int>(Policy::pyramidkv)) {
    int64_t mn = static_cast<int64_t>(floor(__ddiv_rn(static_cast<double>(a.base), a.beta)));
    int64_t mx = 2 * a.base - mn;
    if (mx >= pb) {
      mx = pb;
      mn = 2 * a.base - mx;
    }
    int64_t step = 0;
    if (a.num_layers > 1) {
      const int64_t d = mx - mn, l1 = a.num_layers - 1;
      step = d >= 0 ? d / l1 : -((-d + l1 - 1) / l1);
    }
    c = clamp_count(mx - a.layer_idx * step, pb);
  } else if (a.policy == static_cast<int>(Policy::sparsemm)) {
    const int64_t mn = static_cast<int64_t>(floor(__dmul_rn(static_cast<double>(a.base), a.ratio)));
    const double pool = static_cast<double>((a.base - mn) * a.num_layers * a.H);
    const double s = static_cast<double>(a.head_scores[h * a.hs_h]);
    c = round_clamp(__dadd_rn(__dmul_rn(s, pool), static_cast<double>(mn)), pb);
  }
  a.out[b * a.o_b + h * a.o_h] = c;
}

// One block per (b, h): f = (sum of the top-base valid scores) / (sum of all valid scores).
__global__ void __launch_bounds__(1024) adakv_factor_kernel(BudgetArgs a) {
  __shared__ rx::Shared sh;
  const int b = blockIdx.x / a.H, h = blockIdx.x % a.H;
  const int64_t pb64 = prefix_of(a, b);
  double* f = a.factors + blockIdx.x;
  if (!adakv_ranks(a, pb64)) return;
  if (!a.normalize) {
    if (threadIdx.x == 0) *f = 1.0;
    return;
  }
  const int pb = static_cast<int>(pb64), base = static_cast<int>(a.base);  // base < pb
  const float* row = a.imp + b * a.i_b + h * a.i_h + (a.P - pb);
  uint32_t threshold = 0xFFFFFFFFu, take_equal = 0;
  if (base > 0) rx::select_kth([&](int i) { return rx::order_key(row[i]); }, pb, base, sh, threshold, take_equal);
  double top = 0.0, total = 0.0;
  for (int i = threadIdx.x; i < pb; i += blockDim.x) {
    const float v = row[i];
    total += static_cast<double>(v);
    if (rx::order_key(v) > threshold) top += static_cast<double>(v);
  }
  total = rx::block_sum(total, sh);
  top = rx::block_sum(top, sh);
  if (threadIdx.x == 0) {
    if (base > 0) top += static_cast<double>(take_equal) * static_cast<double>(rx::key_value(threshold));
    *f = total != 0.0 ? __ddiv_rn(top, total) : 1.0;
  }
}

// One block per sequence: slots a_h won in the global top H*base of float32(A * f_h).
__global__ void __launch_bounds__(1024) adakv_slots_kernel(BudgetArgs a) {
  __shared__ rx::Shared sh;
  const int b = blockIdx.x;
  const int64_t pb64 = prefix_of(a, b);
  if (!adakv_ranks(a, pb64)) return;
  const int pb = static_cast<int>(pb64), H = a.H;
  const float* rows = a.imp + b * a.i_b + (a.P - pb);
  const double* f = a.factors + static_cast<int64_t>(b) * H;
  auto scaled_key = [&](int h, int j) {
    const double s = __dmul_rn(static_cast<double>(rows[h * a.i_h + j]), f[h]);
    return rx::order_key(__double2float_rn(s));
  };
  const uint32_t k = static_cast<uint32_t>(a.base) * static_cast<uint32_t>(H);  // < H * pb
  uint32_t threshold = 0xFFFFFFFFu, take_equal = 0;
  if (k > 0)
    rx::select_kth([&](int i) { return scaled_key(i / pb, i % pb); }, H * pb, k, sh, threshold, take_equal);
  const double floor_slots = floor(__dmul_rn(a.alpha, static_cast<double>(a.base)));
  uint32_t equal_left = take_equal;  // ties still to hand out, lower heads first
  for (int h = 0; h < H; ++h) {
    uint32_t greater = 0, equal = 0;
    for (int j = threadIdx.x; j < pb; j += blockDim.x) {
      const uint32_t key = scaled_key(h, j);
      greater += key > threshold ? 1u : 0u;
      equal += key == threshold ? 1u : 0u;
    }
    greater = rx::block_sum(greater, sh);
    equal = rx::block_sum(equal, sh);
    const uint32_t from_ties = equal < equal_left ? equal : equal_left;
    equal_left -= from_ties;
    if (threadIdx.x == 0) {
      const double won = static_cast<double>(greater + from_ties);
      a.out[b * a.o_b + h * a.o_h] = round_clamp(__dadd_rn(__dmul_rn(won, 1.0 - a.alpha), floor_slots), pb64);
    }
  }
}

}  // namespace

namespace cuda {

void capacities(const BudgetOptions& o, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out, const Tensor& workspace, std::uintptr_t stream) {
  const int64_t B = importance.shape[0], H = importance.shape[1], P = importance.shape[2];
  if (B * H == 0) return;
  require(B * H <= 0x7FFFFFFF && P <= (int64_t{1} << 30), "capacities: importance is too large for CUDA");
  require(o.policy != Policy::adakv || H * P <= (int64_t{1} << 30),
          "capacities: adakv on CUDA needs Hkv * P <= 2^30");
  rx::DeviceGuard guard(importance.device_id);
  BudgetArgs a{};
  a.imp = importance.ptr<float>();
  a.i_b = importance.stride[0];
  a.i_h = importance.stride[1];
  a.lengths = valid_lengths.present ? valid_lengths.ptr<int32_t>() : nullptr;
  a.l_b = valid_lengths.present ? valid_lengths.stride[0] : 0;
  a.head_scores = head_scores.present ? head_scores.ptr<float>() : nullptr;
  a.hs_h = head_scores.present ? head_scores.stride[0] : 0;
  a.out = out.ptr<int32_t>();
  a.o_b = out.stride[0];
  a.o_h = out.stride[1];
  a.factors = workspace.present ? static_cast<double*>(workspace.data) : nullptr;
  a.B = static_cast<int>(B);
  a.H = static_cast<int>(H);
  a.P = static_cast<int>(P);
  a.base = o.budget > o.window ? o.budget - o.window : 0;
  a.window = o.window;
  a.layer_idx = o.layer_idx;
  a.num_layers = o.num_layers;
  a.policy = static_cast<int>(o.policy);
  a.beta = o.pyramid_beta;
  a.alpha = o.ada_floor;
  a.ratio = o.sparsemm_ratio;
  a.normalize = o.ada_normalize;
  a.skip = o.ada_skip;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t cells = B * H;
  closed_form_kernel<<<static_cast<unsigned>((cells + 127) / 128), 128, 0, s>>>(a);
  MIXKV_CUDA_CHECK_LAUNCH();
  if (o.policy == Policy::adakv && o.layer_idx >= o.ada_skip) {
    require(a.factors != nullptr, "capacities: adakv needs a workspace on CUDA");
    const int threads = P > 4096 ? 1024 : 256;
    adakv_factor_kernel<<<static_cast<unsigned>(cells), threads, 0, s>>>(a);
    MIXKV_CUDA_CHECK_LAUNCH();
    adakv_slots_kernel<<<static_cast<unsigned>(B), 1024, 0, s>>>(a);
    MIXKV_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace cuda
}  // namespace mixkv
