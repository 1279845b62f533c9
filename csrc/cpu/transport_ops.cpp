// CPU kernels of the transport ops: one pass over memory, coefficients once per row segment.
#include "../ucgm/transport_ops.h"

#include "../ucgm/transport.h"
#include "parallel.h"

UCGM_NAMESPACE_BEGIN

int mix_cpu(int dtype, const void* u, const void* v, const void* t, int64_t t_stride, void* out1,
            void* out2, int64_t rows, int64_t row_size, int transport, int mode) {
  if (transport < 0 || transport >= kNumTransports || mode < kInterp || mode > kDecodeAdjoint) return kBadArgument;
  return dispatch_dtype(dtype, [&](auto s, auto c) {
    using S = decltype(s);
    using C = decltype(c);
    const S* __restrict__ pu = static_cast<const S*>(u);
    const S* __restrict__ pv = static_cast<const S*>(v);
    const C* pt = static_cast<const C*>(t);
    S* __restrict__ o1 = static_cast<S*>(out1);
    S* __restrict__ o2 = static_cast<S*>(out2);
    for_each_row_segment(rows, row_size, [&](int64_t row, int64_t i0, int64_t i1) {
      const Mat2<C> m = mix_matrix<C>(transport, mode, pt[row * t_stride]);
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const C a = load<C>(pu[i]), b = load<C>(pv[i]);
        o1[i] = store<S>(m.a * a + m.b * b);
        o2[i] = store<S>(m.c * a + m.d * b);
      }
    });
    return int(kOk);
  });
}

int coefficients_cpu(int dtype, const void* t, int64_t n, int transport, void* alpha_in, void* gamma_in,
                     void* alpha_to, void* gamma_to) {
  if (transport < 0 || transport >= kNumTransports) return kBadArgument;
  return dispatch_dtype(dtype, [&](auto s, auto c) {
    using S = decltype(s);
    using C = decltype(c);
    const S* pt = static_cast<const S*>(t);
    S *ai = static_cast<S*>(alpha_in), *gi = static_cast<S*>(gamma_in);
    S *at = static_cast<S*>(alpha_to), *gt = static_cast<S*>(gamma_to);
    // One "row" of n times split over threads; the loop is instantiated per transport so the
    // coefficient switch folds away and the polynomial transports vectorize.
    for_each_row_segment(1, n, [&](int64_t, int64_t i0, int64_t i1) {
      with_transport(transport, [&](auto tr) {
        for (int64_t i = i0; i < i1; ++i) {
          const Coeffs<C> k = coefficients<C>(tr.value, load<C>(pt[i]));
          ai[i] = store<S>(k.alpha_in);
          gi[i] = store<S>(k.gamma_in);
          at[i] = store<S>(k.alpha_to);
          gt[i] = store<S>(k.gamma_to);
        }
      });
    });
    return int(kOk);
  });
}

UCGM_NAMESPACE_END
