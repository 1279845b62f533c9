// CUDA kernels of the training-objective ops. Elementwise ops move V elements per thread when every
// pointer is aligned and V divides the row (so the V elements share one row and its constants); the
// loss is a two-launch deterministic reduction (per-chunk partials, then one block per batch).
// All math comes from ucgm/objective.h, shared with the CPU kernels the tests run.
#include "../ucgm/objective.h"
#include "../ucgm/objective_ops.h"
#include "launch.cuh"

namespace ucgm {
namespace {

constexpr int kBlock = 256;
constexpr int kVec = 4;

// Device counterpart of the CPU dispatch_pair: equal storage types, or float32 data with a
// float16/bfloat16 model.
template <typename F>
int dispatch_pair_cuda(int data_dtype, int model_dtype, F&& f) {
  if (data_dtype == model_dtype) return dispatch_dtype_cuda(data_dtype, [&](auto s, auto c) { return f(s, s, c); });
  if (data_dtype == kFloat32 && model_dtype == kFloat16) return f(float{}, __half{}, float{});
  if (data_dtype == kFloat32 && model_dtype == kBFloat16) return f(float{}, __nv_bfloat16{}, float{});
  return kBadArgument;
}

bool bad_transport(int transport) { return transport < 0 || transport >= kNumTransports; }

// ---- enhance_target -----------------------------------------------------------------------------

template <typename SD, typename SM, typename C, int V>
__global__ void enhance_kernel(const SD* __restrict__ x, const SD* __restrict__ z, const SM* __restrict__ fw,
                               const SM* __restrict__ fwo, const C* __restrict__ t, int64_t t_stride, void* out1,
                               void* out2, int64_t n, int64_t row_size, int64_t rows, int64_t ndrop, C ratio, C lo,
                               C hi, int transport, int emit) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += step) {
    const int64_t row = i / row_size;
    const EnhanceRow<C> r = enhance_row<C>(transport, row, rows, ndrop, t[row * t_stride], lo, hi);
    const Vec<SD, V> vx = vload<SD, V>(x, i), vz = vload<SD, V>(z, i);
    const Vec<SM, V> vw = vload<SM, V>(fw, i);
    Vec<SM, V> vwo;
    if (fwo) vwo = vload<SM, V>(fwo, i);
    Vec<SD, V> o1, o2;
    Vec<C, V> ot;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      C xt, zt;
      enhance_element<C>(r, r.rule, ratio, load<C>(vx.x[k]), load<C>(vz.x[k]), load<C>(vw.x[k]),
                         fwo ? load<C>(vwo.x[k]) : C(0), fwo != nullptr, xt, zt);
      ot.x[k] = r.k.alpha_to * zt + r.k.gamma_to * xt;
      o1.x[k] = store<SD>(xt);
      o2.x[k] = store<SD>(zt);
    }
    if (emit) {
#pragma unroll
      for (int k = 0; k < V; ++k) static_cast<C*>(out1)[i + k] = ot.x[k];
    } else {
      vstore<SD, V>(static_cast<SD*>(out1), i, o1);
      vstore<SD, V>(static_cast<SD*>(out2), i, o2);
    }
  }
}

// ---- fd_inputs / fd_target ----------------------------------------------------------------------

template <typename S, typename C, int V>
__global__ void fd_inputs_kernel(const S* __restrict__ x, const S* __restrict__ z, const C* __restrict__ t,
                                 int64_t t_stride, S* __restrict__ out, C* __restrict__ r_out, int64_t n,
                                 int64_t row_size, int passes, FdStep<C> fd, int transport) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n * passes; i += step) {
    const int64_t j = i / n, e = i - j * n, row = e / row_size;
    const C r = fd_time<C>(passes == 2 ? int(j) : 1, t[row * t_stride], fd);
    if (e == row * row_size) r_out[j * (n / row_size) + row] = r;
    const Coeffs<C> k = coefficients<C>(transport, r);
    const Vec<S, V> vx = vload<S, V>(x, e), vz = vload<S, V>(z, e);
    Vec<S, V> o;
#pragma unroll
    for (int q = 0; q < V; ++q) o.x[q] = store<S>(k.alpha_in * load<C>(vz.x[q]) + k.gamma_in * load<C>(vx.x[q]));
    vstore<S, V>(out, i, o);
  }
}

