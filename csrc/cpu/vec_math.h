// float32 exp, sin and cos as branch-free polynomials, so that a loop calling them vectorizes. A
// libm call keeps GCC from vectorizing its loop, and the per-element coefficients of the
// trigonometric and exponential transports then ran slower than eager PyTorch (whose sin / exp
// are vectorized) on 4M times. Accurate to about 1e-7 relative (Cephes' single-precision
// polynomials) inside their domain, |x| <= kVecMathMaxArg; callers check it and use libm outside.
// CPU only: the CUDA kernels keep the device's sinf / expf.
#pragma once

#include <cstdint>

#include "../ucgm/common.h"
#include "../ucgm/transport.h"

UCGM_NAMESPACE_BEGIN

// Domain of vexp / vsincos: 2^n stays a normal float, and the reduction by pi/2 stays exact.
constexpr float kVecMathMaxArg = 87.0f;

// x rounded to the nearest integer, for |x| < 2^22: adding 1.5 * 2^23 leaves no fraction bits.
// (Not folded away: without -ffast-math the compiler may not reassociate.)
inline float round_small(float x) { return (x + 12582912.0f) - 12582912.0f; }

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cephes expf).
inline float vexp(float x) {
  const float n = round_small(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 split so n * hi is exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

struct SinCos { float s, c; };

// sin and cos of x = r + n pi/2, r in [-pi/4, pi/4] (Cephes sinf / cosf polynomials).
inline SinCos vsincos(float x) {
  const float n = round_small(x * 0.636619772367581343f);
  // pi/2 in three parts, the first two short enough that n times them is exact.
  const float r = ((x - n * 1.5703125f) - n * 4.837512969970703125e-4f) - n * 7.54978995489188216e-8f;
  const float z = r * r;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  // Quadrant q = n mod 4: sin x is s, c, -s, -c and cos x is c, -s, -c, s.
  const int q = static_cast<int>(n) & 3;
  const float sa = (q & 1) ? c : s, ca = (q & 1) ? s : c;
  return {(q & 2) ? -sa : sa, ((q + 1) & 2) ? -ca : ca};
}

// The math policy of coefficients<C, M> (transport.h) for vectorized CPU loops: LibMath with the
// float sin / cos / exp above (sqrt, inlined under -fno-math-errno, and double stay LibMath's).
struct VecMath : LibMath {
  using LibMath::cos;
  using LibMath::exp;
  using LibMath::sin;
  static float sin(float x) { return vsincos(x).s; }
  static float cos(float x) { return vsincos(x).c; }
  static float exp(float x) { return vexp(x); }
};

UCGM_NAMESPACE_END
