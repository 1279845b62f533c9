// Declarations of the transport ops: framework-free, raw pointers, sizes, dtype codes and a stream.
// Data is contiguous, shaped (rows, row_size); t holds one time per row in the compute type
// (double for kFloat64 data, float otherwise), read at t[row * t_stride] (t_stride 0 = one shared time).
// Each returns 0 on success, a ucgm::Status or (CUDA) a cudaError_t value otherwise.
#pragma once

#include <cstdint>

#include "common.h"

UCGM_NAMESPACE_BEGIN

// (out1, out2) = mix_matrix(transport, mode, t[row]) applied to (u, v) elementwise: interpolate,
// decode and their adjoints (transport.h, MixMode).
int mix_cpu(int dtype, const void* u, const void* v, const void* t, int64_t t_stride, void* out1,
            void* out2, int64_t rows, int64_t row_size, int transport, int mode);

// alpha_in, gamma_in, alpha_to, gamma_to of n times, all in dtype (computed in float or double).
int coefficients_cpu(int dtype, const void* t, int64_t n, int transport, void* alpha_in, void* gamma_in,
                     void* alpha_to, void* gamma_to);

#ifdef UCGM_WITH_CUDA
int mix_cuda(int dtype, const void* u, const void* v, const void* t, int64_t t_stride, void* out1,
             void* out2, int64_t rows, int64_t row_size, int transport, int mode, void* stream);
int coefficients_cuda(int dtype, const void* t, int64_t n, int transport, void* alpha_in, void* gamma_in,
                      void* alpha_to, void* gamma_to, void* stream);
#endif

UCGM_NAMESPACE_END
