// Device dispatch helper shared by the operation entry points.
#pragma once

#include "mixkv/error.hpp"

namespace mixkv {

// Raised when a CUDA tensor reaches a build without kernels.
[[noreturn]] inline void no_cuda(const char* op) {
  fail(op, ": the tensors are on a CUDA device but this mixkv build has no CUDA kernels");
}

}  // namespace mixkv
