// Counter-based noise shared by the CPU and CUDA kernels: Philox4x32-10 (Salmon et al., SC'11,
// "Parallel random numbers: as easy as 1, 2, 3") and a Box-Muller transform written with
// explicitly rounded float operations only, so a given (seed, step, element) gives the same
// normal on both sides.
//
// What is guaranteed
//   * The raw uint32 stream is bit-identical everywhere (integer arithmetic only); it matches the
//     published Random123 known-answer vectors.
//   * The normals are bit-identical on CPU and CUDA as well: the transform uses only IEEE
//     +, -, *, / and sqrt (correctly rounded on both sides: __f*_rn intrinsics on the device, plain
//     operators on the host) and no libm call (glibc and CUDA sinf/logf differ in the last ulp).
//     The one assumption is that the host compiler does not fuse a*b+c into an FMA in this code;
//     the pragmas in cpu/sampler_ops.cpp switch contraction off for that file.
//   * Each normal uses 24 bits of its uniform; its magnitude is at most sqrt(-2 ln 2^-24) = 5.77.
//
// Layout: element i of the noise of (seed, step) is lane i % 4 of
//   philox4x32_10(counter = {j mod 2^32, j >> 32, seed >> 32, 0}, key = {seed mod 2^32, step}),
//   j = i / 4; lanes (0, 1) and (2, 3) are Box-Muller pairs (radius from the even word, angle from
//   the odd word).
#pragma once

#include <cstdint>

#include "common.h"

UCGM_NAMESPACE_BEGIN

struct Philox4 { uint32_t v[4]; };

UCGM_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = uint64_t(a) * uint64_t(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds, the key bumped by the Weyl constants between rounds (Random123).
UCGM_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.v[2], &hi1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

// The four raw words for quad j of the stream (seed, step).
UCGM_HD Philox4 philox_quad(uint64_t seed, uint32_t step, uint64_t j) {
  return philox4x32_10(Philox4{{static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32),
                                static_cast<uint32_t>(seed >> 32), 0u}},
                       static_cast<uint32_t>(seed), step);
}

// Correctly rounded float operations that the compiler may not fuse or reassociate.
namespace rn {
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ float bits_to_float(uint32_t u) { return __uint_as_float(u); }
__device__ __forceinline__ uint32_t float_to_bits(float f) { return __float_as_uint(f); }
#else
inline float mul(float a, float b) { return a * b; }
inline float add(float a, float b) { return a + b; }
inline float sub(float a, float b) { return a - b; }
inline float div(float a, float b) { return a / b; }
inline float sqrt(float a) { return __builtin_sqrtf(a); }
inline float bits_to_float(uint32_t u) { return ucgm::bits_float(u); }
inline uint32_t float_to_bits(float f) { return ucgm::float_bits(f); }
#endif
}  // namespace rn

// ln(u) for u in (0, 1]: u = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(f / (2 + f)),
// f = m - 1 (exact), atanh by its odd series to s^9 (|s| <= 0.172: truncation below 1e-9).
UCGM_HD float noise_log(float u) {
  const uint32_t b = rn::float_to_bits(u);
  const float m0 = rn::bits_to_float((b & 0x007fffffu) | 0x3f800000u);
  // Selects, not branches: this vectorizes on the CPU and does not diverge on the GPU.
  // m0 > sqrt(2) compared on the bits (0x3fb504f3 = 1.41421356f; both positive): a float compare
  // may trap, which stops GCC from turning the selects below into vector blends.
  const bool big = ((b & 0x007fffffu) | 0x3f800000u) > 0x3fb504f3u;
  const float m0_half = rn::mul(m0, 0.5f);
  const float m = big ? m0_half : m0;
  const int e = static_cast<int>(b >> 23) - 127 + static_cast<int>(big);
  const float f = rn::sub(m, 1.0f);
  const float s = rn::div(f, rn::add(2.0f, f));
  const float s2 = rn::mul(s, s);
  float p = rn::add(0.142857143f, rn::mul(s2, 0.111111111f));
  p = rn::add(0.2f, rn::mul(s2, p));
  p = rn::add(0.333333343f, rn::mul(s2, p));
  const float s_2 = rn::mul(s, 2.0f);
  const float lnm = rn::add(s_2, rn::mul(s_2, rn::mul(s2, p)));
  return rn::add(rn::mul(static_cast<float>(e), 0.693147181f), lnm);
}

// (sin, cos) of 2 pi k / 2^24 for an integer 0 <= k < 2^24: the quadrant comes from k exactly, the
// remainder |a| <= pi/4 goes through Taylor polynomials (error below 3e-8).
UCGM_HD void noise_sincos(uint32_t k, float* s_out, float* c_out) {
  const uint32_t q = (k + (1u << 21)) >> 22;                       // nearest quarter turn, 0..4
  const int32_t r = static_cast<int32_t>(k) - static_cast<int32_t>(q << 22);  // in [-2^21, 2^21)
  const float a = rn::mul(static_cast<float>(r), 3.74507028e-7f);  // 2 pi / 2^24
  const float a2 = rn::mul(a, a);
  float ps = rn::add(-1.98412698e-4f, rn::mul(a2, 2.75573192e-6f));
  ps = rn::add(8.33333377e-3f, rn::mul(a2, ps));
  ps = rn::add(-0.166666672f, rn::mul(a2, ps));
  const float sn = rn::add(a, rn::mul(rn::mul(a, a2), ps));
  float pc = rn::add(-1.38888889e-3f, rn::mul(a2, 2.48015873e-5f));
  pc = rn::add(4.16666679e-2f, rn::mul(a2, pc));
  pc = rn::add(-0.5f, rn::mul(a2, pc));
  const float cs = rn::add(1.0f, rn::mul(a2, pc));
  // sin(a + q pi/2), cos(a + q pi/2) by selects: odd q swaps the pair; sin flips sign for
  // q = 2, 3, cos for q = 1, 2.
  const float s1 = (q & 1u) ? cs : sn, c1 = (q & 1u) ? sn : cs;
  *s_out = (q & 2u) ? -s1 : s1;
  *c_out = ((q + 1u) & 2u) ? -c1 : c1;
}

// The squared Box-Muller radius -2 ln u of a raw word, u = (24 high bits + 1) / 2^24 in (0, 1].
UCGM_HD float box_muller_r2(uint32_t w_r) {
  const float u = rn::mul(static_cast<float>((w_r >> 8) + 1u), 0x1p-24f);  // exact
  return rn::mul(-2.0f, noise_log(u));
}

// Box-Muller on two raw words: radius from w_r, angle from w_a (24 bits of each).
UCGM_HD void box_muller(uint32_t w_r, uint32_t w_a, float* n0, float* n1) {
  const float rad = rn::sqrt(box_muller_r2(w_r));
  float s, c;
  noise_sincos(w_a >> 8, &s, &c);
  *n0 = rn::mul(rad, c);
  *n1 = rn::mul(rad, s);
}

// The four standard normals of quad j of the stream (seed, step): elements 4j .. 4j+3.
UCGM_HD void philox_normal4(uint64_t seed, uint32_t step, uint64_t j, float out[4]) {
  const Philox4 w = philox_quad(seed, step, j);
  box_muller(w.v[0], w.v[1], &out[0], &out[1]);
  box_muller(w.v[2], w.v[3], &out[2], &out[3]);
}

UCGM_NAMESPACE_END
