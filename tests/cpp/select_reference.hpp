// Brute-force top-c selection shared by the C++ tests of select and capacities_select.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace mixkv_test {

// Position j of a row of P scores is kept iff it is above -inf and fewer than c entries beat it (a
// higher score, or an equal one at a lower position): the kept positions ascending, then -1 up to
// C entries; `count` receives how many were kept.
inline std::vector<int32_t> brute_force_select(const float* s, int64_t P, int64_t c, int64_t C, int32_t& count) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<int32_t> out(static_cast<std::size_t>(C), -1);
  count = 0;
  for (int64_t j = 0; j < P; ++j) {
    if (s[j] == neg_inf) continue;
    int64_t beaten_by = 0;
    for (int64_t i = 0; i < P; ++i)
      if (s[i] > s[j] || (s[i] == s[j] && i < j)) ++beaten_by;
    if (beaten_by < c) out[static_cast<std::size_t>(count++)] = static_cast<int32_t>(j);
  }
  return out;
}

}  // namespace mixkv_test
