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

UCGM_NAMESPACE_BEGIN
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

// Philox words of quads [q0, q0 + nq) in structure-of-arrays form (w[k][q - q0] = word k), so each
// round is a loop the compiler vectorizes across quads; nq <= kBlock / 4.
void fill_words(uint64_t seed, uint32_t step, int64_t q0, int64_t nq, uint32_t (*w)[kBlock / 4]) {
  uint32_t* c0 = w[0];
  uint32_t* c1 = w[1];
  uint32_t* c2 = w[2];
  uint32_t* c3 = w[3];
  for (int64_t q = 0; q < nq; ++q) {
    const uint64_t j = static_cast<uint64_t>(q0 + q);
    c0[q] = static_cast<uint32_t>(j);
    c1[q] = static_cast<uint32_t>(j >> 32);
    c2[q] = static_cast<uint32_t>(seed >> 32);
    c3[q] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = step;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
#pragma omp simd
    for (int64_t q = 0; q < nq; ++q) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * c0[q];
      const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2[q];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[q] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[q] ^ k1;
      c0[q] = n0;
      c1[q] = static_cast<uint32_t>(p1);
      c2[q] = n2;
      c3[q] = static_cast<uint32_t>(p0);
    }
  }
}

// Normals of elements [b, e) of the stream (seed, step) into out[0 .. e-b); b is a multiple of 4.
// Bit-identical to philox_normal4 (philox.h), which the CUDA kernel calls per quad.
void fill_normals(uint64_t seed, uint32_t step, int64_t b, int64_t e, float* out) {
  alignas(64) uint32_t w[4][kBlock / 4];
  alignas(64) float r[2][kBlock / 4], sn[2][kBlock / 4], cs[2][kBlock / 4];
  const int64_t q0 = b / 4, nq = (e - b + 3) / 4;
  fill_words(seed, step, q0, nq, w);
  // Same operations as box_muller, split in three loops: sqrt sets errno for negative input, and
  // the errno branch would keep the other two loops from vectorizing.
#pragma omp simd
  for (int64_t q = 0; q < nq; ++q) {
    r[0][q] = box_muller_r2(w[0][q]);
    r[1][q] = box_muller_r2(w[2][q]);
    noise_sincos(w[1][q] >> 8, &sn[0][q], &cs[0][q]);
    noise_sincos(w[3][q] >> 8, &sn[1][q], &cs[1][q]);
  }
  for (int64_t q = 0; q < nq; ++q) {
    r[0][q] = rn::sqrt(r[0][q]);
    r[1][q] = rn::sqrt(r[1][q]);
  }
#pragma omp simd
  for (int64_t q = 0; q < nq; ++q) {
    out[4 * q] = rn::mul(r[0][q], cs[0][q]);
    out[4 * q + 1] = rn::mul(r[0][q], sn[0][q]);
    out[4 * q + 2] = rn::mul(r[1][q], cs[1][q]);
    out[4 * q + 3] = rn::mul(r[1][q], sn[1][q]);
  }
}

}  // namespace

namespace {

// One block [b, e) of the fused step, specialized on everything loop-invariant so the loop
// vectorizes: Mode (ExtrapolMode), Noise (kappa > 0), Hats (write x_hat / z_hat).
template <int Mode, bool Noise, bool Hats, typename S, typename M>
void step_block(const StepCoeffs<double>& k, const M* __restrict__ pf, const S* __restrict__ px,
                S* __restrict__ xp, S* __restrict__ zp, const float* __restrict__ nz, S* __restrict__ out,
                S* __restrict__ oxh, S* __restrict__ ozh, int64_t b, int64_t e) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const StepResult<double> r = step_element<double>(
        k, Mode == kExtrapolApply, double(px[i]), load<double>(pf[i]), Noise ? double(nz[i - b]) : 0.0,
        Mode == kExtrapolApply ? double(xp[i]) : 0.0, Mode == kExtrapolApply ? double(zp[i]) : 0.0);
    out[i] = static_cast<S>(r.x_next);
    if (Mode != kExtrapolOff) {
      xp[i] = static_cast<S>(r.x_raw);
      zp[i] = static_cast<S>(r.z_raw);
    }
    if (Hats) {
      oxh[i] = static_cast<S>(r.x_raw);
      ozh[i] = static_cast<S>(r.z_used);
    }
  }
}

