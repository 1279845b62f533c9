// CPU kernels of the sampler ops: one pass over memory per step; the noise is generated in blocks
// of kBlock elements into a stack buffer (one Philox call per 4 elements) right before it is used.
//
// No FMA contraction in this file: the Box-Muller transform must round exactly like the CUDA
// kernel's __f*_rn intrinsics (philox.h), so CPU and CUDA draw bit-identical noise.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "../ucgm/sampler_ops.h"

#include <algorithm>

#include "../ucgm/philox.h"
#include "../ucgm/sampler.h"
#include "parallel.h"

namespace ucgm {
namespace {

// Elements per noise block: a multiple of 4 (one Philox quad) that keeps the buffer in L1.
constexpr int64_t kBlock = 512;

// Calls f(State{}, Model{}) for a float32/float64 state and any float model output.
template <typename F>
int dispatch_state_model(int state_dtype, int model_dtype, F&& f) {
  auto with_state = [&](auto s) { return dispatch_dtype(model_dtype, [&](auto m, auto) { return f(s, m); }); };
  if (state_dtype == kFloat32) return with_state(float{});
  if (state_dtype == kFloat64) return with_state(double{});
  return int(kBadArgument);
}

// Normals of elements [b, e) of the stream (seed, step) into out[0 .. e-b); b is a multiple of 4.
void fill_normals(uint64_t seed, uint32_t step, int64_t b, int64_t e, float* out) {
  const int64_t q0 = b / 4, q1 = (e + 3) / 4;
#pragma omp simd
  for (int64_t q = q0; q < q1; ++q) philox_normal4(seed, step, static_cast<uint64_t>(q), out + 4 * (q - q0));
}

}  // namespace

int sampler_step_cpu(int state_dtype, int model_dtype, const void* F, const void* x, void* x_prev, void* z_prev,
                     const void* sched, const void* seed, int64_t n, int step, int transport, int mode,
                     void* x_next, void* x_hat, void* z_hat) {
  if (transport < 0 || transport >= kNumTransports || mode < kExtrapolOff || mode > kExtrapolApply || n < 0 ||
      step < 0 || x_next == nullptr || (mode != kExtrapolOff && (x_prev == nullptr || z_prev == nullptr)))
    return kBadArgument;
  return dispatch_state_model(state_dtype, model_dtype, [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    const StepCoeffs<double> k = step_coeffs<double>(transport, static_cast<const double*>(sched));
    const uint64_t sd = static_cast<uint64_t>(*static_cast<const int64_t*>(seed));
    const bool apply = mode == kExtrapolApply, record = mode != kExtrapolOff;
    const M* __restrict__ pf = static_cast<const M*>(F);
    const S* __restrict__ px = static_cast<const S*>(x);
    S* __restrict__ xp = static_cast<S*>(x_prev);
    S* __restrict__ zp = static_cast<S*>(z_prev);
    S* __restrict__ out = static_cast<S*>(x_next);
    S* __restrict__ oxh = static_cast<S*>(x_hat);
    S* __restrict__ ozh = static_cast<S*>(z_hat);
    for_each_row_segment(1, n, [&](int64_t, int64_t i0, int64_t i1) {
      alignas(64) float noise[kBlock];
      for (int64_t b = i0; b < i1; b += kBlock) {
        const int64_t e = std::min(i1, b + kBlock);
        if (k.noise) fill_normals(sd, static_cast<uint32_t>(step), b, e, noise);
        const float* nz = noise - b;
        // The branches are loop-invariant; the compiler unswitches them.
        for (int64_t i = b; i < e; ++i) {
          const StepResult<double> r = step_element<double>(
              k, apply, double(px[i]), load<double>(pf[i]), k.noise ? double(nz[i]) : 0.0,
              apply ? double(xp[i]) : 0.0, apply ? double(zp[i]) : 0.0);
          out[i] = static_cast<S>(r.x_next);
          if (record) {
            xp[i] = static_cast<S>(r.x_raw);
            zp[i] = static_cast<S>(r.z_raw);
          }
          if (oxh) oxh[i] = static_cast<S>(r.x_raw);
          if (ozh) ozh[i] = static_cast<S>(r.z_used);
        }
      }
    });
    return int(kOk);
  });
}

int sampler_correct_cpu(int state_dtype, int model_dtype, const void* F, const void* x_next, const void* x,
                        const void* z_hat, const void* sched, int64_t n, int transport, void* out) {
  if (transport < 0 || transport >= kNumTransports || n < 0) return kBadArgument;
  return dispatch_state_model(state_dtype, model_dtype, [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    const CorrectCoeffs<double> k = correct_coeffs<double>(transport, static_cast<const double*>(sched));
    const M* __restrict__ pf = static_cast<const M*>(F);
    const S* __restrict__ pn = static_cast<const S*>(x_next);
    const S* __restrict__ px = static_cast<const S*>(x);
    const S* __restrict__ pz = static_cast<const S*>(z_hat);
    S* __restrict__ po = static_cast<S*>(out);
    for_each_row_segment(1, n, [&](int64_t, int64_t i0, int64_t i1) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i)
        po[i] = static_cast<S>(correct_element<double>(k, double(px[i]), double(pn[i]), load<double>(pf[i]),
                                                       double(pz[i])));
    });
    return int(kOk);
  });
}

int philox_cpu(const void* seed, int step, int64_t n, int raw, void* out) {
  if (n < 0 || step < 0) return kBadArgument;
  const uint64_t sd = static_cast<uint64_t>(*static_cast<const int64_t*>(seed));
  for_each_row_segment(1, n, [&](int64_t, int64_t i0, int64_t i1) {
    if (raw) {
      uint32_t* o = static_cast<uint32_t*>(out);
      for (int64_t i = i0; i < i1;) {
        const Philox4 w = philox_quad(sd, static_cast<uint32_t>(step), static_cast<uint64_t>(i / 4));
        for (int lane = static_cast<int>(i % 4); lane < 4 && i < i1; ++lane, ++i) o[i] = w.v[lane];
      }
      return;
    }
    alignas(64) float noise[kBlock];
    float* o = static_cast<float*>(out);
    for (int64_t b = i0; b < i1; b += kBlock) {
      const int64_t e = std::min(i1, b + kBlock);
      fill_normals(sd, static_cast<uint32_t>(step), b, e, noise);
      std::copy(noise, noise + (e - b), o + b);
    }
  });
  return kOk;
}

}  // namespace ucgm
