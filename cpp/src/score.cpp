// Token scoring (SPEC §1–5): argument checks, device dispatch and the CPU twin.
#include "mixkv/score.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mixkv/dispatch.hpp"
#include "mixkv/error.hpp"
#include "mixkv/half.hpp"

namespace mixkv {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_valid_lengths(const Tensor& valid, const Tensor& like, int64_t B, int64_t N) {
  if (!valid.present) return;
  check_tensor(valid, "valid_lengths", 1);
  check_dtype(valid, "valid_lengths", DType::i32);
  require(valid.shape[0] == B, "valid_lengths must have shape [", B, "], got [", valid.shape[0], "]");
  check_same_device(like, "keys", valid, "valid_lengths");
  if (!valid.is_cuda()) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = valid.ptr<const int32_t>()[b * valid.stride[0]];
      require(n >= 1 && n <= N, "valid_lengths must lie in [1, ", N, "], got ", n, " at [", b, "]");
    }
  }
}

void check_float_output(const Tensor& t, const char* name, const Tensor& like, int64_t B, int64_t H, int64_t P,
                        int ndim) {
  check_tensor(t, name, ndim);
  check_dtype(t, name, DType::f32);
  check_contiguous(t, name);
  check_same_device(like, "keys", t, name);
  require(t.shape[0] == B && t.shape[1] == H && (ndim == 2 || t.shape[2] == P), name, " must have shape [", B,
          ", ", H, ndim == 3 ? ", " : "", ndim == 3 ? std::to_string(P) : std::string(), "]");
}

void check_score_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& valid,
                      const Tensor& redundancy, const ScoreOptions& o, const Tensor& scores,
                      const Tensor& importance, const Tensor& redundancy_out) {
  check_tensor(q, "q_window", 4);
  check_tensor(k, "keys", 4);
  check_tensor(v, "values", 4);
  check_float(q, "q_window");
  check_float(k, "keys");
  check_float(v, "values");
  require(q.dtype == k.dtype && k.dtype == v.dtype, "q_window, keys and values must share one dtype, got ",
          dtype_name(q.dtype), ", ", dtype_name(k.dtype), ", ", dtype_name(v.dtype));
  check_last_dim_contiguous(q, "q_window");
  check_last_dim_contiguous(k, "keys");
  check_last_dim_contiguous(v, "values");
  check_same_device(k, "keys", q, "q_window");
  check_same_device(k, "keys", v, "values");
  const int64_t B = k.shape[0], Hkv = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t Hq = q.shape[1], W = q.shape[2];
  require(v.shape[0] == B && v.shape[1] == Hkv && v.shape[2] == N && v.shape[3] == D,
          "values must have the shape of keys [", B, ", ", Hkv, ", ", N, ", ", D, "]");
  require(q.shape[0] == B, "q_window must have batch ", B, " like keys, got ", q.shape[0]);
  require(q.shape[3] == D, "q_window must have head dimension ", D, " like keys, got ", q.shape[3]);
  require(B >= 1 && Hkv >= 1 && D >= 1, "keys must have non-empty batch, head and head-dimension sizes");
  require(Hq >= 1 && Hq % Hkv == 0, "q_window heads (", Hq, ") must be a positive multiple of the key heads (", Hkv,
          ")");
  require(W >= 1 && W < N, "q_window must hold 1 <= W < N window queries, got W = ", W, " with N = ", N);
  require(N <= std::numeric_limits<int32_t>::max(), "keys: sequence length must fit in int32");
  const int m = static_cast<int>(o.method);
  require(m >= 0 && m <= 5, "method must be one of attn, keydiff, vnorm, knorm, uniform-mix, mixkv");
  require(o.pooling == Pooling::avg || o.pooling == Pooling::max, "pooling must be avg or max");
  require(o.gqa == GqaReduce::mean || o.gqa == GqaReduce::max, "gqa must be mean or max");
  require(o.kernel_size >= 1 && o.kernel_size % 2 == 1, "kernel_size must be odd and >= 1, got ", o.kernel_size);
  require(std::isfinite(o.scale) && o.scale >= 0.0f, "scale must be finite and positive (0 means 1/sqrt(D))");
  check_valid_lengths(valid, k, B, N);
  if (redundancy.present) {
    check_tensor(redundancy, "redundancy", 2);
    check_dtype(redundancy, "redundancy", DType::f32);
    check_same_device(k, "keys", redundancy, "redundancy");
    require((redundancy.shape[0] == 1 || redundancy.shape[0] == B) && redundancy.shape[1] == Hkv,
            "redundancy must have shape [1, ", Hkv, "] or [", B, ", ", Hkv, "]");
  }
  check_float_output(scores, "scores", k, B, Hkv, N - W, 3);
  if (importance.present) check_float_output(importance, "importance", k, B, Hkv, N - W, 3);
  if (redundancy_out.present) check_float_output(redundancy_out, "redundancy_out", k, B, Hkv, 0, 2);
}