template <int Mode, bool Noise, bool Hats, typename S, typename M>
void step_all(const StepCoeffs<double>& k, uint64_t seed, uint32_t step, const M* pf, const S* px, S* xp, S* zp,
              S* out, S* oxh, S* ozh, int64_t n) {
  for_each_row_segment(1, n, [&](int64_t, int64_t i0, int64_t i1) {
    alignas(64) float noise[kBlock];
    for (int64_t b = i0; b < i1; b += kBlock) {
      const int64_t e = std::min(i1, b + kBlock);
      if (Noise) fill_normals(seed, step, b, e, noise);
      step_block<Mode, Noise, Hats>(k, pf, px, xp, zp, noise, out, oxh, ozh, b, e);
    }
  });
}

template <int Mode, typename S, typename M>
void step_dispatch(const StepCoeffs<double>& k, bool hats, uint64_t seed, uint32_t step, const M* pf, const S* px,
                   S* xp, S* zp, S* out, S* oxh, S* ozh, int64_t n) {
  if (k.noise && hats) step_all<Mode, true, true>(k, seed, step, pf, px, xp, zp, out, oxh, ozh, n);
  else if (k.noise) step_all<Mode, true, false>(k, seed, step, pf, px, xp, zp, out, oxh, ozh, n);
  else if (hats) step_all<Mode, false, true>(k, seed, step, pf, px, xp, zp, out, oxh, ozh, n);
  else step_all<Mode, false, false>(k, seed, step, pf, px, xp, zp, out, oxh, ozh, n);
}

}  // namespace

int sampler_step_cpu(int state_dtype, int model_dtype, const void* F, const void* x, void* x_prev, void* z_prev,
                     const void* sched, const void* seed, int64_t n, int step, int transport, int mode,
                     void* x_next, void* x_hat, void* z_hat) {
  if (transport < 0 || transport >= kNumTransports || mode < kExtrapolOff || mode > kExtrapolApply || n < 0 ||
      step < 0 || x_next == nullptr || (mode != kExtrapolOff && (x_prev == nullptr || z_prev == nullptr)) ||
      ((x_hat == nullptr) != (z_hat == nullptr)))
    return kBadArgument;
  return dispatch_state_model(state_dtype, model_dtype, [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    const StepCoeffs<double> k = step_coeffs<double>(transport, static_cast<const double*>(sched));
    const uint64_t sd = static_cast<uint64_t>(*static_cast<const int64_t*>(seed));
    const auto* pf = static_cast<const M*>(F);
    const auto* px = static_cast<const S*>(x);
    auto* xp = static_cast<S*>(x_prev);
    auto* zp = static_cast<S*>(z_prev);
    auto* out = static_cast<S*>(x_next);
    auto* oxh = static_cast<S*>(x_hat);
    auto* ozh = static_cast<S*>(z_hat);
    const bool hats = x_hat != nullptr;
    const uint32_t st = static_cast<uint32_t>(step);
    if (mode == kExtrapolOff) step_dispatch<kExtrapolOff>(k, hats, sd, st, pf, px, xp, zp, out, oxh, ozh, n);
    else if (mode == kExtrapolRecord) step_dispatch<kExtrapolRecord>(k, hats, sd, st, pf, px, xp, zp, out, oxh, ozh, n);
    else step_dispatch<kExtrapolApply>(k, hats, sd, st, pf, px, xp, zp, out, oxh, ozh, n);
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
      alignas(64) uint32_t w[4][kBlock / 4];
      uint32_t* o = static_cast<uint32_t*>(out);
      for (int64_t b = i0; b < i1; b += kBlock) {
        const int64_t e = std::min(i1, b + kBlock);
        fill_words(sd, static_cast<uint32_t>(step), b / 4, (e - b + 3) / 4, w);
        for (int64_t i = b; i < e; ++i) o[i] = w[i % 4][(i - b) / 4];
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

UCGM_NAMESPACE_END
