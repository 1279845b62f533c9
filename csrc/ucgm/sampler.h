// The step math of the UCGM sampler (DESIGN.md, "Sampler"), __host__ __device__ so the CPU and CUDA
// kernels share it. Coefficients come from transport.h; nothing here rewrites them.
//
// One sampler step at (t, t') from the model output F at the state x:
//   x_hat, z_hat = decode(x, F) at t
//   from step index 2 on (extrapolation on): x_hat += e (x_hat - x_hat_prev), z_hat likewise, where
//     *_prev are the raw (not extrapolated) estimates of the previous step
//   x_next = gamma_in(t') x_hat + alpha_in(t') (sqrt(1 - kappa) z_hat + sqrt(kappa) noise)
// Order-2 (Heun) correction, with z_pri decoded from the model output at (x_next, t'):
//   x_next = x gamma_in(t') / gamma_in(t) + (alpha_in(t') - gamma_in(t') alpha_in(t) / gamma_in(t)) (z_hat + z_pri) / 2
//
// Precision: the schedule row is float64 and so is all arithmetic, whatever the state's storage
// type. A float32 state then only adds the rounding of the stored values: near the noise end the
// order-2 correction multiplies by gamma_in(t')/gamma_in(t) >> 1, where float32 arithmetic (or
// float32 times: 1 - 0.999f is off by 1e-5 relative) would lose several digits.
#pragma once

#include "transport.h"

UCGM_NAMESPACE_BEGIN

// Row of the per-step schedule the kernels read from (device) memory: a CUDA graph replays
// with new times, kappa or extrapolation ratio by rewriting this row, no recapture.
enum SchedField : int { kSchedT = 0, kSchedTNext = 1, kSchedKappa = 2, kSchedExtrapol = 3, kSchedFields = 4 };

// What a step does with the raw-estimate buffers x_prev / z_prev.
enum ExtrapolMode : int {
  kExtrapolOff = 0,    // extrapolation disabled: the buffers are not touched
  kExtrapolRecord = 1, // steps 0 and 1: only store the raw estimates
  kExtrapolApply = 2,  // step >= 2: extrapolate against the buffers, then store the raw estimates
};

template <typename C> struct StepCoeffs {
  Mat2<C> dec;   // (x, F) -> (x_hat, z_hat) at t
  C g1, a1;      // gamma_in(t'), alpha_in(t')
  C zs, ns;      // sqrt(1 - kappa), sqrt(kappa)
  C e;           // extrapolation ratio
  bool noise;    // kappa > 0: draw noise at all
};

template <typename C>
UCGM_HD StepCoeffs<C> step_coeffs(int transport, const C* sched) {
  StepCoeffs<C> k;
  k.dec = mix_matrix<C>(transport, kDecode, sched[kSchedT]);
  const Coeffs<C> c1 = coefficients<C>(transport, sched[kSchedTNext]);
  const C kappa = sched[kSchedKappa];
  k.g1 = c1.gamma_in;
  k.a1 = c1.alpha_in;
  k.zs = usqrt(C(1) - kappa);
  k.ns = usqrt(kappa);
  k.e = sched[kSchedExtrapol];
  k.noise = kappa > C(0);
  return k;
}

template <typename C> struct StepResult {
  C x_next;       // the new state
  C x_raw, z_raw; // this step's decoded estimates before extrapolation (buffers, returned x_hat)
  C z_used;       // the z_hat the update used (input of the order-2 correction)
};

// One element of the fused step; xp / zp are the element's previous raw estimates, read only when
// apply (extrapolation on and step index >= 2).
template <typename C>
UCGM_HD StepResult<C> step_element(const StepCoeffs<C>& k, bool apply, C x, C F, C noise, C xp, C zp) {
  StepResult<C> r;
  r.x_raw = k.dec.a * x + k.dec.b * F;
  r.z_raw = k.dec.c * x + k.dec.d * F;
  C xh = r.x_raw, zh = r.z_raw;
  if (apply) {
    xh = xh + k.e * (xh - xp);
    zh = zh + k.e * (zh - zp);
  }
  r.z_used = zh;
  r.x_next = k.g1 * xh + k.a1 * (k.zs * zh + k.ns * noise);
  return r;
}

template <typename C> struct CorrectCoeffs {
  C dc, dd;  // z_pri = dc x_next + dd F, the z row of the decode at t'
  C A, B;    // x_new = A x + B (z_hat + z_pri)
};

template <typename C>
UCGM_HD CorrectCoeffs<C> correct_coeffs(int transport, const C* sched) {
  const Coeffs<C> c0 = coefficients<C>(transport, sched[kSchedT]);
  const Coeffs<C> c1 = coefficients<C>(transport, sched[kSchedTNext]);
  const Mat2<C> d1 = mix_matrix<C>(transport, kDecode, sched[kSchedTNext]);
  CorrectCoeffs<C> k;
  k.dc = d1.c;
  k.dd = d1.d;
  k.A = c1.gamma_in / c0.gamma_in;
  k.B = C(0.5) * (c1.alpha_in - c1.gamma_in * c0.alpha_in / c0.gamma_in);
  return k;
}

template <typename C>
UCGM_HD C correct_element(const CorrectCoeffs<C>& k, C x, C x_next, C F, C zh) {
  return k.A * x + k.B * (zh + (k.dc * x_next + k.dd * F));
}

UCGM_NAMESPACE_END