void check_redundancy_args(const Tensor& keys, const Tensor& valid, const Tensor& out) {
  check_tensor(keys, "keys", 4);
  check_float(keys, "keys");
  check_last_dim_contiguous(keys, "keys");
  const int64_t B = keys.shape[0], H = keys.shape[1], N = keys.shape[2];
  require(N >= 1, "keys must hold at least one token");
  check_valid_lengths(valid, keys, B, N);
  check_float_output(out, "out", keys, B, H, 0, 2);
}

// ---- CPU twin helpers --------------------------------------------------------------------------

int64_t valid_length(const Tensor& valid, int64_t b, int64_t N) {
  return valid.present ? static_cast<int64_t>(valid.ptr<const int32_t>()[b * valid.stride[0]]) : N;
}

// Rows [first, last) of one (b, h) slice of a [B, H, N, D] tensor, converted to float.
void load_rows(const Tensor& t, int64_t b, int64_t h, int64_t first, int64_t last, std::vector<float>& out) {
  const int64_t D = t.shape[3];
  out.resize(static_cast<std::size_t>((last - first) * D));
  for (int64_t j = first; j < last; ++j) {
    const int64_t base = b * t.stride[0] + h * t.stride[1] + j * t.stride[2];
    float* dst = out.data() + (j - first) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = load_as_float(t.data, t.dtype, base + d);
  }
}

float dot(const float* a, const float* b, int64_t D) {
  float acc = 0.0f;
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

// Mean unit key of the n rows in `rows` ([n, D]) and the per-row norms.
void unit_key_mean(const std::vector<float>& rows, int64_t n, int64_t D, std::vector<float>& norms,
                   std::vector<float>& mean) {
  norms.assign(static_cast<std::size_t>(n), 0.0f);
  std::vector<double> acc(static_cast<std::size_t>(D), 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const float* r = rows.data() + j * D;
    const float norm = std::sqrt(dot(r, r, D));
    norms[static_cast<std::size_t>(j)] = norm;
    const float inv = 1.0f / std::max(norm, 1e-12f);
    for (int64_t d = 0; d < D; ++d) acc[static_cast<std::size_t>(d)] += static_cast<double>(r[d] * inv);
  }
  mean.resize(static_cast<std::size_t>(D));
  for (int64_t d = 0; d < D; ++d) mean[static_cast<std::size_t>(d)] = static_cast<float>(acc[d] / double(n));
}

float online_redundancy(const std::vector<float>& mean, int64_t n) {
  if (n < 2) return 0.0f;
  double sq = 0.0;
  for (float x : mean) sq += static_cast<double>(x) * x;
  const double r = (static_cast<double>(n) * sq - 1.0) / static_cast<double>(n - 1);
  return static_cast<float>(std::min(1.0, std::max(0.0, r)));
}

// Min–max normalise `x` with +1e-8 in the denominator, then scale it so its mean matches `mean_a`.
void normalise_align(std::vector<float>& x, float mean_a) {
  if (x.empty()) return;
  float lo = x[0], hi = x[0];
  for (float e : x) {
    lo = std::min(lo, e);
    hi = std::max(hi, e);
  }
  const float range = hi - lo + 1e-8f;
  double sum = 0.0;
  for (float& e : x) {
    e = (e - lo) / range;
    sum += e;
  }
  const float mean = static_cast<float>(sum / static_cast<double>(x.size()));
  const float factor = mean_a / (mean + 1e-8f);
  for (float& e : x) e *= factor;
}

bool needs_values(Method m) {
  return m == Method::vnorm || m == Method::uniform_mix || m == Method::mixkv;
}
bool needs_diversity(Method m) {
  return m == Method::keydiff || m == Method::uniform_mix || m == Method::mixkv;
}

}  // namespace

// ---- public entry points -------------------------------------------------------------------------

