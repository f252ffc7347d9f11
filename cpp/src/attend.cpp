// Decode attention over the varlen store: validation, dispatch and the CPU twin.
#include "mixkv/attend.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mixkv/dispatch.hpp"
#include "mixkv/error.hpp"
#include "mixkv/half.hpp"

namespace mixkv {

namespace {

constexpr int64_t kMaxSplits = 512;       // the CUDA combine kernel merges at most this many splits
constexpr int64_t kMaxPartials = 16384;   // bound of rows * splits: the workspace stays a few MB
constexpr int64_t kSplitGranule = 64;

int64_t num_splits(int64_t rows, int64_t max_length) {
  if (max_length <= 0) return 1;
  const int64_t chunk = attend_split_tokens(rows, max_length);
  return (max_length + chunk - 1) / chunk;
}

void check_index_vector(const Tensor& t, const char* name, int64_t n) {
  check_tensor(t, name, 1);
  check_dtype(t, name, DType::i32);
  check_contiguous(t, name);
  require(t.shape[0] == n, name, " must have shape [", n, "], got [", t.shape[0], "]");
}

}  // namespace

int64_t attend_split_tokens(int64_t rows, int64_t max_length) {
  const int64_t cap = std::clamp<int64_t>(kMaxPartials / std::max<int64_t>(rows, 1), 1, kMaxSplits);
  const int64_t want = (std::max<int64_t>(max_length, 1) + cap - 1) / cap;
  return std::max<int64_t>(kSplitGranule, (want + kSplitGranule - 1) / kSplitGranule * kSplitGranule);
}

std::size_t attend_workspace_bytes(int64_t B, int64_t Hq, int64_t T, int64_t D, int64_t max_length) {
  require(B >= 0 && Hq >= 0 && T >= 0 && D >= 0 && max_length >= 0,
          "attend_workspace_bytes: sizes must be non-negative");
  const int64_t splits = num_splits(B * Hq * T, max_length);
  if (splits <= 1) return 0;
  return static_cast<std::size_t>(B * Hq * T * splits * (D + 2)) * sizeof(float);
}

void check_attend_workspace(const Tensor& workspace, const Tensor& q, int64_t max_length) {
  const std::size_t need = attend_workspace_bytes(q.shape[0], q.shape[1], q.shape[2], q.shape[3], max_length);
  if (need == 0 || !q.is_cuda()) return;
  require(workspace.present, "workspace is required: ", need, " bytes");
  check_tensor(workspace, "workspace", 1);
  check_dtype(workspace, "workspace", DType::u8);
  check_contiguous(workspace, "workspace");
  require(static_cast<std::size_t>(workspace.shape[0]) >= need, "workspace must hold at least ", need, " bytes, got ",
          workspace.shape[0]);
  check_same_device(workspace, "workspace", q, "q");
}

void attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
            const Tensor& lengths, int64_t max_length, float scale, const Tensor& out,
            const Tensor& workspace, std::uintptr_t stream, int64_t total_length) {
  check_tensor(q, "q", 4);
  check_float(q, "q");
  check_last_dim_contiguous(q, "q");
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[3];
  check_tensor(offsets, "offsets", 1);
  const int64_t S = offsets.shape[0];
  require(B > 0 && S % B == 0 && S > 0, "offsets must have B * Hkv entries (B = ", B, "), got ", S);
  const int64_t Hkv = S / B;
  require(Hq % Hkv == 0, "q has ", Hq, " heads, which is not a multiple of the ", Hkv, " kv heads");
  check_index_vector(offsets, "offsets", S);
  check_index_vector(lengths, "lengths", S);
  for (const auto* p : {&k_buf, &v_buf}) {
    const char* name = p == &k_buf ? "k_buf" : "v_buf";
    check_tensor(*p, name, 2);
    require(p->dtype == q.dtype, name, " must have the dtype of q (", dtype_name(q.dtype), "), got ",
            dtype_name(p->dtype));
    check_contiguous(*p, name);
    require(p->shape[1] == D, name, " must have shape [slots, ", D, "], got [", p->shape[0], ", ", p->shape[1], "]");
    check_same_device(*p, name, q, "q");
  }
  require(k_buf.shape[0] == v_buf.shape[0], "v_buf must have the shape of k_buf");
  check_tensor(out, "out", 4);
  require(out.dtype == q.dtype, "out must have the dtype of q (", dtype_name(q.dtype), "), got ",
          dtype_name(out.dtype));
  for (int i = 0; i < 4; ++i) require(out.shape[i] == q.shape[i], "out must have the shape of q");
  check_last_dim_contiguous(out, "out");
  check_same_device(out, "out", q, "q");
  check_same_device(offsets, "offsets", q, "q");
  check_same_device(lengths, "lengths", q, "q");
  require(max_length >= 0, "max_length must be >= 0, got ", max_length);
  require(std::isfinite(scale), "scale must be finite, got ", scale);
  check_attend_workspace(workspace, q, max_length);
  if (q.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    cuda::attend(q, k_buf, v_buf, offsets, lengths, max_length, scale, out, workspace, stream, total_length);
#else
    (void)stream;
    (void)total_length;
    no_cuda("attend");
#endif
    return;
  }
  const int32_t* off = offsets.ptr<int32_t>();
  const int32_t* len = lengths.ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    require(len[s] >= 0 && len[s] <= max_length, "lengths[", s, "] = ", len[s], " must lie in [0, max_length = ",
            max_length, "]");
    require(off[s] >= 0 && off[s] + len[s] <= k_buf.shape[0], "segment ", s, " (offset ", off[s], ", length ",
            len[s], ") lies outside k_buf's ", k_buf.shape[0], " slots");
  }
  cpu::attend(q, k_buf, v_buf, offsets, lengths, scale, out);
}

