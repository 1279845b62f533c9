// The per-row and per-element math of the UCGM training objective (DESIGN.md, "Training
// objective"), shared by the CPU and CUDA kernels. Coefficients come from transport.h only.
#pragma once

#include "transport.h"

UCGM_NAMESPACE_BEGIN

// ---- enhanced target ----------------------------------------------------------------------------

// Which of the three rules a row follows. Rows are decided on the device from t[row] and the row
// index (the last `ndrop` rows had their label dropped), so no mask ever leaves the device.
enum EnhanceRule : int { kInRange = 0, kOutOfRange = 1, kDropped = 2 };

template <typename C>
UCGM_HD int enhance_rule(int64_t row, int64_t rows, int64_t ndrop, C t, C lo, C hi) {
  if (row >= rows - ndrop) return kDropped;
  return (lo < t && t < hi) ? kInRange : kOutOfRange;  // strict on both ends, as published
}

// in range: v + e (w - wo);  out of range: (v + w) / 2;  dropped: (v + wo) / 2.
template <typename C>
UCGM_HD C enhance_value(int rule, C v, C w, C wo, C ratio) {
  if (rule == kInRange) return v + ratio * (w - wo);
  if (rule == kOutOfRange) return (v + w) * C(0.5);
  return (v + wo) * C(0.5);
}

// Per-row constants of the enhance kernel: the transport at t and the row's rule.
template <typename C> struct EnhanceRow {
  Coeffs<C> k;
  C inv_den;
  int rule;
};

template <typename C>
UCGM_HD EnhanceRow<C> enhance_row(int transport, int64_t row, int64_t rows, int64_t ndrop, C t, C lo, C hi) {
  const Coeffs<C> k = coefficients<C>(transport, t);
  return {k, C(1) / (k.alpha_in * k.gamma_to - k.gamma_in * k.alpha_to), enhance_rule<C>(row, rows, ndrop, t, lo, hi)};
}

// Decoded prediction of a model output F at x_t: x_hat = (F ai - x_t at)/den, z_hat = (x_t gt - F gi)/den.
template <typename C>
UCGM_HD void decode_pred(const Coeffs<C>& k, C inv_den, C x_t, C F, C& x_hat, C& z_hat) {
  x_hat = (F * k.alpha_in - x_t * k.alpha_to) * inv_den;
  z_hat = (x_t * k.gamma_to - F * k.gamma_in) * inv_den;
}

// One element of the enhanced target under the row's rule (r.rule, passed apart so the CPU loop
// can hand in a compile-time constant). With has_wo = false the "without" prediction is the
// unmodified target itself (x, z), the lambda > 0 form of the rule.
template <typename C>
UCGM_HD void enhance_element(const EnhanceRow<C>& r, int rule, C ratio, C x, C z, C F_w, C F_wo, bool has_wo,
                             C& x_tar, C& z_tar) {
  const C x_t = r.k.alpha_in * z + r.k.gamma_in * x;
  C xw, zw, xwo = x, zwo = z;
  decode_pred(r.k, r.inv_den, x_t, F_w, xw, zw);
  if (has_wo) decode_pred(r.k, r.inv_den, x_t, F_wo, xwo, zwo);
  x_tar = enhance_value(rule, x, xw, xwo, ratio);
  z_tar = enhance_value(rule, z, zw, zwo, ratio);
}

// ---- finite-difference tangent and consistency target -------------------------------------------

// lambda and eps of the difference. Whether it is the central one (lambda = 1) is decided on the
// caller's double, as the caller (and the reference) decide it: a lambda just below 1 rounds to 1
// in float, and deciding there ran two passes into buffers allocated for one.
template <typename C> struct FdStep { bool central; C lambda, eps; };

template <typename C>
UCGM_HD FdStep<C> fd_step(double lambda, double eps) { return {lambda == 1.0, C(lambda), C(eps)}; }

// The two times of the difference: lambda = 1: (t + eps, t - eps), the central difference;
// 0 < lambda < 1: (t, t - (t - lambda t)), written as published so r_b rounds the same way.
template <typename C>
UCGM_HD C fd_time(int which, C t, const FdStep<C>& s) {
  if (s.central) return which == 0 ? t + s.eps : t - s.eps;
  return which == 0 ? t : t - (t - s.lambda * t);
}

// 1 / (r_a - r_b) as published: 1 / (2 eps) for lambda = 1, 1 / (t - lambda t) otherwise.
template <typename C>
UCGM_HD C fd_inv_step(C t, const FdStep<C>& s) {
  return s.central ? C(1) / (C(2) * s.eps) : C(1) / (t - s.lambda * t);
}

// f(r) = (F_r alpha_in(r) - x'_r alpha_to(r)) / den(r) with x'_r = alpha_in(r) z + gamma_in(r) x is
// linear in (F_r, z, x): f(r) = p F_r + q z + s x, with p = ai / den, q = -ai at / den, s = -gi at / den.
template <typename C> struct FdLinear { C p, q, s; };

