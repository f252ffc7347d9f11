// nanobind module mixkv._core: converts DLPack arrays to mixkv::Tensor views and forwards.
// No logic lives here; validation with user-facing names happens in python/mixkv and the core.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <stdexcept>

#include "mixkv/attend.hpp"
#include "mixkv/budget.hpp"
#include "mixkv/capacities_select.hpp"
#include "mixkv/decode.hpp"
#include "mixkv/runtime.hpp"
#include "mixkv/score.hpp"
#include "mixkv/select.hpp"
#include "mixkv/store.hpp"

namespace nb = nanobind;
using Array = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;
using OptArray = std::optional<nb::ndarray<nb::ro>>;
using OptOutArray = std::optional<nb::ndarray<>>;

namespace {

mixkv::DType to_dtype(nb::dlpack::dtype t) {
  using nb::dlpack::dtype_code;
  if (t.lanes == 1) {
    if (t.code == static_cast<uint8_t>(dtype_code::Float) && t.bits == 32) return mixkv::DType::f32;
    if (t.code == static_cast<uint8_t>(dtype_code::Float) && t.bits == 16) return mixkv::DType::f16;
    if (t.code == static_cast<uint8_t>(dtype_code::Bfloat) && t.bits == 16) return mixkv::DType::bf16;
    if (t.code == static_cast<uint8_t>(dtype_code::Int) && t.bits == 32) return mixkv::DType::i32;
    if (t.code == static_cast<uint8_t>(dtype_code::Int) && t.bits == 64) return mixkv::DType::i64;
    if (t.code == static_cast<uint8_t>(dtype_code::UInt) && t.bits == 8) return mixkv::DType::u8;
  }
  throw std::invalid_argument("unsupported tensor dtype");
}

template <typename A>
mixkv::Tensor view(const A& a) {
  mixkv::Tensor t;
  if (a.ndim() > static_cast<size_t>(mixkv::kMaxDims)) throw std::invalid_argument("too many dimensions");
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  t.dtype = to_dtype(a.dtype());
  if (a.device_type() == nb::device::cpu::value) {
    t.device = mixkv::DeviceType::cpu;
  } else if (a.device_type() == nb::device::cuda::value) {
    t.device = mixkv::DeviceType::cuda;
  } else {
    throw std::invalid_argument("tensors must live on the CPU or a CUDA device");
  }
  t.device_id = a.device_id();
  t.ndim = static_cast<int>(a.ndim());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = static_cast<int64_t>(a.shape(i));
    t.stride[i] = static_cast<int64_t>(a.stride(i));
  }
  t.present = true;
  return t;
}

template <typename A>
mixkv::Tensor view(const std::optional<A>& a) {
  return a ? view(*a) : mixkv::Tensor{};
}

