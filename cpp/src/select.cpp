// Top-c selection: argument checks, device dispatch and the CPU twin.
#include "mixkv/select.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mixkv/dispatch.hpp"
#include "mixkv/error.hpp"
#include "arg_checks.hpp"

namespace mixkv {

namespace detail {

void check_select_args(const Tensor& scores, const Tensor& capacities, const Tensor& positions,
                       const Tensor& counts) {
  check_tensor(scores, "scores", 3);
  check_dtype(scores, "scores", DType::f32);
  check_last_dim_contiguous(scores, "scores");
  check_tensor(capacities, "capacities", 2);
  check_dtype(capacities, "capacities", DType::i32);
  check_tensor(positions, "positions", 3);
  check_dtype(positions, "positions", DType::i32);
  check_last_dim_contiguous(positions, "positions");
  check_tensor(counts, "counts", 2);
  check_dtype(counts, "counts", DType::i32);
  const int64_t B = scores.shape[0], H = scores.shape[1];
  require(capacities.shape[0] == B && capacities.shape[1] == H, "capacities must have shape [", B, ", ", H,
          "] like scores' first two dimensions");
  require(positions.shape[0] == B && positions.shape[1] == H, "positions must have shape [", B, ", ", H,
          ", C]");
  require(counts.shape[0] == B && counts.shape[1] == H, "counts must have shape [", B, ", ", H, "]");
  require(scores.shape[2] <= std::numeric_limits<int32_t>::max(), "scores: P must fit in int32");
  check_same_device(scores, "scores", capacities, "capacities");
  check_same_device(scores, "scores", positions, "positions");
  check_same_device(scores, "scores", counts, "counts");
}

}  // namespace detail

std::size_t select_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }

void select(const Tensor& scores, const Tensor& capacities, const Tensor& positions, const Tensor& counts,
            const Tensor& workspace, std::uintptr_t stream) {
  detail::check_select_args(scores, capacities, positions, counts);
  if (scores.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    if (workspace.present) check_same_device(scores, "scores", workspace, "workspace");
    cuda::select(scores, capacities, positions, counts, workspace, stream);
#else
    (void)workspace;
    (void)stream;
    no_cuda("select");
#endif
    return;
  }
  cpu::select(scores, capacities, positions, counts);
}

namespace cpu {

void select(const Tensor& scores, const Tensor& capacities, const Tensor& positions, const Tensor& counts) {
  detail::check_select_args(scores, capacities, positions, counts);
  require(!scores.is_cuda(), "select: the CPU path needs CPU tensors");
  const int64_t B = scores.shape[0], H = scores.shape[1], P = scores.shape[2], C = positions.shape[2];
  const float* s = scores.ptr<float>();
  const int32_t* cap = capacities.ptr<int32_t>();
  int32_t* pos = positions.ptr<int32_t>();
  int32_t* cnt = counts.ptr<int32_t>();
  // Capacities first, so a bad value leaves the outputs untouched.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t c = cap[b * capacities.stride[0] + h * capacities.stride[1]];
      require(c >= 0 && c <= P, "capacities must lie in [0, ", P, "], got ", c, " at [", b, ", ", h, "]");
      require(c <= C, "positions has ", C, " columns but capacities[", b, ", ", h, "] = ", c);
    }
  std::vector<int32_t> idx;
  idx.reserve(static_cast<std::size_t>(P));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* row = s + b * scores.stride[0] + h * scores.stride[1];
      int32_t* out = pos + b * positions.stride[0] + h * positions.stride[1];
      const int64_t c = cap[b * capacities.stride[0] + h * capacities.stride[1]];
      idx.clear();
      for (int64_t j = 0; j < P; ++j) {
        const float v = row[j];
        require(!std::isnan(v), "scores contains NaN at [", b, ", ", h, ", ", j, "]");
        if (v != -std::numeric_limits<float>::infinity()) idx.push_back(static_cast<int32_t>(j));
      }
      const int64_t take = std::min<int64_t>(c, static_cast<int64_t>(idx.size()));
      if (take < static_cast<int64_t>(idx.size())) {
        // Higher score first; among equal scores the lower position first (a strict total order).
        auto better = [row](int32_t x, int32_t y) { return row[x] > row[y] || (row[x] == row[y] && x < y); };
        std::nth_element(idx.begin(), idx.begin() + take, idx.end(), better);
        idx.resize(static_cast<std::size_t>(take));
        std::sort(idx.begin(), idx.end());
      }
      for (int64_t i = 0; i < take; ++i) out[i] = idx[static_cast<std::size_t>(i)];
      for (int64_t i = take; i < C; ++i) out[i] = -1;
      cnt[b * counts.stride[0] + h * counts.stride[1]] = static_cast<int32_t>(take);
    }
  }
}

}  // namespace cpu
}  // namespace mixkv
