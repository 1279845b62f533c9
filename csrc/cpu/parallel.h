// Row-aware OpenMP partitioning shared by the CPU kernels: the flat range rows*row_size is split
// evenly over threads (so one huge row and many small rows both use every core), and each thread
// walks its slice one row segment at a time, so per-row work (the coefficients of t[row]) is done
// once per segment and the inner loop over elements stays vectorizable.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../ucgm/common.h"
#include "../ucgm/transport.h"

UCGM_NAMESPACE_BEGIN

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

// done() runs on each thread after its last segment, inside the parallel region (stream_fence).
template <typename F, typename Done>
void for_each_row_segment(int64_t rows, int64_t row_size, F&& f, Done&& done) {
  const int64_t n = rows * row_size;
  if (n <= 0) return;
#ifdef _OPENMP
#pragma omp parallel if (n >= kParallelGrain)
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
  {
    const int64_t nt = 1, id = 0;
#endif
    // Slice boundaries on 64-element multiples keep threads off each other's cache lines.
    const int64_t begin = std::min(n, (n * id / nt) & ~int64_t(63));
    const int64_t end = id == nt - 1 ? n : std::min(n, (n * (id + 1) / nt) & ~int64_t(63));
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / row_size;
      const int64_t stop = std::min(end, (row + 1) * row_size);
      f(row, i, stop);
      i = stop;
    }
    done();
  }
}

template <typename F>
void for_each_row_segment(int64_t rows, int64_t row_size, F&& f) {
  for_each_row_segment(rows, row_size, f, [] {});
}

// Calls f(std::integral_constant<int, v>{}) for a runtime v in [0, N): a loop written inside f is
// compiled once per value, so per-row switches (transport, enhance rule) fold away and the loop
// vectorizes. v outside [0, N) calls nothing: callers validate first.
template <typename F, int... Vs>
void with_constant_of(int v, F&& f, std::integer_sequence<int, Vs...>) {
  ((v == Vs ? (f(std::integral_constant<int, Vs>{}), true) : false) || ...);
}

template <int N, typename F>
void with_constant(int v, F&& f) { with_constant_of(v, f, std::make_integer_sequence<int, N>{}); }

template <typename F>
void with_transport(int transport, F&& f) { with_constant<kNumTransports>(transport, f); }

// A zeroed scratch array. Not std::vector: the linker keeps one copy of each std:: template member
// for the whole module, and the AVX2 build's copy could then serve the baseline build
// (cmake/check_isa_symbols.cmake); this class lives in the build's own namespace.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : p_(static_cast<T*>(std::calloc(n > 0 ? n : 1, sizeof(T)))) {
    if (!p_) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }
  T& operator[](int64_t i) { return p_[i]; }

 private:
  T* p_;
};

// A zeroed scratch array of per_thread elements for each thread of the parallel regions to come,
// allocated before them: an exception (std::bad_alloc) must not leave an OpenMP region, where it
// would end the process instead of reaching Python as a MemoryError.
template <typename T>
class ThreadScratch {
 public:
  explicit ThreadScratch(int64_t per_thread) : per_(per_thread), all_(per_thread * max_threads()) {}
  T* mine() {  // this thread's part; call inside the region
#ifdef _OPENMP
    return all_.data() + per_ * omp_get_thread_num();
#else
    return all_.data();
#endif
  }

 private:
  static int64_t max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }
  int64_t per_;
  Scratch<T> all_;
};

// Calls f(S{}, C{}) with the storage type S of dtype and its compute type C.
template <typename F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{}, float{});
    case kFloat64: return f(double{}, double{});
    case kFloat16: return f(Half{}, float{});
    case kBFloat16: return f(BFloat16{}, float{});
    default: return kBadArgument;
  }
}

UCGM_NAMESPACE_END