// The workspace sizes are defined next to the kernels (cuda/score.cu) when CUDA is compiled.
#ifndef MIXKV_WITH_CUDA
std::size_t score_workspace_bytes(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) { return 0; }
std::size_t head_redundancy_workspace_bytes(int64_t, int64_t, int64_t, int64_t) { return 0; }
#endif

void score(const Tensor& q_window, const Tensor& keys, const Tensor& values, const Tensor& valid_lengths,
           const Tensor& redundancy, const ScoreOptions& options, const Tensor& scores,
           const Tensor& importance, const Tensor& redundancy_out, const Tensor& workspace,
           std::uintptr_t stream) {
  check_score_args(q_window, keys, values, valid_lengths, redundancy, options, scores, importance, redundancy_out);
  if (keys.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    cuda::score(q_window, keys, values, valid_lengths, redundancy, options, scores, importance, redundancy_out,
                workspace, stream);
#else
    (void)workspace;
    (void)stream;
    no_cuda("score");
#endif
    return;
  }
  cpu::score(q_window, keys, values, valid_lengths, redundancy, options, scores, importance, redundancy_out);
}

void head_redundancy(const Tensor& keys, const Tensor& valid_lengths, const Tensor& out, const Tensor& workspace,
                     std::uintptr_t stream) {
  check_redundancy_args(keys, valid_lengths, out);
  if (keys.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    cuda::head_redundancy(keys, valid_lengths, out, workspace, stream);
#else
    (void)workspace;
    (void)stream;
    no_cuda("head_redundancy");
#endif
    return;
  }
  cpu::head_redundancy(keys, valid_lengths, out);
}

namespace cpu {

void head_redundancy(const Tensor& keys, const Tensor& valid_lengths, const Tensor& out) {
  check_redundancy_args(keys, valid_lengths, out);
  require(!keys.is_cuda(), "head_redundancy: the CPU path needs CPU tensors");
  const int64_t B = keys.shape[0], H = keys.shape[1], N = keys.shape[2], D = keys.shape[3];
  std::vector<float> rows, norms, mean;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = valid_length(valid_lengths, b, N);
    for (int64_t h = 0; h < H; ++h) {
      load_rows(keys, b, h, N - n, N, rows);
      unit_key_mean(rows, n, D, norms, mean);
      out.ptr<float>()[b * H + h] = online_redundancy(mean, n);
    }
  }
}

