// Non-temporal ("streaming") stores for outputs larger than the last-level cache. A regular store
// to a line that is not cached first reads the line (read-for-ownership), so an output written
// that way costs two passes over memory; a streaming store writes the whole line without the read.
// write_outputs keeps the kernels' loops over the shared math: it runs the loop one cache line of
// outputs at a time into a buffer that stays in registers or L1, and streams each line out, so
// the arithmetic of the next line overlaps the stores of the last.
// Measured on this project's 2-core VM, 4M float32, medians of 60 interleaved calls (cache
// flushed): interpolate 4.29 -> 3.17 ms, decode 4.10 -> 2.91 ms, Linear coefficients 5.45 ->
// 3.73 ms. Staging 1 KiB per output instead of a line gained half as much: the arithmetic and
// the stores then take turns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../ucgm/common.h"

UCGM_NAMESPACE_BEGIN

// An op streams when its outputs together reach this size: half this VM's 32 MiB L3. Smaller
// outputs stay cached for whoever reads them next (the model reads x_t). A constant, not
// sysconf(_SC_LEVEL3_CACHE_SIZE): inside this VM that reports the host's 256 MiB.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

// Whether outputs of out_bytes in all are to be streamed (never off x86). Callers whose loop is
// bound by arithmetic do not ask: streamed a line at a time, the transcendental coefficients ran
// 1.2-1.6x slower (4M float32, medians of 40 interleaved calls: TrigFlow 5.3 -> 6.8 ms, EDM 5.1 ->
// 8.2 ms, Random 5.8 -> 7.1 ms). bfloat16 interpolate, bound by its conversions, neither gained nor lost.
inline bool worth_streaming(int64_t out_bytes) {
#if defined(__SSE2__)
  return out_bytes >= kStreamMinBytes;
#else
  (void)out_bytes;
  return false;
#endif
}

// Calls body(j, len, o) over [i0, i1) in pieces, where o[k][0 .. len) are to receive output k's
// elements [j, j + len): out[k] + j itself, or a one-line buffer that is then streamed to it. The
// lines have len an std::integral_constant, so their loop unrolls. Streaming takes outputs that
// start on a cache line (fresh torch allocations are 64-byte aligned); others are written directly.
template <int K, typename S, typename Body>
void write_outputs(bool stream, S* const (&out)[K], int64_t i0, int64_t i1, Body&& body) {
  S* o[K];
  for (int k = 0; k < K; ++k) o[k] = out[k] + i0;
#if defined(__SSE2__)
  constexpr int64_t kLine = 64 / int64_t(sizeof(S));
  static_assert(64 % sizeof(S) == 0, "an element must not straddle a cache line");
  const int64_t a = std::min(i1, (i0 + kLine - 1) / kLine * kLine), b = std::max(a, i1 / kLine * kLine);
  bool aligned = true;
  for (int k = 0; k < K; ++k) aligned &= reinterpret_cast<uintptr_t>(out[k]) % 64 == 0;
  if (stream && aligned && b > a) {
    body(i0, a - i0, o);  // the partial line before the first full one
    alignas(64) S line[K][kLine];
    S* l[K];
    for (int k = 0; k < K; ++k) l[k] = line[k];
    for (int64_t j = a; j < b; j += kLine) {
      body(j, std::integral_constant<int64_t, kLine>{}, l);
      for (int k = 0; k < K; ++k) {
        __m128i* d = reinterpret_cast<__m128i*>(out[k] + j);
        const __m128i* s = reinterpret_cast<const __m128i*>(line[k]);
        for (int q = 0; q < 4; ++q) _mm_stream_si128(d + q, _mm_load_si128(s + q));
      }
    }
    for (int k = 0; k < K; ++k) o[k] = out[k] + b;
    body(b, i1 - b, o);  // the partial line after the last full one
    // Streaming stores are weakly ordered: the fence makes them visible before the thread leaves
    // the parallel region (after which other threads and the caller read the outputs).
    _mm_sfence();
    return;
  }
#endif
  body(i0, i1 - i0, o);
}

UCGM_NAMESPACE_END
