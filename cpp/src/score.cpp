// placeholder, replaced by the implementation
#include "mixkv/score.hpp"
#include "mixkv/error.hpp"
namespace mixkv {
std::size_t score_workspace_bytes(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) { return 0; }
void score(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const ScoreOptions&,
           const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::uintptr_t) { fail("score: not built yet"); }
std::size_t head_redundancy_workspace_bytes(int64_t, int64_t, int64_t, int64_t) { return 0; }
void head_redundancy(const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::uintptr_t) { fail("not built yet"); }
}
