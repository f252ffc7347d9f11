// What the running machine offers: whether CUDA kernels were compiled and can run.
#pragma once

namespace mixkv {

bool cuda_compiled();
// True when kernels were compiled and a CUDA device with a usable driver is present.
bool cuda_available();

}  // namespace mixkv