mixkv::BudgetOptions budget_options(int policy, int64_t budget, int64_t window, int64_t layer_idx, int64_t num_layers,
                                    double beta, double floor, bool normalize, int64_t skip, double ratio) {
  mixkv::BudgetOptions o;
  o.policy = static_cast<mixkv::Policy>(policy);
  o.budget = budget;
  o.window = window;
  o.layer_idx = layer_idx;
  o.num_layers = num_layers;
  o.pyramid_beta = beta;
  o.ada_floor = floor;
  o.ada_normalize = normalize;
  o.ada_skip = skip;
  o.sparsemm_ratio = ratio;
  return o;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "mixkv core: scoring, budgets, selection, varlen KV store and decode attention";
  m.attr("__version__") = MIXKV_VERSION;
  m.def("cuda_compiled", &mixkv::cuda_compiled);
  m.def("cuda_available", &mixkv::cuda_available);

  // ---- score ----------------------------------------------------------------------------------
  m.def("score_workspace_bytes", &mixkv::score_workspace_bytes);
  m.def(
      "score",
      [](Array q, Array k, Array v, OptArray valid, OptArray redundancy, int method, int pooling,
         int kernel_size, int gqa, float scale, OutArray scores, OptOutArray importance,
         OptOutArray redundancy_out, OptOutArray workspace, std::uintptr_t stream) {
        mixkv::ScoreOptions o;
        o.method = static_cast<mixkv::Method>(method);
        o.pooling = static_cast<mixkv::Pooling>(pooling);
        o.kernel_size = kernel_size;
        o.gqa = static_cast<mixkv::GqaReduce>(gqa);
        o.scale = scale;
        mixkv::score(view(q), view(k), view(v), view(valid), view(redundancy), o, view(scores),
                     view(importance), view(redundancy_out), view(workspace), stream);
      },
      nb::arg("q_window"), nb::arg("keys"), nb::arg("values"), nb::arg("valid_lengths").none(),
      nb::arg("redundancy").none(), nb::arg("method"), nb::arg("pooling"), nb::arg("kernel_size"),
      nb::arg("gqa"), nb::arg("scale"), nb::arg("scores").noconvert(), nb::arg("importance").none().noconvert(),
      nb::arg("redundancy_out").none().noconvert(), nb::arg("workspace").none().noconvert(),
      nb::arg("stream"));
  m.def("head_redundancy_workspace_bytes", &mixkv::head_redundancy_workspace_bytes);
  m.def(
      "head_redundancy",
      [](Array k, OptArray valid, OutArray out, OptOutArray workspace, std::uintptr_t stream) {
        mixkv::head_redundancy(view(k), view(valid), view(out), view(workspace), stream);
      },
      nb::arg("keys"), nb::arg("valid_lengths").none(), nb::arg("out").noconvert(),
      nb::arg("workspace").none().noconvert(), nb::arg("stream"));

  // ---- budget ---------------------------------------------------------------------------------
  m.def("capacities_workspace_bytes", &mixkv::capacities_workspace_bytes);
  m.def(
      "capacities",
      [](int policy, int64_t budget, int64_t window, int64_t layer_idx, int64_t num_layers, double beta,
         double floor, bool normalize, int64_t skip, double ratio, Array importance, OptArray valid,
         OptArray head_scores, OutArray out, OptOutArray workspace, std::uintptr_t stream) {
        const mixkv::BudgetOptions o =
            budget_options(policy, budget, window, layer_idx, num_layers, beta, floor, normalize, skip, ratio);
        mixkv::capacities(o, view(importance), view(valid), view(head_scores), view(out), view(workspace),
                          stream);
      },
      nb::arg("policy"), nb::arg("budget"), nb::arg("window"), nb::arg("layer_idx"), nb::arg("num_layers"),
      nb::arg("pyramid_beta"), nb::arg("ada_floor"), nb::arg("ada_normalize"), nb::arg("ada_skip"),
      nb::arg("sparsemm_ratio"), nb::arg("importance"), nb::arg("valid_lengths").none(),
      nb::arg("head_scores").none(), nb::arg("out").noconvert(), nb::arg("workspace").none().noconvert(),
      nb::arg("stream"));

  m.def(
      "capacity_bound",
      [](int policy, int64_t budget, int64_t window, int64_t layer_idx, int64_t num_layers, double beta,
         double floor, bool normalize, int64_t skip, double ratio, int64_t H, int64_t P) {
        return mixkv::capacity_bound(
            budget_options(policy, budget, window, layer_idx, num_layers, beta, floor, normalize, skip, ratio), H, P);
      },
      nb::arg("policy"), nb::arg("budget"), nb::arg("window"), nb::arg("layer_idx"), nb::arg("num_layers"),
      nb::arg("pyramid_beta"), nb::arg("ada_floor"), nb::arg("ada_normalize"), nb::arg("ada_skip"),
      nb::arg("sparsemm_ratio"), nb::arg("H"), nb::arg("P"));
  m.def(
      "capacities_select_workspace_bytes",
      [](int policy, int64_t budget, int64_t window, int64_t layer_idx, int64_t num_layers, int64_t skip, int64_t B,
         int64_t H, int64_t P) {
        return mixkv::capacities_select_workspace_bytes(
            budget_options(policy, budget, window, layer_idx, num_layers, 20.0, 0.2, true, skip, 0.1), B, H, P);
      },
      nb::arg("policy"), nb::arg("budget"), nb::arg("window"), nb::arg("layer_idx"), nb::arg("num_layers"),
      nb::arg("ada_skip"), nb::arg("B"), nb::arg("H"), nb::arg("P"));
  m.def(
      "capacities_select",
      [](int policy, int64_t budget, int64_t window, int64_t layer_idx, int64_t num_layers, double beta,
         double floor, bool normalize, int64_t skip, double ratio, Array importance, Array scores, OptArray valid,
         OptArray head_scores, OutArray caps, OutArray positions, OutArray counts, OptOutArray workspace,
         std::uintptr_t stream) {
        const mixkv::BudgetOptions o =
            budget_options(policy, budget, window, layer_idx, num_layers, beta, floor, normalize, skip, ratio);
        mixkv::capacities_select(o, view(importance), view(scores), view(valid), view(head_scores), view(caps),
                                 view(positions), view(counts), view(workspace), stream);
      },
      nb::arg("policy"), nb::arg("budget"), nb::arg("window"), nb::arg("layer_idx"), nb::arg("num_layers"),
      nb::arg("pyramid_beta"), nb::arg("ada_floor"), nb::arg("ada_normalize"), nb::arg("ada_skip"),
      nb::arg("sparsemm_ratio"), nb::arg("importance"), nb::arg("scores"), nb::arg("valid_lengths").none(),
      nb::arg("head_scores").none(), nb::arg("capacities").noconvert(), nb::arg("positions").noconvert(),
      nb::arg("counts").noconvert(), nb::arg("workspace").none().noconvert(), nb::arg("stream"));

  // ---- select ---------------------------------------------------------------------------------
  m.def("select_workspace_bytes", &mixkv::select_workspace_bytes);
  m.def(
      "select",
      [](Array scores, Array caps, OutArray positions, OutArray counts, OptOutArray workspace,
         std::uintptr_t stream) {
        mixkv::select(view(scores), view(caps), view(positions), view(counts), view(workspace), stream);
      },
      nb::arg("scores"), nb::arg("capacities"), nb::arg("positions").noconvert(), nb::arg("counts").noconvert(),
      nb::arg("workspace").none().noconvert(), nb::arg("stream"));

  // ---- store ----------------------------------------------------------------------------------
  m.def(
      "store_build",
      [](Array k, Array v, Array positions, Array counts, OptArray valid, int64_t window, Array offsets,
         OutArray k_buf, OutArray v_buf, OutArray lengths, std::uintptr_t stream) {
        mixkv::store_build(view(k), view(v), view(positions), view(counts), view(valid), window, view(offsets),
                           view(k_buf), view(v_buf), view(lengths), stream);
      },
      nb::arg("keys"), nb::arg("values"), nb::arg("positions"), nb::arg("counts"),
      nb::arg("valid_lengths").none(), nb::arg("window"), nb::arg("offsets"), nb::arg("k_buf").noconvert(),
      nb::arg("v_buf").noconvert(), nb::arg("lengths").noconvert(), nb::arg("stream"));
  m.def(
      "store_append",
      [](Array k, Array v, Array offsets, OutArray lengths, OutArray k_buf, OutArray v_buf,
         std::uintptr_t stream) {
        mixkv::store_append(view(k), view(v), view(offsets), view(lengths), view(k_buf), view(v_buf), stream);
      },
      nb::arg("k_new"), nb::arg("v_new"), nb::arg("offsets"), nb::arg("lengths").noconvert(),
      nb::arg("k_buf").noconvert(), nb::arg("v_buf").noconvert(), nb::arg("stream"));
  m.def(
      "store_copy_segments",
      [](Array src_k, Array src_v, Array src_offsets, Array src_lengths, Array src_index, Array dst_offsets,
         OutArray dst_k, OutArray dst_v, OutArray dst_lengths, std::uintptr_t stream) {
        mixkv::store_copy_segments(view(src_k), view(src_v), view(src_offsets), view(src_lengths),
                                   view(src_index), view(dst_offsets), view(dst_k), view(dst_v),
                                   view(dst_lengths), stream);
      },
      nb::arg("src_k"), nb::arg("src_v"), nb::arg("src_offsets"), nb::arg("src_lengths"), nb::arg("src_index"),
      nb::arg("dst_offsets"), nb::arg("dst_k").noconvert(), nb::arg("dst_v").noconvert(),
      nb::arg("dst_lengths").noconvert(), nb::arg("stream"));

  // ---- attend ---------------------------------------------------------------------------------
  m.def("attend_workspace_bytes", &mixkv::attend_workspace_bytes);
  m.def(
      "attend",
      [](Array q, Array k_buf, Array v_buf, Array offsets, Array lengths, int64_t max_length, float scale,
         OutArray out, OptOutArray workspace, std::uintptr_t stream, int64_t total_length) {
        mixkv::attend(view(q), view(k_buf), view(v_buf), view(offsets), view(lengths), max_length, scale,
                      view(out), view(workspace), stream, total_length);
      },
      nb::arg("q"), nb::arg("k_buf"), nb::arg("v_buf"), nb::arg("offsets"), nb::arg("lengths"),
      nb::arg("max_length"), nb::arg("scale"), nb::arg("out").noconvert(), nb::arg("workspace").none().noconvert(),
      nb::arg("stream"), nb::arg("total_length") = -1);
  m.def(
      "store_append_attend",
      [](Array k, Array v, Array q, Array offsets, OutArray lengths, OutArray k_buf, OutArray v_buf,
         int64_t max_length, float scale, OutArray out, OptOutArray workspace, std::uintptr_t stream,
         int64_t total_length) {
        mixkv::store_append_attend(view(k), view(v), view(q), view(offsets), view(lengths), view(k_buf), view(v_buf),
                                   max_length, scale, view(out), view(workspace), stream, total_length);
      },
      nb::arg("k_new"), nb::arg("v_new"), nb::arg("q"), nb::arg("offsets"), nb::arg("lengths").noconvert(),
      nb::arg("k_buf").noconvert(), nb::arg("v_buf").noconvert(), nb::arg("max_length"), nb::arg("scale"),
      nb::arg("out").noconvert(), nb::arg("workspace").none().noconvert(), nb::arg("stream"),
      nb::arg("total_length") = -1);
}
