// CPU kernels of the transport ops: one pass over memory, coefficients once per row segment.
#include "../ucgm/transport_ops.h"

#include <cmath>
#include <type_traits>

#include "../ucgm/transport.h"
#include "parallel.h"
#include "stream_store.h"
#include "vec_math.h"

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
    S* const out[2] = {static_cast<S*>(out1), static_cast<S*>(out2)};
    const int64_t row_bytes = row_size * int64_t(sizeof(S));
    const bool stream = streamable(out, 2 * rows * row_bytes, row_bytes);
    for_each_row_segment(rows, row_size, [&](int64_t row, int64_t i0, int64_t i1) {
      const Mat2<C> m = mix_matrix<C>(transport, mode, pt[row * t_stride]);
      write_outputs(stream, out, i0, i1, [&](int64_t j, auto len, S* const* o) {
        S* __restrict__ o1 = o[0];
        S* __restrict__ o2 = o[1];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const C a = load<C>(pu[j + i]), b = load<C>(pv[j + i]);
          o1[i] = store<S>(m.a * a + m.b * b);
          o2[i] = store<S>(m.c * a + m.d * b);
        }
      });
    }, [&] { if (stream) stream_fence(); });
    return int(kOk);
  });
}

// Per-element times within this bound take VecMath's sin / cos / exp (whose arguments then stay
// well inside kVecMathMaxArg: |1.57 t| <= 6.3, |4 (2.68 t - 1.59)| <= 49); larger or NaN times take
// libm's. Times are in [0, 1] in practice.
constexpr double kVecMathMaxT = 4.0;
constexpr int64_t kVecMathBlock = 256;
static_assert(4 * (2.68 * kVecMathMaxT + 1.59) < kVecMathMaxArg && 5 * kVecMathMaxT < kVecMathMaxArg,
              "the exp arguments of EDM and Random must stay in VecMath's domain");

template <typename C>
inline bool in_vec_domain(C t) { return std::fabs(t) <= C(kVecMathMaxT); }  // false for NaN

int coefficients_cpu(int dtype, const void* t, int64_t n, int transport, void* alpha_in, void* gamma_in,
                     void* alpha_to, void* gamma_to) {
  if (transport < 0 || transport >= kNumTransports) return kBadArgument;
  return dispatch_dtype(dtype, [&](auto s, auto c) {
    using S = decltype(s);
    using C = decltype(c);
    const S* pt = static_cast<const S*>(t);
    S* const out[4] = {static_cast<S*>(alpha_in), static_cast<S*>(gamma_in), static_cast<S*>(alpha_to),
                       static_cast<S*>(gamma_to)};
    // Writes the coefficients of the times tp[i0 .. i1) to o[0..3][i0 .. i1). The loop is
    // instantiated per transport and math policy, so the coefficient switch folds away and the
    // loop vectorizes. VecMath reads out-of-domain times as 0 (a select, so the loop stays
    // branch-free); their results are then rewritten with libm.
    auto run = [&](auto tr, auto math, const S* tp, S* const* o, int64_t i0, auto i1) {
      for (int64_t i = i0; i < i1; ++i) {
        C ti = load<C>(tp[i]);
        if constexpr (std::is_same_v<decltype(math), VecMath>) ti = in_vec_domain(ti) ? ti : C(0);
        const Coeffs<C> k = coefficients<C, decltype(math)>(tr.value, ti);
        o[0][i] = store<S>(k.alpha_in);
        o[1][i] = store<S>(k.gamma_in);
        o[2][i] = store<S>(k.alpha_to);
        o[3][i] = store<S>(k.gamma_to);
      }
    };
    const int64_t bytes = n * int64_t(sizeof(S));
    const bool stream = !transcendental(transport) && streamable(out, 4 * bytes, bytes);
    // One "row" of n times split over threads. Each element's result depends on its own time only
    // (not on its neighbours, nor on where a thread's slice starts): bit-identical for any thread count.
    for_each_row_segment(1, n, [&](int64_t, int64_t i0, int64_t i1) {
      with_transport(transport, [&](auto tr) {
        if constexpr (!transcendental(decltype(tr)::value)) {  // bound by memory: streamed when large
          write_outputs(stream, out, i0, i1,
                        [&](int64_t j, auto len, S* const* o) { run(tr, LibMath{}, pt + j, o, 0, len); });
        } else {  // bound by arithmetic: written directly (stream_store.h, streamable)
          for (int64_t b0 = i0; b0 < i1; b0 += kVecMathBlock) {
            const int64_t b1 = std::min(i1, b0 + kVecMathBlock);
            run(tr, VecMath{}, pt, out, b0, b1);
            int64_t outside = 0;  // a count (not a bool &=) so the scan vectorizes
            for (int64_t i = b0; i < b1; ++i) outside += !in_vec_domain(load<C>(pt[i]));
            if (outside == 0) continue;
            for (int64_t i = b0; i < b1; ++i)
              if (!in_vec_domain(load<C>(pt[i]))) run(tr, LibMath{}, pt, out, i, i + 1);
          }
        }
      });
    }, [&] { if (stream) stream_fence(); });
    return int(kOk);
  });
}

UCGM_NAMESPACE_END
