// The decode step entry: checks both ops' arguments up front, then runs store_append and attend.
#include "mixkv/decode.hpp"

#include <cmath>
#include <cstddef>
#include <utility>

#include "mixkv/attend.hpp"
#include "mixkv/error.hpp"
#include "mixkv/store.hpp"

namespace mixkv {

void store_append_attend(const Tensor& k_new, const Tensor& v_new, const Tensor& q, const Tensor& offsets,
                         const Tensor& lengths, const Tensor& k_buf, const Tensor& v_buf, int64_t max_length,
                         float scale, const Tensor& out, const Tensor& workspace, std::uintptr_t stream,
                         int64_t total_length) {
  // What attend would refuse independently of the stored values, checked before the append writes.
  check_tensor(k_new, "k_new", 4);
  check_tensor(q, "q", 4);
  check_float(q, "q");
  check_last_dim_contiguous(q, "q");
  const int64_t B = q.shape[0], Hq = q.shape[1], T = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k_new.shape[1];
  require(k_new.dtype == q.dtype, "k_new must have the dtype of q (", dtype_name(q.dtype), "), got ",
          dtype_name(k_new.dtype));
  require(k_new.shape[0] == B && k_new.shape[2] == T && k_new.shape[3] == D, "q must have shape [",
          k_new.shape[0], ", Hq, ", k_new.shape[2], ", ", k_new.shape[3], "] (the batch, tokens and head_dim of k_new), got [",
          B, ", ", Hq, ", ", T, ", ", D, "]");
  require(Hkv > 0 && Hq % Hkv == 0, "q has ", Hq, " heads, which is not a multiple of the ", Hkv, " kv heads");
  check_same_device(q, "q", k_new, "k_new");
  check_tensor(out, "out", 4);
  require(out.dtype == q.dtype, "out must have the dtype of q (", dtype_name(q.dtype), "), got ",
          dtype_name(out.dtype));
  require(out.shape[0] == B && out.shape[1] == T && out.shape[2] == Hq && out.shape[3] == D,
          "out must have shape [B, T, Hq, D] = [", B, ", ", T, ", ", Hq, ", ", D, "]");
  check_last_dim_contiguous(out, "out");
  check_same_device(out, "out", q, "q");
  require(max_length >= 0, "max_length must be >= 0, got ", max_length);
  require(std::isfinite(scale), "scale must be finite, got ", scale);
  check_attend_workspace(workspace, q, max_length);
  // The append checks the rest of its arguments (k_buf, v_buf, offsets, lengths) before it writes.
  store_append(k_new, v_new, offsets, lengths, k_buf, v_buf, stream);
  Tensor out_bhtd = out;  // attend's [B, Hq, T, D] view of the same memory
  std::swap(out_bhtd.shape[1], out_bhtd.shape[2]);
  std::swap(out_bhtd.stride[1], out_bhtd.stride[2]);
  attend(q, k_buf, v_buf, offsets, lengths, max_length, scale, out_bhtd, workspace, stream, total_length);
}

}  // namespace mixkv