template <typename SD, typename SM, typename C, int V>
__global__ void fd_target_kernel(const SM* __restrict__ ft, const SM* __restrict__ fa, const SM* __restrict__ fb,
                                 const SD* __restrict__ x, const SD* __restrict__ z, const C* __restrict__ t,
                                 int64_t t_stride, C* __restrict__ out, int64_t n, int64_t row_size, FdStep<C> fd,
                                 int transport) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += step) {
    const FdRow<C> r = fd_row<C>(transport, t[(i / row_size) * t_stride], fd);
    const Vec<SM, V> a = vload<SM, V>(ft, i), b = vload<SM, V>(fa, i), c = vload<SM, V>(fb, i);
    const Vec<SD, V> vx = vload<SD, V>(x, i), vz = vload<SD, V>(z, i);
    Vec<C, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k)
      o.x[k] = fd_target_element<C>(r, load<C>(a.x[k]), load<C>(b.x[k]), load<C>(c.x[k]), load<C>(vx.x[k]),
                                     load<C>(vz.x[k]));
    vstore<C, V>(out, i, o);
  }
}

// ---- loss ---------------------------------------------------------------------------------------

template <typename C>
__device__ __forceinline__ C block_sum(C v, C* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : C(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // valid in thread 0
}

// Block (row, chunk): sum of (F - T)^2 and of 1 - cos over the chunk's positions, V consecutive
// positions per thread and access (V divides positions and the pointers are aligned for it).
template <typename SF, typename ST, typename C, int V>
__global__ void loss_partials_kernel(const SF* __restrict__ F, const ST* __restrict__ T, C* __restrict__ ws,
                                     int64_t rows, int64_t chunks, int64_t channels, int64_t positions, int cosine) {
  __shared__ C shared[32];
  // Block-stride over (row, chunk): a grid has at most 2^31 - 1 blocks. Every thread of a block runs
  // the same iterations, so the reductions' __syncthreads stay uniform.
  for (int64_t blk = blockIdx.x; blk < rows * chunks; blk += gridDim.x) {
    const int64_t row = blk / chunks, chunk = blk - row * chunks;
    const int64_t base = row * channels * positions;
    const int64_t p_end = (chunk + 1) * kLossChunkPositions < positions ? (chunk + 1) * kLossChunkPositions : positions;
    C sq = 0, cs = 0;
    for (int64_t p = chunk * kLossChunkPositions + int64_t(threadIdx.x) * V; p < p_end; p += int64_t(blockDim.x) * V) {
      C dot[V] = {}, ff[V] = {}, tt[V] = {};
      for (int64_t c = 0; c < channels; ++c) {
        const Vec<SF, V> a = vload<SF, V>(F, base + c * positions + p);
        const Vec<ST, V> y = vload<ST, V>(T, base + c * positions + p);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const C ak = load<C>(a.x[k]), yk = load<C>(y.x[k]);
          sq += (ak - yk) * (ak - yk);
          dot[k] += ak * yk;
          ff[k] += ak * ak;
          tt[k] += yk * yk;
        }
      }
      if (cosine) {
#pragma unroll
        for (int k = 0; k < V; ++k) cs += C(1) - cosine_of<C>(dot[k], ff[k], tt[k]);
      }
    }
    sq = block_sum(sq, shared);
    cs = block_sum(cs, shared);
    if (threadIdx.x == 0) {
      ws[blk * 2] = sq;
      ws[blk * 2 + 1] = cs;
    }
  }
}

template <typename C>
__global__ void loss_finalize_kernel(const C* __restrict__ ws, const C* __restrict__ t, int64_t t_stride,
                                     C* __restrict__ loss, C* __restrict__ root, int64_t rows, int64_t chunks,
                                     int64_t channels, int64_t positions, C h, int cosine, int time_weighting) {
  __shared__ C shared[32];
  C acc = 0;
  for (int64_t b = threadIdx.x; b < rows; b += blockDim.x) {
    C sq = 0, cs = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      sq += ws[(b * chunks + k) * 2];
      cs += ws[(b * chunks + k) * 2 + 1];
    }
    const C rt = usqrt(sq / C(channels * positions) + h * h);
    root[b] = rt;
    C lb = rt - h;
    if (cosine) lb += cs / C(positions);
    acc += lb * time_weight<C>(time_weighting != 0, t[b * t_stride]);
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *loss = rows > 0 ? acc / C(rows) : C(NAN);
}

