// Shared by the CPU (.cpp) and CUDA (.cu) kernels: the host/device qualifier, the dtype
// codes the Python layer passes, and float16/bfloat16 conversion that works on both sides.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define UCGM_HD __host__ __device__ __forceinline__
#else
#define UCGM_HD inline
#endif

namespace ucgm {

// Must match ucgm_fast/_dtypes.py.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Status codes returned by every op; the binding turns non-zero into a Python exception.
enum Status : int { kOk = 0, kBadArgument = 1, kNoCuda = 2 };

#ifdef UCGM_WITH_CUDA
// Text of a cudaError_t value returned by a CUDA op (cuda/runtime.cu).
const char* cuda_error_string(int code);
#endif

// Storage types for the two 16-bit formats on the host. On the device the kernels use
// __half / __nv_bfloat16 and the hardware conversions instead (see cuda/dispatch.cuh).
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline uint32_t float_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }

// Round-to-nearest-even, NaN kept quiet: the same rounding torch uses for .to(bfloat16).
inline BFloat16 to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}
inline float from_bf16(BFloat16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

// IEEE binary16 <-> binary32, round-to-nearest-even, subnormals and inf/NaN handled.
inline float from_half(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // Subnormal: value = man * 2^-24, exact in float32.
    float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}
inline Half to_half(float f) {
  uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};        // NaN
  if (u >= 0x47800000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};       // >= 2^16 -> inf
  if (u < 0x38800000u) {                                                          // subnormal or zero
    // Adding 0.5 (2^-1) shifts the mantissa so the FPU does the rounding for us.
    float r = bits_float(u) + 0.5f;
    return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(float_bits(r) - 0x3f000000u))};
  }
  uint32_t man_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + man_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(u >> 13))};
}

// Loads widen a stored value to the compute type C; stores narrow it back.
template <typename C> UCGM_HD C load(float v) { return static_cast<C>(v); }
template <typename C> UCGM_HD C load(double v) { return static_cast<C>(v); }
template <typename S> UCGM_HD S store(float v);
template <typename S> UCGM_HD S store(double v);
template <> UCGM_HD float store<float>(float v) { return v; }
template <> UCGM_HD double store<double>(double v) { return v; }
#if !defined(__CUDACC__)  // host storage types; the CUDA side has its own (cuda/launch.cuh)
template <typename C> inline C load(Half v) { return static_cast<C>(from_half(v)); }
template <typename C> inline C load(BFloat16 v) { return static_cast<C>(from_bf16(v)); }
template <> inline Half store<Half>(float v) { return to_half(v); }
template <> inline BFloat16 store<BFloat16>(float v) { return to_bf16(v); }
#endif

// Fixed-size 2x2 matrix: every linear per-row op here (interpolate, decode and their adjoints)
// is out = M(t) [u; v] with M a function of the row's time only.
template <typename C> struct Mat2 { C a, b, c, d; };

}  // namespace ucgm
