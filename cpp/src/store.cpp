// placeholder, replaced by the implementation
#include "mixkv/store.hpp"
#include "mixkv/error.hpp"
namespace mixkv {
void store_build(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::uintptr_t) { fail("not built yet"); }
void store_append(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::uintptr_t) { fail("not built yet"); }
void store_copy_segments(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::uintptr_t) { fail("not built yet"); }
}
