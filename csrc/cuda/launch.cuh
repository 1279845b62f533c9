// CUDA-side counterparts of cpu/parallel.h: storage types per dtype code, device loads/stores of
// the 16-bit formats, and a grid size that covers the device without oversubscribing it.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

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

// Grid-stride kernels: one full wave, i.e. as many blocks of this kernel as the device holds at once
// (SMs x resident blocks per SM, which its register use decides), never more than the work needs.
// A fixed 8 blocks per SM ran a second, partly empty wave for kernels of which fewer fit: at 40
// registers a thread, 6 blocks of 256 threads fit on an SM, so a third of the SMs' slots sat idle
// through the last quarter of a 64M-element op (86-91% of copy on an H100; the sampler step, whose
// 4 resident blocks divide 8, reached 91-96%).
inline int grid_size(const void* kernel, int64_t work_items, int block) {
  // Per (device, kernel, block size), filled on first use; locked because the binding releases the
  // GIL, so two host threads may launch at once.
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, int> waves;
  int dev = 0;
  cudaGetDevice(&dev);
  int wave = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(dev, kernel, block);
    const auto it = waves.find(key);
    if (it != waves.end()) {
      wave = it->second;
    } else {
      int sms = 0, resident = 0;
      const bool ok = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
                      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, block, 0) == cudaSuccess &&
                      sms > 0 && resident > 0;
      if (ok) {
        wave = waves[key] = sms * resident;
      } else {  // not kept: asked again next launch
        cudaGetLastError();  // clear the query's error: the launch reports its own
        wave = (sms > 0 ? sms : 132) * 8;
      }
    }
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wave, (work_items + block - 1) / block)));
}

template <typename Kernel> inline int grid_size(Kernel* kernel, int64_t work_items, int block) {
  return grid_size(reinterpret_cast<const void*>(kernel), work_items, block);
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
