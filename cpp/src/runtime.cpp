#include "mixkv/runtime.hpp"

namespace mixkv {
#ifdef MIXKV_WITH_CUDA
bool cuda_device_present();  // cuda/runtime.cu
bool cuda_compiled() { return true; }
bool cuda_available() { return cuda_device_present(); }
#else
bool cuda_compiled() { return false; }
bool cuda_available() { return false; }
#endif
}  // namespace mixkv
