#include "mixkv/error.hpp"

namespace mixkv {

void check_tensor(const Tensor& t, const char* name, int ndim) {
  require(t.present, name, " is required");
  require(t.ndim == ndim, name, " must have ", ndim, " dimensions, got ", t.ndim);
}

void check_dtype(const Tensor& t, const char* name, DType want) {
  require(t.dtype == want, name, " must be ", dtype_name(want), ", got ", dtype_name(t.dtype));
}

void check_float(const Tensor& t, const char* name) {
  require(t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16, name,
          " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype));
}

void check_same_device(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  require(a.device == b.device && (a.device == DeviceType::cpu || a.device_id == b.device_id), an,
          " and ", bn, " must be on the same device");
}

void check_contiguous(const Tensor& t, const char* name) {
  require(t.contiguous(), name, " must be contiguous");
}

void check_last_dim_contiguous(const Tensor& t, const char* name) {
  require(t.ndim == 0 || t.shape[t.ndim - 1] <= 1 || t.stride[t.ndim - 1] == 1, name,
          " must have a contiguous last dimension");
}

}  // namespace mixkv
