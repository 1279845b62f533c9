// Runtime choice between the builds of the CPU kernels. CMake compiles csrc/cpu/*.cpp once per
// instruction set: "base" (the compiler's default target, SSE2 on x86-64) and, on x86-64, "avx2"
// (-mavx2: 8 floats per vector instead of 4; ops on 16-bit data run ~1.8x faster, fd_target 2.5x,
// float32 transport ops 1.1-1.2x). Each build defines its kernels in namespace ucgm::<isa>
// (common.h, UCGM_NAMESPACE_BEGIN). No FMA: both builds round every elementwise result identically, so
// the choice changes speed only (the loss's per-row sums may differ in the last bits: the vector
// width sets their order). cmake/check_isa_symbols.cmake fails the build if an AVX2 object defines
// a linker-merged symbol outside ucgm::avx2 (which the baseline build could end up calling).
// Included by the binding only.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../ucgm/objective_ops.h"
#include "../ucgm/sampler_ops.h"
#include "../ucgm/transport_ops.h"

// Every CPU entry point of ucgm/*_ops.h; each ISA namespace declares its copy with the same type.
#define UCGM_CPU_KERNELS(X)                                                                             \
  X(mix_cpu) X(coefficients_cpu) X(enhance_target_cpu) X(fd_inputs_cpu) X(fd_target_cpu) X(ucgm_loss_cpu) \
  X(ucgm_loss_backward_cpu) X(sampler_step_cpu) X(sampler_correct_cpu) X(philox_cpu)
#define UCGM_DECLARE_LIKE(f) decltype(::ucgm::f) f;

namespace ucgm {
namespace base { UCGM_CPU_KERNELS(UCGM_DECLARE_LIKE) }
#ifdef UCGM_CPU_AVX2
namespace avx2 { UCGM_CPU_KERNELS(UCGM_DECLARE_LIKE) }
#endif

enum CpuIsa : int { kIsaBase = 0, kIsaAvx2 = 1 };
constexpr const char* kIsaNames[] = {"base", "avx2"};

// Whether this build has and this CPU runs isa.
inline bool cpu_isa_supported(int isa) {
  if (isa == kIsaBase) return true;
#if defined(UCGM_CPU_AVX2)
  if (isa == kIsaAvx2) return __builtin_cpu_supports("avx2");  // also checks the OS saves the AVX state
#endif
  return false;
}

// The supported ISA called name ("base" / "avx2"), or -1 when it is unknown, not built or not run
// by this CPU.
inline int cpu_isa_named(const char* name) {
  for (int i : {kIsaBase, kIsaAvx2})
    if (name && std::strcmp(name, kIsaNames[i]) == 0 && cpu_isa_supported(i)) return i;
  return -1;
}

// The ISA the kernels run with: the UCGM_CPU_ISA environment variable's when supported, else the
// best supported one; the binding's set_cpu_isa changes it (tests, benchmarks).
inline std::atomic<int>& cpu_isa() {
  static std::atomic<int> isa([] {
    const int chosen = cpu_isa_named(std::getenv("UCGM_CPU_ISA"));
    if (chosen >= 0) return chosen;
    return cpu_isa_supported(kIsaAvx2) ? int(kIsaAvx2) : int(kIsaBase);
  }());
  return isa;
}

}  // namespace ucgm

// The build of CPU kernel f for the selected ISA.
#ifdef UCGM_CPU_AVX2
#define UCGM_CPU(f) (::ucgm::cpu_isa() == ::ucgm::kIsaAvx2 ? ::ucgm::avx2::f : ::ucgm::base::f)
#else
#define UCGM_CPU(f) (::ucgm::base::f)
#endif
