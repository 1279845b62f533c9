// Declarations of the training-objective ops: framework-free, raw pointers, sizes, dtype codes and a
// stream. Data is contiguous, shaped (rows, row_size); t holds one time per row in the compute type
// (double for kFloat64 data, float otherwise), read at t[row * t_stride].
//
// Two dtypes: the data's (x, z) and the model's (its outputs F). They are equal, or the data is
// float32 and the model float16/bfloat16 (a model under autocast); arithmetic is in the compute
// type of the data, and the targets are written in it (float32 accumulation for a 16-bit model).
// Each returns 0 on success, a ucgm::Status or (CUDA) a cudaError_t value otherwise.
#pragma once

#include <cstdint>

#include "common.h"

UCGM_NAMESPACE_BEGIN

// Enhanced target (objective.h, enhance_element). F_wo may be null: the "without" prediction is
// then the unmodified target (x, z), the lambda > 0 rule. The last `ndrop` rows are the label-dropped
// ones. emit_target = 0: out1, out2 = x_tar, z_tar in the data dtype; emit_target = 1: out1 =
// alpha_to(t) z_tar + gamma_to(t) x_tar in the compute type, out2 unused.
int enhance_target_cpu(int data_dtype, int model_dtype, const void* x, const void* z, const void* F_w,
                       const void* F_wo, const void* t, int64_t t_stride, void* out1, void* out2, int64_t rows,
                       int64_t row_size, int64_t ndrop, double ratio, double lo, double hi, int transport,
                       int emit_target);

// Model inputs of the finite-difference passes: x_out[j * rows + b] = alpha_in(r) z_b + gamma_in(r) x_b
// with r = fd_time(j or 1, t_b), j over the k = (lambda == 1 ? 2 : 1) passes; r_out holds those times
// (compute type), so a single model call over k * rows samples serves every pass.
int fd_inputs_cpu(int data_dtype, const void* x, const void* z, const void* t, int64_t t_stride, void* x_out,
                  void* r_out, int64_t rows, int64_t row_size, double lambda, double eps, int transport);

// Consistency target (objective.h, fd_target_element) in the compute type. F_a is the model at
// r_a (t + eps; for lambda < 1 the online F_t itself), F_b at r_b; x, z the enhanced targets.
int fd_target_cpu(int data_dtype, int model_dtype, const void* F_t, const void* F_a, const void* F_b,
                  const void* x, const void* z, const void* t, int64_t t_stride, void* target, int64_t rows,
                  int64_t row_size, double lambda, double eps, int transport);

// Loss = mean_b w_b (sqrt(mean((F - T)^2) + h^2) - h [+ mean_p (1 - cos_p)]) over data viewed as
// (rows, channels, positions). Writes the scalar (compute type) and per row sqrt(mean + h^2), kept
// for the backward. target_dtype is F's dtype, or float32 for a float16/bfloat16 F. The CUDA op
// needs a workspace of ucgm_loss_workspace_size(rows, positions) compute-type values (objective.h).
int ucgm_loss_cpu(int f_dtype, int target_dtype, const void* F, const void* target, const void* t,
                  int64_t t_stride, void* loss, void* row_root, int64_t rows, int64_t channels, int64_t positions,
                  double huber_eps, int cosine, int time_weighting);

// Gradients of that loss times grad_loss (a device scalar, compute type): grad_F in F's dtype,
// grad_target (may be null) in the target's dtype.
int ucgm_loss_backward_cpu(int f_dtype, int target_dtype, const void* grad_loss, const void* F,
                           const void* target, const void* t, int64_t t_stride, const void* row_root, void* grad_F,
                           void* grad_target, int64_t rows, int64_t channels, int64_t positions, int cosine,
                           int time_weighting);

#ifdef UCGM_WITH_CUDA
int enhance_target_cuda(int data_dtype, int model_dtype, const void* x, const void* z, const void* F_w,
                        const void* F_wo, const void* t, int64_t t_stride, void* out1, void* out2, int64_t rows,
                        int64_t row_size, int64_t ndrop, double ratio, double lo, double hi, int transport,
                        int emit_target, void* stream);
int fd_inputs_cuda(int data_dtype, const void* x, const void* z, const void* t, int64_t t_stride, void* x_out,
                   void* r_out, int64_t rows, int64_t row_size, double lambda, double eps, int transport,
                   void* stream);
int fd_target_cuda(int data_dtype, int model_dtype, const void* F_t, const void* F_a, const void* F_b,
                   const void* x, const void* z, const void* t, int64_t t_stride, void* target, int64_t rows,
                   int64_t row_size, double lambda, double eps, int transport, void* stream);
int ucgm_loss_cuda(int f_dtype, int target_dtype, const void* F, const void* target, const void* t,
                   int64_t t_stride, void* loss, void* row_root, void* workspace, int64_t rows, int64_t channels,
                   int64_t positions, double huber_eps, int cosine, int time_weighting, void* stream);
int ucgm_loss_backward_cuda(int f_dtype, int target_dtype, const void* grad_loss, const void* F,
                            const void* target, const void* t, int64_t t_stride, const void* row_root,
                            void* grad_F, void* grad_target, int64_t rows, int64_t channels, int64_t positions,
                            int cosine, int time_weighting, void* stream);
#endif

UCGM_NAMESPACE_END
