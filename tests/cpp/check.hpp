// Assertions, tensor views and random fills shared by the C++ tests (each test is its own program).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "mixkv/half.hpp"
#include "mixkv/tensor.hpp"

namespace mixkv_test {

inline int g_failures = 0;

// Counts and reports a failed check; the program keeps going so that one run shows every failure.
inline void record(bool ok, const char* expr, const char* file, int line) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", file, line, expr);
  }
}

// Prints the outcome and returns the exit status for main().
inline int finish(const char* name) {
  if (g_failures) {
    std::fprintf(stderr, "%s: %d failures\n", name, g_failures);
    return 1;
  }
  std::printf("%s: ok\n", name);
  return 0;
}

// Contiguous row-major view of caller-owned storage.
inline mixkv::Tensor view(void* data, mixkv::DType dt, const std::vector<int64_t>& shape) {
  mixkv::Tensor t;
  t.data = data;
  t.dtype = dt;
  t.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[static_cast<std::size_t>(i)];
    t.stride[i] = stride;
    stride *= t.shape[i];
  }
  t.present = true;
  return t;
}

template <typename T>
mixkv::Tensor view(std::vector<T>& v, mixkv::DType dt, const std::vector<int64_t>& shape) {
  return view(static_cast<void*>(v.data()), dt, shape);
}

// True iff f throws std::invalid_argument (whose message names `name`, when given).
template <typename F>
bool throws_invalid(F&& f, const char* name = nullptr) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return name == nullptr || std::strstr(e.what(), name) != nullptr;
  }
  return false;
}

// Draws every element of v from dist, in order.
template <typename Dist>
void fill(std::vector<float>& v, Dist& dist, std::mt19937& rng) {
  for (auto& x : v) x = dist(rng);
}

// Rounds every value to bf16 in place and stores the bf16 bits in `bits` (resized to match).
inline void round_to_bf16(std::vector<float>& values, std::vector<uint16_t>& bits) {
  bits.resize(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    bits[i] = mixkv::float_to_bf16(values[i]);
    values[i] = mixkv::bf16_to_float(bits[i]);
  }
}

}  // namespace mixkv_test

#define CHECK(cond) ::mixkv_test::record(static_cast<bool>(cond), #cond, __FILE__, __LINE__)
