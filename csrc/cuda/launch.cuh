// CUDA-side counterparts of cpu/parallel.h: storage types per dtype code, device loads/stores of
// the 16-bit formats, and the grid size of elementwise launches.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../ucgm/common.h"

namespace ucgm {

template <typename C> __device__ __forceinline__ C load(__half v) { return static_cast<C>(__half2float(v)); }
template <typename C> __device__ __forceinline__ C load(__nv_bfloat16 v) { return static_cast<C>(__bfloat162float(v)); }
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(S{}, C{}) with the device storage type S of dtype and its compute type C.
template <typename F>
int dispatch_dtype_cuda(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{}, float{});
    case kFloat64: return f(double{}, double{});
    case kFloat16: return f(__half{}, float{});
    case kBFloat16: return f(__nv_bfloat16{}, float{});
    default: return kBadArgument;
  }
}

// Grid-stride kernels get enough blocks to cover their work once: each thread runs one iteration,
// and the loop only matters past the grid's limit. Measured on an H100 at 64M float32 elements
// (benchmarks/cuda_mix_variants.cu; benchmarks/results/nvidia-h100_variants.txt): with one wave of
// resident blocks looping over the data, interpolate reached 95-96% of cudaMemcpyAsync and
// coefficients 90-92%; one-pass kernels covering the data once with the same arithmetic reached
// 101% and 97%, as the no-arithmetic kernels did. torch's and Triton's elementwise kernels launch
// so too.
inline int grid_size(int64_t work_items, int block) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, (work_items + block - 1) / block), 0x7fffffff));
}

// Whether p (null counts: an absent optional output) may be read and written as Vec<T, V>.
template <typename T, int V> inline bool vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

// Launch errors are reported; a kernel's asynchronous faults surface at the next synchronizing call.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

template <typename S, int V> struct alignas(sizeof(S) * V) Vec { S x[V]; };

// Elements i .. i + V - 1 in one access (p + i aligned for Vec<S, V>: see vec_aligned).
template <typename S, int V>
__device__ __forceinline__ Vec<S, V> vload(const S* p, int64_t i) {
  return *reinterpret_cast<const Vec<S, V>*>(p + i);
}
template <typename S, int V>
__device__ __forceinline__ void vstore(S* p, int64_t i, const Vec<S, V>& v) {
  *reinterpret_cast<Vec<S, V>*>(p + i) = v;
}

// V consecutive elements into (out of) a register array: one wide access when kWide, else V
// scalar ones of which only the first `count` happen (a ragged tail).
template <bool kWide, typename S, int V>
__device__ __forceinline__ void load_vec(const S* p, S (&v)[V], int count) {
  if (kWide) {
    const Vec<S, V> w = vload<S, V>(p, 0);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = w.x[k];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) if (k < count) v[k] = p[k];
  }
}
template <bool kWide, typename S, int V>
__device__ __forceinline__ void store_vec(S* p, const S (&v)[V], int count) {
  if (kWide) {
    Vec<S, V> w;
#pragma unroll
    for (int k = 0; k < V; ++k) w.x[k] = v[k];
    vstore<S, V>(p, 0, w);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) if (k < count) p[k] = v[k];
  }
}

}  // namespace ucgm
