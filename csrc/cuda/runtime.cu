// Small CUDA runtime queries for the binding, kept here so bindings.cpp needs no CUDA headers.
#include <cuda_runtime.h>

#include "../ucgm/common.h"

namespace ucgm {

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace ucgm
