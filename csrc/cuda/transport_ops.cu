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
    Vec<S, V> a = *reinterpret_cast<const Vec<S, V>*>(u + i);
    Vec<S, V> b = *reinterpret_cast<const Vec<S, V>*>(v + i);
    Vec<S, V> r1, r2;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const C x = load<C>(a.x[k]), y = load<C>(b.x[k]);
      r1.x[k] = store<S>(m.a * x + m.b * y);
      r2.x[k] = store<S>(m.c * x + m.d * y);
    }
    *reinterpret_cast<Vec<S, V>*>(o1 + i) = r1;
    *reinterpret_cast<Vec<S, V>*>(o2 + i) = r2;
  }
}

template <typename S, typename C>
__global__ void coefficients_kernel(const S* __restrict__ t, int64_t n, int transport, S* ai, S* gi, S* at,
                                    S* gt) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const Coeffs<C> k = coefficients<C>(transport, load<C>(t[i]));
    ai[i] = store<S>(k.alpha_in);
    gi[i] = store<S>(k.gamma_in);
    at[i] = store<S>(k.alpha_to);
    gt[i] = store<S>(k.gamma_to);
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
    const bool vec = row_size % V == 0 && aligned16(u) && aligned16(v) && aligned16(out1) && aligned16(out2);
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
    coefficients_kernel<S, C><<<grid_size(n, kBlock), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const S*>(t), n, transport, static_cast<S*>(alpha_in), static_cast<S*>(gamma_in),
        static_cast<S*>(alpha_to), static_cast<S*>(gamma_to));
    return launch_status();
  });
}

}  // namespace ucgm
