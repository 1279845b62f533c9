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

// The CPU kernel sources are compiled once per instruction set (cpu/isa.h), each build with
// UCGM_CPU_ISA naming it. Everything those builds instantiate from these headers then lives in an
// inline namespace of that name: otherwise the linker would keep one copy of each inline function
// and could hand the baseline build an AVX2 copy. Other sources (binding, CUDA) see plain ucgm::.
#ifdef UCGM_CPU_ISA
#define UCGM_NAMESPACE_BEGIN namespace ucgm { inline namespace UCGM_CPU_ISA {
#define UCGM_NAMESPACE_END } }
#else
#define UCGM_NAMESPACE_BEGIN namespace ucgm {
#define UCGM_NAMESPACE_END }
#endif

UCGM_NAMESPACE_BEGIN

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

// Round-to-nearest-even, NaN kept quiet: the same rounding torch uses for .to(bfloat16). Branch-free
// like to_half: both results are computed and one selected (NaN found by f != f, one vector compare).
inline BFloat16 to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return BFloat16{static_cast<uint16_t>(f != f ? (u >> 16) | 0x40u : rounded)};
}
inline float from_bf16(BFloat16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

// IEEE binary16 <-> binary32, round-to-nearest-even, subnormals and inf/NaN handled. Every case is
// computed and the answer selected, without branches, so loops over float16 data vectorize.
inline float from_half(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h.bits & 0x7fffu) << 13;  // exponent and mantissa, float-aligned
  const uint32_t exp = em & 0x0f800000u;
  // Normal: rebias the exponent by 127 - 15; inf/NaN: by 112 more, to the all-ones exponent.
  const uint32_t normal = em + (exp == 0x0f800000u ? 0x70000000u : 0x38000000u);
  // Zero or subnormal: man * 2^-24, exactly (2^-14 (1 + man 2^-10)) - 2^-14.
  const float sub = bits_float(em + 0x38800000u) - 6.103515625e-05f;
  return bits_float(sign | (exp == 0 ? float_bits(sub) : normal));
}
inline Half to_half(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // Normal: rebias the exponent (-112 << 23) and round to nearest even on the 13 dropped bits.
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  // Subnormal or zero: adding 0.5 (2^-1) shifts the mantissa so the FPU does the rounding.
  const uint32_t sub = float_bits(bits_float(u) + 0.5f) - 0x3f000000u;
  uint32_t r = u < 0x38800000u ? sub : normal;
  r = u >= 0x47800000u ? 0x7c00u : r;  // >= 2^16 -> inf
  r = u > 0x7f800000u ? 0x7e00u : r;   // NaN
  return Half{static_cast<uint16_t>(sign | r)};
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

UCGM_NAMESPACE_END
