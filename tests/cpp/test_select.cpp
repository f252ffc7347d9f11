// CPU twin of select against a brute-force rank count.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "select_reference.hpp"
#include "mixkv/select.hpp"

namespace {

using mixkv_test::view;

const float kNegInf = -std::numeric_limits<float>::infinity();

void random_case(std::mt19937& rng, int64_t B, int64_t H, int64_t P, int extra) {
  std::uniform_int_distribution<int> small(0, 3);
  std::uniform_real_distribution<float> real(-5.f, 5.f);
  std::uniform_int_distribution<int64_t> cap(0, P);
  const bool ties = small(rng) < 2;
  std::vector<float> scores(static_cast<std::size_t>(B * H * P));
  for (auto& v : scores) {
    v = ties ? static_cast<float>(small(rng)) : real(rng);
    if (small(rng) == 0 && small(rng) == 0) v = kNegInf;
  }
  std::vector<int32_t> caps(static_cast<std::size_t>(B * H));
  int64_t max_cap = 0;
  for (auto& c : caps) {
    c = static_cast<int32_t>(cap(rng));
    if (c > max_cap) max_cap = c;
  }
  const int64_t C = max_cap + extra;
  std::vector<int32_t> pos(static_cast<std::size_t>(B * H * C), -7777), cnt(static_cast<std::size_t>(B * H), -7777);
  mixkv::cpu::select(view(scores.data(), mixkv::DType::f32, {B, H, P}), view(caps.data(), mixkv::DType::i32, {B, H}),
                     view(pos.data(), mixkv::DType::i32, {B, H, C}), view(cnt.data(), mixkv::DType::i32, {B, H}));
  for (int64_t r = 0; r < B * H; ++r) {
    int32_t count = 0;
    const std::vector<int32_t> want =
        mixkv_test::brute_force_select(scores.data() + r * P, P, caps[static_cast<std::size_t>(r)], C, count);
    CHECK(cnt[static_cast<std::size_t>(r)] == count);
    for (int64_t i = 0; i < C; ++i) CHECK(pos[static_cast<std::size_t>(r * C + i)] == want[static_cast<std::size_t>(i)]);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  for (int it = 0; it < 300; ++it) {
    std::uniform_int_distribution<int64_t> b(1, 3), h(1, 5), p(1, 90);
    random_case(rng, b(rng), h(rng), p(rng), it % 3);
  }
  random_case(rng, 1, 2, 1500, 0);

  // invalid capacities and shapes
  std::vector<float> s(10, 1.f);
  std::vector<int32_t> caps{11}, pos(11), cnt(1);
  auto call = [&](int64_t C) {
    mixkv::cpu::select(view(s.data(), mixkv::DType::f32, {1, 1, 10}), view(caps.data(), mixkv::DType::i32, {1, 1}),
                       view(pos.data(), mixkv::DType::i32, {1, 1, C}), view(cnt.data(), mixkv::DType::i32, {1, 1}));
  };
  CHECK(mixkv_test::throws_invalid([&] { call(11); }));  // capacity above P
  caps[0] = -1;
  CHECK(mixkv_test::throws_invalid([&] { call(11); }));
  caps[0] = 5;
  CHECK(mixkv_test::throws_invalid([&] { call(4); }));  // fewer columns than the capacity
  s[3] = std::nanf("");
  CHECK(mixkv_test::throws_invalid([&] { call(5); }));
  s[3] = 1.f;
  call(5);
  CHECK(cnt[0] == 5 && pos[0] == 0 && pos[4] == 4);

  return mixkv_test::finish("test_select");
}
