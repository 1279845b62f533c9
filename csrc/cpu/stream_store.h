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
#include <atomic>
#include <cstdint>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../ucgm/common.h"

namespace ucgm {
// The streaming threshold in bytes, one for every instruction-set build (defined in bindings.cpp,
// where set_cpu_stream_min_bytes changes it for tests and benchmarks). By default half this VM's
// 32 MiB L3: smaller outputs stay cached for whoever reads them next (the model reads x_t). A
// constant, not sysconf(_SC_LEVEL3_CACHE_SIZE): inside this VM that reports the host's 256 MiB.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;
extern std::atomic<int64_t> cpu_stream_min_bytes;
}  // namespace ucgm

UCGM_NAMESPACE_BEGIN

#if defined(__SSE2__)
constexpr bool kStreamingStores = true;
#else
constexpr bool kStreamingStores = false;
#endif

// Rows shorter than this (the contiguous runs a kernel writes per row) are written directly: a
// 64-byte row has no whole line to stream, and streaming rows of 16 float32 ran slower than not.
constexpr int64_t kStreamMinRowBytes = 256;

// Whether a kernel streams the outputs out[0..K): out_bytes of them in all (at least the
// threshold), rows of row_bytes, every output starting on a cache line (fresh torch allocations
// are 64-byte aligned). Loops bound by arithmetic do not ask: streamed a line at a time, the
// transcendental coefficients ran 1.2-1.6x slower (4M float32, medians of 40 interleaved calls:
// TrigFlow 5.3 -> 6.8 ms, EDM 5.1 -> 8.2 ms, Random 5.8 -> 7.1 ms). bfloat16 interpolate, bound by
// its conversions, neither gained nor lost.
template <int K, typename S>
bool streamable(S* const (&out)[K], int64_t out_bytes, int64_t row_bytes) {
  if (!kStreamingStores || row_bytes < kStreamMinRowBytes ||
      out_bytes < cpu_stream_min_bytes.load(std::memory_order_relaxed))
    return false;
  for (int k = 0; k < K; ++k)
    if (reinterpret_cast<uintptr_t>(out[k]) % 64 != 0) return false;
  return true;
}

// Calls body(j, len, o) over [i0, i1) in pieces, where o[k][0 .. len) are to receive output k's
// elements [j, j + len): out[k] + j itself, or, when stream (streamable(out, ...)), a one-line
// buffer that is then streamed to it. The lines have len an std::integral_constant, so their loop
// unrolls; the partial lines at the ends are written directly. The caller ends each thread's
// streamed work with stream_fence().
template <int K, typename S, typename Body>
void write_outputs(bool stream, S* const (&out)[K], int64_t i0, int64_t i1, Body&& body) {
  S* o[K];
  for (int k = 0; k < K; ++k) o[k] = out[k] + i0;
#if defined(__SSE2__)
  constexpr int64_t kLine = 64 / int64_t(sizeof(S));
  static_assert(64 % sizeof(S) == 0, "an element must not straddle a cache line");
  const int64_t a = std::min(i1, (i0 + kLine - 1) / kLine * kLine), b = std::max(a, i1 / kLine * kLine);
  if (stream && b > a) {
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
    return;
  }
#endif
  (void)stream;
  body(i0, i1 - i0, o);
}

// Streaming stores are weakly ordered: a thread fences once after its last one, before it leaves
// the parallel region (after which other threads and the caller read the outputs). Once per
// thread, not per row: a fence per row made interpolate of 4M float32 1.3x (rows of 256) to 3.8x
// (rows of 16) slower.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

UCGM_NAMESPACE_END