template <typename C>
UCGM_HD FdLinear<C> fd_linear(const Coeffs<C>& k) {
  const C inv = C(1) / (k.alpha_in * k.gamma_to - k.gamma_in * k.alpha_to);
  return {k.alpha_in * inv, -k.alpha_in * k.alpha_to * inv, -k.gamma_in * k.alpha_to * inv};
}

// Per-row constants of fd_target: df = (p_a F_a - p_b F_b + dq z + ds x) / (r_a - r_b), so each
// element costs four multiply-adds; and the target's scale alpha_in(t) / den(t) * 4 / sin(1.57 t).
// Folding (q_a - q_b) per row also avoids the cancellation of two O(1) values f(r_a) - f(r_b).
template <typename C> struct FdRow { C pa, pb, dq, ds, inv_step, scale; };

template <typename C>
UCGM_HD FdRow<C> fd_row(int transport, C t, const FdStep<C>& step) {
  const FdLinear<C> a = fd_linear(coefficients<C>(transport, fd_time<C>(0, t, step)));
  const FdLinear<C> b = fd_linear(coefficients<C>(transport, fd_time<C>(1, t, step)));
  const Coeffs<C> kt = coefficients<C>(transport, t);
  const C scale = kt.alpha_in / (kt.alpha_in * kt.gamma_to - kt.gamma_in * kt.alpha_to) * (C(4) / usin(t * C(1.57)));
  return {a.p, b.p, a.q - b.q, a.s - b.s, fd_inv_step<C>(t, step), scale};
}

// clamp to [-1, 1] that keeps NaN (as torch.clamp does; fmin/fmax would drop it). Written as
// (c > v ? c : v): the operand order of x86 MAXPS/MINPS, so the CPU loop vectorizes branch-free.
template <typename C>
UCGM_HD C clamp_unit(C v) {
  v = C(-1) > v ? C(-1) : v;
  return C(1) < v ? C(1) : v;
}

// target = F_t - scale * clamp((f(r_a) - f(r_b)) / (r_a - r_b), -1, 1).
template <typename C>
UCGM_HD C fd_target_element(const FdRow<C>& r, C F_t, C F_a, C F_b, C x, C z) {
  const C df = (r.pa * F_a - r.pb * F_b + r.dq * z + r.ds * x) * r.inv_step;
  return F_t - r.scale * clamp_unit(df);
}

// ---- loss ---------------------------------------------------------------------------------------

// Data is viewed as (rows, channels, positions): the cosine term compares the channel vectors
// at each position (F.cosine_similarity(dim=1)); without it channels = 1, positions = row size.
// Per row:  loss_b = w_b (sqrt(mean((F - T)^2) + h^2) - h + mean_p(1 - cos_p)),  w_b = cos(1.57 t_b) or 1.

// F.cosine_similarity's eps: each norm is clamped from below before dividing.
template <typename C> UCGM_HD C cosine_eps() { return C(1e-8); }

template <typename C>
UCGM_HD C cosine_of(C dot, C ff, C tt) {
  const C e = cosine_eps<C>();
  C nf = usqrt(ff), nt = usqrt(tt);
  nf = nf > e ? nf : e;
  nt = nt > e ? nt : e;
  return dot / (nf * nt);
}

// d cos / dF_c = a T_c - b F_c and d cos / dT_c = a F_c - c T_c for the clamped-norm cosine.
template <typename C> struct CosGrad { C a, b, c; };

template <typename C>
UCGM_HD CosGrad<C> cosine_grad(C dot, C ff, C tt) {
  const C e = cosine_eps<C>();
  const C nf0 = usqrt(ff), nt0 = usqrt(tt);
  const C nf = nf0 > e ? nf0 : e, nt = nt0 > e ? nt0 : e;
  const C a = C(1) / (nf * nt), cosv = dot * a;
  // A clamped norm is a constant, so it contributes no F (or T) term.
  return {a, nf0 > e ? cosv / ff : C(0), nt0 > e ? cosv / tt : C(0)};
}

template <typename C>
UCGM_HD C time_weight(bool time_weighting, C t) { return time_weighting ? ucos(t * C(1.57)) : C(1); }

// Chunking of the CUDA loss reduction: one block handles up to this many positions of one row
// (16 per thread of a 256-thread block), so its two block reductions stay small next to the reads.
constexpr int64_t kLossChunkPositions = 4096;

inline int64_t loss_chunks(int64_t positions) {
  return positions <= 0 ? 1 : (positions + kLossChunkPositions - 1) / kLossChunkPositions;
}

// Number of compute-type values of the CUDA loss workspace (the CPU op needs none).
inline int64_t ucgm_loss_workspace_size(int64_t rows, int64_t positions) { return rows * loss_chunks(positions) * 2; }

UCGM_NAMESPACE_END
