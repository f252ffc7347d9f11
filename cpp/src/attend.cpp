// placeholder, replaced by the implementation
#include "mixkv/attend.hpp"
#include "mixkv/error.hpp"
namespace mixkv {
std::size_t attend_workspace_bytes(int64_t, int64_t, int64_t, int64_t, int64_t) { return 0; }
void attend(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, float, const Tensor&, const Tensor&, std::uintptr_t) { fail("not built yet"); }
}
