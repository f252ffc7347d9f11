// Budget policies: argument checks, device dispatch and the CPU twin (float64 arithmetic).
#include "mixkv/budget.hpp"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "mixkv/dispatch.hpp"
#include "mixkv/error.hpp"
#include "arg_checks.hpp"

namespace mixkv {

namespace {

void check_options(const BudgetOptions& o) {
  const int p = static_cast<int>(o.policy);
  require(p >= 0 && p <= 3, "policy must be snapkv (0), pyramidkv (1), adakv (2) or sparsemm (3), got ", p);
  require(o.budget >= 1, "budget must be >= 1, got ", o.budget);
  require(o.window >= 1, "window must be >= 1, got ", o.window);
  require(o.num_layers >= 1, "num_layers must be >= 1, got ", o.num_layers);
  require(o.layer_idx >= 0 && o.layer_idx < o.num_layers, "layer_idx must lie in [0, ", o.num_layers, "), got ",
          o.layer_idx);
  require(o.pyramid_beta > 0.0, "beta must be > 0, got ", o.pyramid_beta);
  require(o.ada_floor >= 0.0 && o.ada_floor <= 1.0, "floor must lie in [0, 1], got ", o.ada_floor);
  require(o.ada_skip >= 0, "skip must be >= 0, got ", o.ada_skip);
  require(o.sparsemm_ratio >= 0.0 && o.sparsemm_ratio < 1.0, "ratio must lie in [0, 1), got ", o.sparsemm_ratio);
}


// round half to even of a float64 value clamped to [0, hi].
int32_t round_clamp(double x, int64_t hi) {
  if (!(x > 0.0)) return 0;  // also maps NaN to 0
  if (x >= static_cast<double>(hi)) return static_cast<int32_t>(hi);
  return static_cast<int32_t>(std::min<double>(std::nearbyint(x), static_cast<double>(hi)));
}

int32_t clamp_count(int64_t c, int64_t hi) { return static_cast<int32_t>(std::clamp<int64_t>(c, 0, hi)); }

// AdaKV for one sequence with P_b > base: fills c[h] for every head.
void adakv_sequence(const BudgetOptions& o, const Tensor& imp, int64_t b, int64_t Pb, int64_t base,
                    int32_t* c_out) {
  const int64_t H = imp.shape[1], P = imp.shape[2];
  std::vector<std::pair<double, int64_t>> all;  // (scaled score, flat index h * Pb + rank)
  all.reserve(static_cast<std::size_t>(H * Pb));
  std::vector<double> v(static_cast<std::size_t>(Pb));
  for (int64_t h = 0; h < H; ++h) {
    const float* row = imp.ptr<float>() + b * imp.stride[0] + h * imp.stride[1] + (P - Pb);
    for (int64_t j = 0; j < Pb; ++j) {
      require(std::isfinite(row[j]), "importance must be finite over the valid prefix, got ", row[j], " at [", b,
              ", ", h, ", ", P - Pb + j, "]");
      v[static_cast<std::size_t>(j)] = static_cast<double>(row[j]);
    }
    std::sort(v.begin(), v.end(), [](double x, double y) { return x > y; });
    double f = 1.0;
    if (o.ada_normalize) {
      double top = 0.0, total = 0.0;
      for (int64_t j = 0; j < Pb; ++j) {
        total += v[static_cast<std::size_t>(j)];
        if (j < base) top += v[static_cast<std::size_t>(j)];
      }
      if (total != 0.0) f = top / total;
    }
    for (int64_t j = 0; j < Pb; ++j) all.emplace_back(v[static_cast<std::size_t>(j)] * f, h * Pb + j);
  }
  const int64_t k = H * base;  // < H * Pb
  auto better = [](const std::pair<double, int64_t>& x, const std::pair<double, int64_t>& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  };
  std::nth_element(all.begin(), all.begin() + k, all.end(), better);
  std::vector<int64_t> won(static_cast<std::size_t>(H), 0);
  for (int64_t i = 0; i < k; ++i) ++won[static_cast<std::size_t>(all[static_cast<std::size_t>(i)].second / Pb)];
  const double floor_slots = std::floor(o.ada_floor * static_cast<double>(base));
  for (int64_t h = 0; h < H; ++h)
    c_out[h] = round_clamp(static_cast<double>(won[static_cast<std::size_t>(h)]) * (1.0 - o.ada_floor) + floor_slots,
                           Pb);
}

}  // namespace

namespace detail {

void check_capacity_args(const BudgetOptions& o, const Tensor& importance, const Tensor& valid_lengths,
                         const Tensor& head_scores, const Tensor& out) {
  check_options(o);
  check_tensor(importance, "importance", 3);
  check_dtype(importance, "importance", DType::f32);
  check_last_dim_contiguous(importance, "importance");
  const int64_t B = importance.shape[0], H = importance.shape[1];
  check_tensor(out, "out", 2);
  check_dtype(out, "out", DType::i32);
  require(out.shape[0] == B && out.shape[1] == H, "out must have shape [", B, ", ", H, "]");
  check_same_device(importance, "importance", out, "out");
  if (valid_lengths.present) {
    check_tensor(valid_lengths, "valid_lengths", 1);
    check_dtype(valid_lengths, "valid_lengths", DType::i32);
    require(valid_lengths.shape[0] == B, "valid_lengths must have shape [", B, "]");
    check_same_device(importance, "importance", valid_lengths, "valid_lengths");
  }
  if (o.policy == Policy::sparsemm) {
    require(head_scores.present, "head_scores is required by the sparsemm policy");
    check_tensor(head_scores, "head_scores", 1);
    check_dtype(head_scores, "head_scores", DType::f32);
    require(head_scores.shape[0] == H, "head_scores must have shape [", H, "] (one per kv head)");
    check_same_device(importance, "importance", head_scores, "head_scores");
  }
}

}  // namespace detail

std::size_t capacities_workspace_bytes(int64_t B, int64_t Hkv, int64_t P) {
  // AdaKV on CUDA: two float64 partial sums per block of each (b, h) row (up to 16 blocks), candidate
  // counts [B, Hkv] and up to P candidate scores per (b, h) as float32, each part rounded up to
  // 256 bytes.
  auto round = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t cells = std::max<int64_t>(B * Hkv, 1);
  return static_cast<std::size_t>(round(cells * 256) + round(cells * 4) + round(cells * std::max<int64_t>(P, 1) * 4));
}

int64_t capacity_bound(const BudgetOptions& o, int64_t Hkv, int64_t P) {
  check_options(o);
  require(Hkv >= 1, "Hkv must be >= 1, got ", Hkv);
  require(P >= 0, "P must be >= 0, got ", P);
  const int64_t base = std::max<int64_t>(o.budget - o.window, 0);
  int64_t bound = P;
  switch (o.policy) {
    case Policy::snapkv: bound = base; break;
    case Policy::pyramidkv:  // mx of the formula before its clamp to P_b; no layer exceeds it
      bound = 2 * base - static_cast<int64_t>(std::floor(static_cast<double>(base) / o.pyramid_beta));
      break;
    case Policy::adakv:  // a_h <= Hkv base slots: c_h <= a_h (1 - floor) + floor base <= Hkv base
      bound = o.layer_idx < o.ada_skip ? base : (base > P / Hkv ? P : Hkv * base);
      break;
    case Policy::sparsemm: break;
  }
  return std::clamp<int64_t>(bound, 0, P);
}

void capacities(const BudgetOptions& options, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out, const Tensor& workspace, std::uintptr_t stream) {
  detail::check_capacity_args(options, importance, valid_lengths, head_scores, out);
  if (importance.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    const int64_t B = importance.shape[0], H = importance.shape[1], P = importance.shape[2];
    if (options.policy == Policy::adakv) {
      require(workspace.present, "workspace is required on CUDA (capacities_workspace_bytes bytes)");
      check_same_device(importance, "importance", workspace, "workspace");
      require(workspace.numel() * dtype_size(workspace.dtype) >=
                  static_cast<int64_t>(capacities_workspace_bytes(B, H, P)),
              "workspace must hold at least ", capacities_workspace_bytes(B, H, P), " bytes");
    }
    cuda::capacities(options, importance, valid_lengths, head_scores, out, workspace, stream);
#else
    (void)workspace;
    (void)stream;
    no_cuda("capacities");
#endif
    return;
  }
  cpu::capacities(options, importance, valid_lengths, head_scores, out);
}

namespace cpu {

void capacities(const BudgetOptions& o, const Tensor& importance, const Tensor& valid_lengths,
                const Tensor& head_scores, const Tensor& out) {
  detail::check_capacity_args(o, importance, valid_lengths, head_scores, out);
  require(!importance.is_cuda(), "capacities: the CPU path needs CPU tensors");
  const int64_t B = importance.shape[0], H = importance.shape[1], P = importance.shape[2];
  const int64_t W = o.window, L = o.num_layers, l = o.layer_idx;
  const int64_t base = std::max<int64_t>(o.budget - W, 0);
  std::vector<int64_t> prefix(static_cast<std::size_t>(B), P);
  if (valid_lengths.present) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = valid_lengths.ptr<int32_t>()[b * valid_lengths.stride[0]];
      require(n >= 1 && n <= P + W, "valid_lengths must lie in [1, ", P + W, "], got ", n, " at [", b, "]");
      prefix[static_cast<std::size_t>(b)] = std::max<int64_t>(n - W, 0);
    }
  }
  if (o.policy == Policy::sparsemm)
    for (int64_t h = 0; h < H; ++h)
      require(std::isfinite(head_scores.ptr<float>()[h * head_scores.stride[0]]), "head_scores must be finite");
  std::vector<int32_t> row(static_cast<std::size_t>(H));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Pb = prefix[static_cast<std::size_t>(b)];
    for (int64_t h = 0; h < H; ++h) row[static_cast<std::size_t>(h)] = clamp_count(base, Pb);
    switch (o.policy) {
      case Policy::snapkv: break;
      case Policy::pyramidkv: {
        int64_t mn = static_cast<int64_t>(std::floor(static_cast<double>(base) / o.pyramid_beta));
        int64_t mx = 2 * base - mn;
        if (mx >= Pb) {
          mx = Pb;
          mn = 2 * base - mx;
        }
        int64_t step = 0;
        if (L > 1) {
          const int64_t d = mx - mn;
          step = d >= 0 ? d / (L - 1) : -((-d + L - 2) / (L - 1));  // floor division
        }
        for (int64_t h = 0; h < H; ++h) row[static_cast<std::size_t>(h)] = clamp_count(mx - l * step, Pb);
        break;
      }
      case Policy::sparsemm: {
        const int64_t mn = static_cast<int64_t>(std::floor(static_cast<double>(base) * o.sparsemm_ratio));
        const double pool = static_cast<double>((base - mn) * L * H);
        for (int64_t h = 0; h < H; ++h) {
          const double s = static_cast<double>(head_scores.ptr<float>()[h * head_scores.stride[0]]);
          row[static_cast<std::size_t>(h)] = round_clamp(s * pool + static_cast<double>(mn), Pb);
        }
        break;
      }
      case Policy::adakv:
        if (l >= o.ada_skip && Pb > base) adakv_sequence(o, importance, b, Pb, base, row.data());
        break;
    }
    for (int64_t h = 0; h < H; ++h)
      out.ptr<int32_t>()[b * out.stride[0] + h * out.stride[1]] = row[static_cast<std::size_t>(h)];
  }
}

}  // namespace cpu
}  // namespace mixkv
