// Error reporting: invalid input raises std::invalid_argument (ValueError in Python);
// a failing runtime call raises std::runtime_error (RuntimeError in Python).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include "mixkv/tensor.hpp"

namespace mixkv {

template <typename... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

template <typename... Args>
inline void require(bool cond, const Args&... parts) {
  if (!cond) fail(parts...);
}

// Shape/dtype checks used by every entry point; `name` is the argument name users see.
void check_tensor(const Tensor& t, const char* name, int ndim);
void check_dtype(const Tensor& t, const char* name, DType want);
void check_float(const Tensor& t, const char* name);  // f32 / f16 / bf16
void check_same_device(const Tensor& a, const char* an, const Tensor& b, const char* bn);
void check_contiguous(const Tensor& t, const char* name);
void check_last_dim_contiguous(const Tensor& t, const char* name);

}  // namespace mixkv
