// CUDA kernels of the transport ops. Each thread moves V elements (16 bytes) per load when the
// pointers are aligned and rows split into whole vectors; coefficients come from transport.h.
#include "../ucgm/transport.h"
#include "../ucgm/transport_ops.h"
#include "launch.cuh"

namespace ucgm {
namespace {

constexpr int kBlock = 256;

template <typename S, typename C, int V>
__global__ void mix_kernel(const S* __restrict__ u, const S* __restrict__ v, const C* __restrict__ t,
                           int64_t t_stride, S* __restrict__ o1, S* __restrict__ o2, int64_t n,
                           int64_t row_size, int transport, int mode) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += step) {
    // V divides row_size, so the V elements share one row and one matrix.
    const Mat2<C> m = mix_matrix<C>(transport, mode, t[(i / row_size) * t_stride]);
    const Vec<S, V> a = vload<S, V>(u, i), b = vload<S, V>(v, i);
    Vec<S, V> r1, r2;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const C x = load<C>(a.x[k]), y = load<C>(b.x[k]);
      r1.x[k] = store<S>(m.a * x + m.b * y);
      r2.x[k] = store<S>(m.c * x + m.d * y);
    }
    vstore<S, V>(o1, i, r1);
    vstore<S, V>(o2, i, r2);
  }
}

// Four outputs per input: V elements per access as in mix_kernel (the write streams dominate).
template <typename S, typename C, int V>
__global__ void coefficients_kernel(const S* __restrict__ t, int64_t n, int transport, S* __restrict__ ai,
                                    S* __restrict__ gi, S* __restrict__ at, S* __restrict__ gt) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += step) {
    const Vec<S, V> tv = vload<S, V>(t, i);
    Vec<S, V> a, b, c, d;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const Coeffs<C> q = coefficients<C>(transport, load<C>(tv.x[k]));
      a.x[k] = store<S>(q.alpha_in);
      b.x[k] = store<S>(q.gamma_in);
      c.x[k] = store<S>(q.alpha_to);
      d.x[k] = store<S>(q.gamma_to);
    }
    vstore<S, V>(ai, i, a);
    vstore<S, V>(gi, i, b);
    vstore<S, V>(at, i, c);
    vstore<S, V>(gt, i, d);
  }
}

}  // namespace

int mix_cuda(int dtype, const void* u, const void* v, const void* t, int64_t t_stride, void* out1,
             void* out2, int64_t rows, int64_t row_size, int transport, int mode, void* stream) {
  if (transport < 0 || transport >= kNumTransports || mode < kInterp || mode > kDecodeAdjoint) return kBadArgument;
  const int64_t n = rows * row_size;
  if (n == 0) return kOk;
  return dispatch_dtype_cuda(dtype, [&](auto s, auto c) {
    using S = decltype(s);
    using C = decltype(c);
    constexpr int V = 16 / sizeof(S);
    const auto st = static_cast<cudaStream_t>(stream);
    const bool vec = row_size % V == 0 && vec_aligned<S, V>(u) && vec_aligned<S, V>(v) && vec_aligned<S, V>(out1) &&
                     vec_aligned<S, V>(out2);
    auto args = [&](auto kernel, int width) {
      kernel<<<grid_size(n / width, kBlock), kBlock, 0, st>>>(
          static_cast<const S*>(u), static_cast<const S*>(v), static_cast<const C*>(t), t_stride,
          static_cast<S*>(out1), static_cast<S*>(out2), n, row_size, transport, mode);
    };
    if (vec) args(mix_kernel<S, C, V>, V); else args(mix_kernel<S, C, 1>, 1);
    return launch_status();
  });
}

int coefficients_cuda(int dtype, const void* t, int64_t n, int transport, void* alpha_in, void* gamma_in,
                      void* alpha_to, void* gamma_to, void* stream) {
  if (transport < 0 || transport >= kNumTransports) return kBadArgument;
  if (n == 0) return kOk;
  return dispatch_dtype_cuda(dtype, [&](auto s, auto c) {
    using S = decltype(s);
    using C = decltype(c);
    constexpr int V = 16 / sizeof(S);
    const bool vec = n % V == 0 && vec_aligned<S, V>(t) && vec_aligned<S, V>(alpha_in) && vec_aligned<S, V>(gamma_in) &&
                     vec_aligned<S, V>(alpha_to) && vec_aligned<S, V>(gamma_to);
    auto launch = [&](auto kernel, int width) {
      kernel<<<grid_size(n / width, kBlock), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const S*>(t), n, transport, static_cast<S*>(alpha_in), static_cast<S*>(gamma_in),
          static_cast<S*>(alpha_to), static_cast<S*>(gamma_to));
    };
    if (vec) launch(coefficients_kernel<S, C, V>, V); else launch(coefficients_kernel<S, C, 1>, 1);
    return launch_status();
  });
}

}  // namespace ucgm
