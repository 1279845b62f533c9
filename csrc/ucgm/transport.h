// The transport coefficients alpha_in, gamma_in, alpha_to, gamma_to of t: the one source of truth
// for the CPU and CUDA kernels (see DESIGN.md, "The method"). Every function is __host__ __device__.
#pragma once

#include "common.h"

UCGM_NAMESPACE_BEGIN

// Must match the order of ucgm_fast.TRANSPORTS.
enum Transport : int { kLinear = 0, kReLinear = 1, kTrigFlow = 2, kTrigLinear = 3, kEDM = 4, kRandom = 5 };
constexpr int kNumTransports = 6;

UCGM_HD float usin(float x) { return sinf(x); }
UCGM_HD double usin(double x) { return sin(x); }
UCGM_HD float ucos(float x) { return cosf(x); }
UCGM_HD double ucos(double x) { return cos(x); }
UCGM_HD float uexp(float x) { return expf(x); }
UCGM_HD double uexp(double x) { return exp(x); }
UCGM_HD float usqrt(float x) { return sqrtf(x); }
UCGM_HD double usqrt(double x) { return sqrt(x); }

template <typename C> struct Coeffs { C alpha_in, gamma_in, alpha_to, gamma_to; };

// The math functions coefficients() calls: the C library's (the device's in CUDA code). The CPU's
// per-element coefficient loop passes cpu/vec_math.h's VecMath instead, which vectorizes.
struct LibMath {
  template <typename C> UCGM_HD static C sin(C x) { return usin(x); }
  template <typename C> UCGM_HD static C cos(C x) { return ucos(x); }
  template <typename C> UCGM_HD static C exp(C x) { return uexp(x); }
  template <typename C> UCGM_HD static C sqrt(C x) { return usqrt(x); }
};

// Whether a transport's coefficients call sin, cos or exp (Linear and ReLinear are polynomials).
constexpr bool transcendental(int transport) { return transport != kLinear && transport != kReLinear; }

// x_t = alpha_in z + gamma_in x,  target = alpha_to z + gamma_to x.
// c = 1.57 (not pi/2) exactly as published, so released checkpoints keep working.
template <typename C, typename M = LibMath>
UCGM_HD Coeffs<C> coefficients(int transport, C t) {
  const C c = C(1.57);
  switch (transport) {
    case kLinear: return {t, C(1) - t, C(1), C(-1)};
    case kReLinear: return {C(1) - t, t, C(-1), C(1)};
    case kTrigFlow: { C s = M::sin(c * t), k = M::cos(c * t); return {s, k, k, -s}; }
    case kTrigLinear: return {M::sin(c * t), M::cos(c * t), C(1), C(-1)};
    case kEDM: {
      C s = M::exp(C(4) * (C(2.68) * t - C(1.59)));
      C r = C(1) / M::sqrt(s * s + C(0.25));
      return {s * r, r, C(-0.5) * r, C(2) * s * r};
    }
    default: return {M::sin(c * t), C(1) - t, C(1), C(-1) - M::exp(C(-5) * t)};  // kRandom
  }
}

// The 2x2 per-row maps of the linear ops, out = M [u; v]:
//   kInterp         (x, z)         -> (x_t, target)
//   kInterpAdjoint  (g_xt, g_tgt)  -> (g_x, g_z)            M^T of kInterp
//   kDecode         (x_t, F)       -> (x_hat, z_hat)        inverse of kInterp, columns swapped
//   kDecodeAdjoint  (g_xhat, g_zhat) -> (g_xt, g_F)         M^T of kDecode
enum MixMode : int { kInterp = 0, kInterpAdjoint = 1, kDecode = 2, kDecodeAdjoint = 3 };

template <typename C>
UCGM_HD Mat2<C> mix_matrix(int transport, int mode, C t) {
  const Coeffs<C> k = coefficients(transport, t);
  switch (mode) {
    case kInterp: return {k.gamma_in, k.alpha_in, k.gamma_to, k.alpha_to};
    case kInterpAdjoint: return {k.gamma_in, k.gamma_to, k.alpha_in, k.alpha_to};
    default: {
      // x_hat = (F alpha_in - x_t alpha_to) / den,  z_hat = (x_t gamma_to - F gamma_in) / den
      const C inv = C(1) / (k.alpha_in * k.gamma_to - k.gamma_in * k.alpha_to);
      const Mat2<C> m{-k.alpha_to * inv, k.alpha_in * inv, k.gamma_to * inv, -k.gamma_in * inv};
      return mode == kDecode ? m : Mat2<C>{m.a, m.c, m.b, m.d};
    }
  }
}

UCGM_NAMESPACE_END