// One thread per (row, V consecutive positions): the cosine statistics of those positions, then
// their gradients (V divides positions and the pointers are aligned for it).
template <typename SF, typename ST, typename C, int V>
__global__ void loss_backward_kernel(const C* __restrict__ grad, const SF* __restrict__ F, const ST* __restrict__ T,
                                     const C* __restrict__ t, int64_t t_stride, const C* __restrict__ root,
                                     SF* __restrict__ gF, ST* __restrict__ gT, int64_t rows, int64_t channels,
                                     int64_t positions, int cosine, int time_weighting) {
  const C g0 = *grad / C(rows);
  const int64_t n = channels * positions;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < rows * positions / V;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = q * V / positions, p = q * V - b * positions, base = b * n + p;
    const C g = g0 * time_weight<C>(time_weighting != 0, t[b * t_stride]);
    const C k = g / (C(n) * root[b]);
    CosGrad<C> cg[V];
#pragma unroll
    for (int j = 0; j < V; ++j) cg[j] = CosGrad<C>{0, 0, 0};
    if (cosine) {
      C dot[V] = {}, ff[V] = {}, tt[V] = {};
      for (int64_t c = 0; c < channels; ++c) {
        const Vec<SF, V> a = vload<SF, V>(F, base + c * positions);
        const Vec<ST, V> y = vload<ST, V>(T, base + c * positions);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const C aj = load<C>(a.x[j]), yj = load<C>(y.x[j]);
          dot[j] += aj * yj;
          ff[j] += aj * aj;
          tt[j] += yj * yj;
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) cg[j] = cosine_grad<C>(dot[j], ff[j], tt[j]);
    }
    const C kc = cosine ? g / C(positions) : C(0);
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t i = base + c * positions;
      const Vec<SF, V> a = vload<SF, V>(F, i);
      const Vec<ST, V> y = vload<ST, V>(T, i);
      Vec<SF, V> da;
      Vec<ST, V> dy;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const C aj = load<C>(a.x[j]), yj = load<C>(y.x[j]);
        da.x[j] = store<SF>(k * (aj - yj) - kc * (cg[j].a * yj - cg[j].b * aj));
        dy.x[j] = store<ST>(-k * (aj - yj) - kc * (cg[j].a * aj - cg[j].c * yj));
      }
      vstore<SF, V>(gF, i, da);
      if (gT) vstore<ST, V>(gT, i, dy);
    }
  }
}

}  // namespace

int enhance_target_cuda(int data_dtype, int model_dtype, const void* x, const void* z, const void* F_w,
                        const void* F_wo, const void* t, int64_t t_stride, void* out1, void* out2, int64_t rows,
                        int64_t row_size, int64_t ndrop, double ratio, double lo, double hi, int transport,
                        int emit_target, void* stream) {
  if (bad_transport(transport) || ndrop < 0 || ndrop > rows) return kBadArgument;
  const int64_t n = rows * row_size;
  if (n == 0) return kOk;
  return dispatch_pair_cuda(data_dtype, model_dtype, [&](auto sd, auto sm, auto c) {
    using SD = decltype(sd);
    using SM = decltype(sm);
    using C = decltype(c);
    const auto st = static_cast<cudaStream_t>(stream);
    const bool vec = row_size % kVec == 0 && vec_aligned<SD, kVec>(x) && vec_aligned<SD, kVec>(z) &&
                     vec_aligned<SM, kVec>(F_w) && vec_aligned<SM, kVec>(F_wo) &&
                     (emit_target ? true : vec_aligned<SD, kVec>(out1) && vec_aligned<SD, kVec>(out2));
    auto launch = [&](auto kernel, int width) {
      kernel<<<grid_size(n / width, kBlock), kBlock, 0, st>>>(
          static_cast<const SD*>(x), static_cast<const SD*>(z), static_cast<const SM*>(F_w),
          static_cast<const SM*>(F_wo), static_cast<const C*>(t), t_stride, out1, out2, n, row_size, rows, ndrop,
          C(ratio), C(lo), C(hi), transport, emit_target);
    };
    if (vec) launch(enhance_kernel<SD, SM, C, kVec>, kVec); else launch(enhance_kernel<SD, SM, C, 1>, 1);
    return launch_status();
  });
}

int fd_inputs_cuda(int data_dtype, const void* x, const void* z, const void* t, int64_t t_stride, void* x_out,
                   void* r_out, int64_t rows, int64_t row_size, double lambda, double eps, int transport,
                   void* stream) {
  if (bad_transport(transport)) return kBadArgument;
  const int64_t n = rows * row_size;
  if (n == 0) return kOk;
  return dispatch_dtype_cuda(data_dtype, [&](auto s, auto c) {
    using S = decltype(s);
    using C = decltype(c);
    const FdStep<C> fd = fd_step<C>(lambda, eps);
    const int passes = fd.central ? 2 : 1;
    const auto st = static_cast<cudaStream_t>(stream);
    const bool vec =
        row_size % kVec == 0 && vec_aligned<S, kVec>(x) && vec_aligned<S, kVec>(z) && vec_aligned<S, kVec>(x_out);
    auto launch = [&](auto kernel, int width) {
      kernel<<<grid_size(n * passes / width, kBlock), kBlock, 0, st>>>(
          static_cast<const S*>(x), static_cast<const S*>(z), static_cast<const C*>(t), t_stride,
          static_cast<S*>(x_out), static_cast<C*>(r_out), n, row_size, passes, fd, transport);
    };
    if (vec) launch(fd_inputs_kernel<S, C, kVec>, kVec); else launch(fd_inputs_kernel<S, C, 1>, 1);
    return launch_status();
  });
}