void score(const Tensor& q_window, const Tensor& keys, const Tensor& values, const Tensor& valid_lengths,
           const Tensor& redundancy, const ScoreOptions& o, const Tensor& scores, const Tensor& importance,
           const Tensor& redundancy_out) {
  check_score_args(q_window, keys, values, valid_lengths, redundancy, o, scores, importance, redundancy_out);
  require(!keys.is_cuda(), "score: the CPU path needs CPU tensors");
  const int64_t B = keys.shape[0], Hkv = keys.shape[1], N = keys.shape[2], D = keys.shape[3];
  const int64_t Hq = q_window.shape[1], W = q_window.shape[2], G = Hq / Hkv, P = N - W;
  const float scale = o.scale > 0.0f ? o.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t half = o.kernel_size / 2;

  std::vector<float> krows, vrows, qrow, logits, norms, mean, attn, colsum, pooled, extra, div;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = valid_length(valid_lengths, b, N);
    const int64_t s0 = N - n;                       // first valid position
    const int64_t np = std::max<int64_t>(0, P - s0);  // valid prefix tokens
    for (int64_t h = 0; h < Hkv; ++h) {
      float* out_s = scores.ptr<float>() + (b * Hkv + h) * P;
      float* out_a = importance.present ? importance.ptr<float>() + (b * Hkv + h) * P : nullptr;
      load_rows(keys, b, h, s0, N, krows);  // row t is position s0 + t
      unit_key_mean(krows, n, D, norms, mean);
      float r = online_redundancy(mean, n);
      if (redundancy.present) {
        const int64_t rb = redundancy.shape[0] == 1 ? 0 : b;
        r = redundancy.ptr<const float>()[rb * redundancy.stride[0] + h * redundancy.stride[1]];
      }
      if (redundancy_out.present)  // only mixkv uses an r
        redundancy_out.ptr<float>()[b * Hkv + h] = o.method == Method::mixkv ? r : std::nanf("");
      for (int64_t j = 0; j < s0 && j < P; ++j) {
        out_s[j] = kNegInf;
        if (out_a) out_a[j] = kNegInf;
      }
      if (np == 0) continue;

      // 1. Window attention, averaged over the window rows, reduced over the query group.
      attn.assign(static_cast<std::size_t>(np), o.gqa == GqaReduce::max ? kNegInf : 0.0f);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t qh = h * G + g;
        colsum.assign(static_cast<std::size_t>(np), 0.0f);
        for (int64_t i = 0; i < W; ++i) {
          qrow.resize(static_cast<std::size_t>(D));
          const int64_t qbase = b * q_window.stride[0] + qh * q_window.stride[1] + i * q_window.stride[2];
          for (int64_t d = 0; d < D; ++d) qrow[d] = load_as_float(q_window.data, q_window.dtype, qbase + d);
          const int64_t seen = P + i + 1 - s0;  // keys s0 .. P + i
          logits.resize(static_cast<std::size_t>(seen));
          float mx = kNegInf;
          for (int64_t t = 0; t < seen; ++t) {
            logits[t] = scale * dot(qrow.data(), krows.data() + t * D, D);
            mx = std::max(mx, logits[t]);
          }
          double sum = 0.0;
          for (int64_t t = 0; t < seen; ++t) sum += std::exp(logits[t] - mx);
          const float total = static_cast<float>(sum);
          for (int64_t t = 0; t < np; ++t) colsum[t] += std::exp(logits[t] - mx) / total;
        }
        for (int64_t t = 0; t < np; ++t) {
          const float a = colsum[t] / static_cast<float>(W);
          attn[t] = o.gqa == GqaReduce::max ? std::max(attn[t], a) : attn[t] + a;
        }
      }
      if (o.gqa == GqaReduce::mean)
        for (float& a : attn) a /= static_cast<float>(G);

      // Pooling over the valid prefix only (zero padding counted for avg, ignored for max).
      pooled.resize(static_cast<std::size_t>(np));
      for (int64_t t = 0; t < np; ++t) {
        const int64_t lo = std::max<int64_t>(0, t - half), hi = std::min<int64_t>(np - 1, t + half);
        if (o.pooling == Pooling::avg) {
          float acc = 0.0f;
          for (int64_t u = lo; u <= hi; ++u) acc += attn[u];
          pooled[t] = acc / static_cast<float>(o.kernel_size);
        } else {
          float acc = kNegInf;
          for (int64_t u = lo; u <= hi; ++u) acc = std::max(acc, attn[u]);
          pooled[t] = acc;
        }
      }
      double asum = 0.0;
      for (float a : pooled) asum += a;
      const float mean_a = static_cast<float>(asum / static_cast<double>(np));
      if (out_a)
        for (int64_t t = 0; t < np; ++t) out_a[s0 + t] = pooled[t];

      // 2./3. Value or key norms and key diversity, each normalised and aligned to A.
      if (needs_values(o.method) || o.method == Method::knorm) {
        extra.resize(static_cast<std::size_t>(np));
        if (o.method == Method::knorm) {
          for (int64_t t = 0; t < np; ++t) extra[t] = -norms[t];
        } else {
          load_rows(values, b, h, s0, P, vrows);
          for (int64_t t = 0; t < np; ++t) {
            const float* vr = vrows.data() + t * D;
            extra[t] = std::sqrt(dot(vr, vr, D));
          }
        }
        normalise_align(extra, mean_a);
      }
      if (needs_diversity(o.method)) {
        div.resize(static_cast<std::size_t>(np));
        for (int64_t t = 0; t < np; ++t)
          div[t] = -(dot(krows.data() + t * D, mean.data(), D) / std::max(norms[t], 1e-12f));
        normalise_align(div, mean_a);
      }

      // 5. Mixing.
      for (int64_t t = 0; t < np; ++t) {
        const float a = pooled[t];
        float s = a;
        switch (o.method) {
          case Method::attn: s = a; break;
          case Method::keydiff: s = div[t]; break;
          case Method::vnorm: s = a + extra[t]; break;
          case Method::knorm: s = a + extra[t]; break;
          case Method::uniform_mix: s = (a + div[t] + extra[t]) / 3.0f; break;
          case Method::mixkv: s = r * div[t] + (1.0f - r) * (a + extra[t]); break;
        }
        out_s[s0 + t] = s;
      }
    }
  }
}

}  // namespace cpu

}  // namespace mixkv
