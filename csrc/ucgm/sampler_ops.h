// Declarations of the sampler ops: framework-free, raw pointers, element counts, dtype codes and a
// stream. Every tensor is contiguous with n elements. The state (x, x_prev, z_prev and every output)
// is float32 or float64 (state_dtype); the model output F may be any float dtype (model_dtype). All
// arithmetic is float64. sched points at one float64 schedule row {t, t', kappa, e} (sampler.h,
// SchedField); seed at one int64. Outputs passed as null are not written (x_hat and z_hat: both
// or neither).
// Each returns 0 on success, a ucgm::Status or (CUDA) a cudaError_t value otherwise.
#pragma once

#include <cstdint>

#include "common.h"

UCGM_NAMESPACE_BEGIN

// Fused step: decode, extrapolation (mode: sampler.h ExtrapolMode; updates x_prev / z_prev in
// place), stochastic mixing with Philox noise keyed by (seed, step), new state x_next; optionally
// the raw x_hat and the z_hat used.
int sampler_step_cpu(int state_dtype, int model_dtype, const void* F, const void* x, void* x_prev, void* z_prev,
                     const void* sched, const void* seed, int64_t n, int step, int transport, int mode,
                     void* x_next, void* x_hat, void* z_hat);

// Fused order-2 correction: out = x g1/g0 + (a1 - g1 a0/g0) (z_hat + z_pri)/2, z_pri decoded from
// (x_next, F) at t'.
int sampler_correct_cpu(int state_dtype, int model_dtype, const void* F, const void* x_next, const void* x,
                        const void* z_hat, const void* sched, int64_t n, int transport, void* out);

// The noise the step draws: n float32 normals (raw = 0) or n raw uint32 words (raw = 1) of the
// stream (seed, step) (philox.h).
int philox_cpu(const void* seed, int step, int64_t n, int raw, void* out);

#ifdef UCGM_WITH_CUDA
int sampler_step_cuda(int state_dtype, int model_dtype, const void* F, const void* x, void* x_prev, void* z_prev,
                      const void* sched, const void* seed, int64_t n, int step, int transport, int mode,
                      void* x_next, void* x_hat, void* z_hat, void* stream);
int sampler_correct_cuda(int state_dtype, int model_dtype, const void* F, const void* x_next, const void* x,
                         const void* z_hat, const void* sched, int64_t n, int transport, void* out, void* stream);
int philox_cuda(const void* seed, int step, int64_t n, int raw, void* out, void* stream);
#endif

UCGM_NAMESPACE_END