int fd_target_cuda(int data_dtype, int model_dtype, const void* F_t, const void* F_a, const void* F_b,
                   const void* x, const void* z, const void* t, int64_t t_stride, void* target, int64_t rows,
                   int64_t row_size, double lambda, double eps, int transport, void* stream) {
  if (bad_transport(transport)) return kBadArgument;
  const int64_t n = rows * row_size;
  if (n == 0) return kOk;
  return dispatch_pair_cuda(data_dtype, model_dtype, [&](auto sd, auto sm, auto c) {
    using SD = decltype(sd);
    using SM = decltype(sm);
    using C = decltype(c);
    const auto st = static_cast<cudaStream_t>(stream);
    const bool vec = row_size % kVec == 0 && vec_aligned<SM, kVec>(F_t) && vec_aligned<SM, kVec>(F_a) &&
                     vec_aligned<SM, kVec>(F_b) && vec_aligned<SD, kVec>(x) && vec_aligned<SD, kVec>(z) &&
                     vec_aligned<C, kVec>(target);
    auto launch = [&](auto kernel, int width) {
      kernel<<<grid_size(n / width, kBlock), kBlock, 0, st>>>(
          static_cast<const SM*>(F_t), static_cast<const SM*>(F_a), static_cast<const SM*>(F_b),
          static_cast<const SD*>(x), static_cast<const SD*>(z), static_cast<const C*>(t), t_stride,
          static_cast<C*>(target), n, row_size, fd_step<C>(lambda, eps), transport);
    };
    if (vec) launch(fd_target_kernel<SD, SM, C, kVec>, kVec); else launch(fd_target_kernel<SD, SM, C, 1>, 1);
    return launch_status();
  });
}

int ucgm_loss_cuda(int f_dtype, int target_dtype, const void* F, const void* target, const void* t,
                   int64_t t_stride, void* loss, void* row_root, void* workspace, int64_t rows, int64_t channels,
                   int64_t positions, double huber_eps, int cosine, int time_weighting, void* stream) {
  if (rows < 0 || channels < 1 || positions < 1) return kBadArgument;
  return dispatch_pair_cuda(target_dtype, f_dtype, [&](auto st_, auto sf, auto c) {
    using ST = decltype(st_);
    using SF = decltype(sf);
    using C = decltype(c);
    const auto st = static_cast<cudaStream_t>(stream);
    const int64_t chunks = loss_chunks(positions);
    if (rows > 0) {
      auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(std::min<int64_t>(rows * chunks, 0x7fffffff)), kBlock, 0, st>>>(
            static_cast<const SF*>(F), static_cast<const ST*>(target), static_cast<C*>(workspace), rows, chunks,
            channels, positions, cosine);
      };
      if (positions % kVec == 0 && vec_aligned<SF, kVec>(F) && vec_aligned<ST, kVec>(target))
        launch(loss_partials_kernel<SF, ST, C, kVec>);
      else
        launch(loss_partials_kernel<SF, ST, C, 1>);
    }
    loss_finalize_kernel<C><<<1, 1024, 0, st>>>(static_cast<const C*>(workspace), static_cast<const C*>(t), t_stride,
                                                 static_cast<C*>(loss), static_cast<C*>(row_root), rows, chunks,
                                                 channels, positions, C(huber_eps), cosine, time_weighting);
    return launch_status();
  });
}

int ucgm_loss_backward_cuda(int f_dtype, int target_dtype, const void* grad_loss, const void* F,
                            const void* target, const void* t, int64_t t_stride, const void* row_root,
                            void* grad_F, void* grad_target, int64_t rows, int64_t channels, int64_t positions,
                            int cosine, int time_weighting, void* stream) {
  if (rows < 0 || channels < 1 || positions < 1) return kBadArgument;
  if (rows == 0) return kOk;
  return dispatch_pair_cuda(target_dtype, f_dtype, [&](auto st_, auto sf, auto c) {
    using ST = decltype(st_);
    using SF = decltype(sf);
    using C = decltype(c);
    auto launch = [&](auto kernel, int width) {
      kernel<<<grid_size(rows * positions / width, kBlock), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const C*>(grad_loss), static_cast<const SF*>(F), static_cast<const ST*>(target),
          static_cast<const C*>(t), t_stride, static_cast<const C*>(row_root), static_cast<SF*>(grad_F),
          static_cast<ST*>(grad_target), rows, channels, positions, cosine, time_weighting);
    };
    if (positions % kVec == 0 && vec_aligned<SF, kVec>(F) && vec_aligned<ST, kVec>(target) &&
        vec_aligned<SF, kVec>(grad_F) && vec_aligned<ST, kVec>(grad_target))
      launch(loss_backward_kernel<SF, ST, C, kVec>, kVec);
    else
      launch(loss_backward_kernel<SF, ST, C, 1>, 1);
    return launch_status();
  });
}

}  // namespace ucgm