void cpu::attend(const Tensor& q, const Tensor& k_buf, const Tensor& v_buf, const Tensor& offsets,
                 const Tensor& lengths, float scale, const Tensor& out) {
  const int64_t B = q.shape[0], Hq = q.shape[1], T = q.shape[2], D = q.shape[3];
  const int64_t S = offsets.shape[0], Hkv = S / B, G = Hq / Hkv;
  const float sc = scale == 0.0f ? 1.0f / std::sqrt(static_cast<float>(D)) : scale;
  const int32_t* off = offsets.ptr<int32_t>();
  const int32_t* len = lengths.ptr<int32_t>();
  const DType dt = q.dtype;
  std::vector<float> qrow(D), scores;
  std::vector<double> acc(D);  // wider than the kernel's fp32: the twin serves as a reference
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t qh = 0; qh < Hq; ++qh) {
      const int64_t s = b * Hkv + qh / G;
      const int64_t L = len[s];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t visible = std::clamp<int64_t>(L - T + t + 1, 0, L);
        const int64_t qbase = b * q.stride[0] + qh * q.stride[1] + t * q.stride[2];
        const int64_t obase = b * out.stride[0] + qh * out.stride[1] + t * out.stride[2];
        for (int64_t d = 0; d < D; ++d) qrow[d] = load_as_float(q.data, dt, qbase + d);
        std::fill(acc.begin(), acc.end(), 0.0);
        scores.assign(static_cast<std::size_t>(visible), 0.0f);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < visible; ++j) {
          const int64_t kb = (off[s] + j) * k_buf.stride[0];
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qrow[d] * load_as_float(k_buf.data, dt, kb + d);
          scores[j] = dot * sc;
          mx = std::max(mx, scores[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < visible; ++j) {
          const double p = std::exp(static_cast<double>(scores[j] - mx));
          sum += p;
          const int64_t vb = (off[s] + j) * v_buf.stride[0];
          for (int64_t d = 0; d < D; ++d) acc[d] += p * load_as_float(v_buf.data, dt, vb + d);
        }
        const double inv = visible > 0 ? 1.0 / sum : 0.0;
        for (int64_t d = 0; d < D; ++d) store_from_float(out.data, dt, obase + d, static_cast<float>(acc[d] * inv));
      }
    }
  }
}

}  // namespace mixkv
