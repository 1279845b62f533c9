// Why did interpolate / decode / coefficients reach 87-91% of copy bandwidth at 64M float32 on an
// H100 where torch.compile's Triton kernels reach 97-99% (benchmarks/results/nvidia-h100_notes.md)?
// This standalone program times the shipped kernels (linked from csrc/cuda/transport_ops.cu)
// against variants that change one thing each, on the same math (csrc/ucgm/transport.h):
//   stride64 8/SM   grid-stride loop, 8 blocks per SM, 64-bit indices (the launches until 81a8d40)
//   stride64 wave   the same kernel, one wave of resident blocks (the launches of 81a8d40)
//   stride64 cover  the same kernel, blocks enough to cover the data once (the shipped launches)
//   flat64    one 16-byte vector per thread, a grid that covers the tensor once, 64-bit indices
//   flat32    flat64 with 32-bit indices (a 64-bit division by row_size costs ~70 instructions)
//   flat32x2  flat32 with two vectors per thread, both loaded before any arithmetic
//   flat32cs  flat32 with streaming (evict-first) stores
// plus kernels with the same traffic and no arithmetic (the achievable ceiling) and
// cudaMemcpyAsync (the copy the benchmark's % copy is measured against). Every variant's output
// is compared bit for bit with the shipped op's (outputs poisoned with NaN first).
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr --fmad=false -arch=sm_90 -DUCGM_WITH_CUDA -Icsrc \
//        benchmarks/cuda_mix_variants.cu csrc/cuda/transport_ops.cu -o /tmp/mix_variants && /tmp/mix_variants
// (scripts/gpu_check.sh's `variants` stage does this.) Measured on an H100 (2026-11-27, 163d6a0,
// benchmarks/results/nvidia-h100_variants.txt), % of cudaMemcpyAsync: the looping kernels 95-96%
// for interpolate (8/SM and one wave alike: this variant fits 8 blocks an SM) and the shipped
// coefficients 90-92%; every covering-grid variant 97-101%, as the no-arithmetic kernels. Index
// width, two vectors per thread and streaming stores changed nothing. So the launches now cover the
// data once; prediction: the shipped rows match "stride64 cover" and flat64.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ucgm/transport.h"
#include "ucgm/transport_ops.h"
#include "cuda/launch.cuh"

using namespace ucgm;

#define CHECK(call)                                                                              \
  do {                                                                                           \
    cudaError_t err_ = (call);                                                                   \
    if (err_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace {

constexpr int kBlock = 256;
constexpr int V = 4;  // floats per 16-byte access
using F4 = Vec<float, V>;

// ---- interpolate (kInterp): (x, z) -> (x_t, target), one time per row -------------------------

__device__ __forceinline__ void stcs4(float* p, const F4& v) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(v.x[0], v.x[1], v.x[2], v.x[3]));
}

// kStream: streaming (evict-first) stores instead of plain ones.
template <typename I, bool kStream = false>
__device__ __forceinline__ void mix_one(const float* x, const float* z, const float* t, float* o1, float* o2,
                                        I i, I row_size, int transport) {
  const Mat2<float> m = mix_matrix<float>(transport, kInterp, t[i / row_size]);
  const F4 a = vload<float, V>(x, i), b = vload<float, V>(z, i);
  F4 r1, r2;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    r1.x[k] = m.a * a.x[k] + m.b * b.x[k];
    r2.x[k] = m.c * a.x[k] + m.d * b.x[k];
  }
  if (kStream) {
    stcs4(o1 + i, r1);
    stcs4(o2 + i, r2);
  } else {
    vstore<float, V>(o1, i, r1);
    vstore<float, V>(o2, i, r2);
  }
}

__global__ void mix_stride64(const float* __restrict__ x, const float* __restrict__ z, const float* __restrict__ t,
                             float* __restrict__ o1, float* __restrict__ o2, int64_t n, int64_t row_size, int tr) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += step)
    mix_one<int64_t>(x, z, t, o1, o2, i, row_size, tr);
}

__global__ void mix_flat64(const float* __restrict__ x, const float* __restrict__ z, const float* __restrict__ t,
                           float* __restrict__ o1, float* __restrict__ o2, int64_t n, int64_t row_size, int tr) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i < n) mix_one<int64_t>(x, z, t, o1, o2, i, row_size, tr);
}

__global__ void mix_flat32(const float* __restrict__ x, const float* __restrict__ z, const float* __restrict__ t,
                           float* __restrict__ o1, float* __restrict__ o2, int n, int row_size, int tr) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i < n) mix_one<int>(x, z, t, o1, o2, i, row_size, tr);
}

// Two vectors per thread, a block's threads first covering one block-wide span then the next (so
// each load instruction stays coalesced), all four loads issued before the arithmetic.
__global__ void mix_flat32x2(const float* __restrict__ x, const float* __restrict__ z, const float* __restrict__ t,
                             float* __restrict__ o1, float* __restrict__ o2, int n, int row_size, int tr) {
  const int i0 = (blockIdx.x * 2 * blockDim.x + threadIdx.x) * V, i1 = i0 + blockDim.x * V;
  if (i1 >= n) {  // the tail block (n is a multiple of V)
    if (i0 < n) mix_one<int>(x, z, t, o1, o2, i0, row_size, tr);
    return;
  }
  const F4 a0 = vload<float, V>(x, i0), b0 = vload<float, V>(z, i0);
  const F4 a1 = vload<float, V>(x, i1), b1 = vload<float, V>(z, i1);
  const Mat2<float> m0 = mix_matrix<float>(tr, kInterp, t[i0 / row_size]);
  const Mat2<float> m1 = mix_matrix<float>(tr, kInterp, t[i1 / row_size]);
  F4 r1, r2, s1, s2;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    r1.x[k] = m0.a * a0.x[k] + m0.b * b0.x[k];
    r2.x[k] = m0.c * a0.x[k] + m0.d * b0.x[k];
    s1.x[k] = m1.a * a1.x[k] + m1.b * b1.x[k];
    s2.x[k] = m1.c * a1.x[k] + m1.d * b1.x[k];
  }
  vstore<float, V>(o1, i0, r1);
  vstore<float, V>(o2, i0, r2);
  vstore<float, V>(o1, i1, s1);
  vstore<float, V>(o2, i1, s2);
}

__global__ void mix_flat32cs(const float* __restrict__ x, const float* __restrict__ z, const float* __restrict__ t,
                             float* __restrict__ o1, float* __restrict__ o2, int n, int row_size, int tr) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i < n) mix_one<int, true>(x, z, t, o1, o2, i, row_size, tr);
}

// Same traffic, no arithmetic: reads two streams, writes two (o1 = x, o2 = z).
__global__ void move2_flat32(const float* __restrict__ x, const float* __restrict__ z, float* __restrict__ o1,
                             float* __restrict__ o2, int n) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i >= n) return;
  vstore<float, V>(o1, i, vload<float, V>(x, i));
  vstore<float, V>(o2, i, vload<float, V>(z, i));
}

// ---- coefficients: t -> four outputs ----------------------------------------------------------

template <bool kStream>
__global__ void coef_flat32(const float* __restrict__ t, int n, int tr, float* __restrict__ ai, float* __restrict__ gi,
                            float* __restrict__ at, float* __restrict__ gt) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i >= n) return;
  const F4 tv = vload<float, V>(t, i);
  F4 a, b, c, d;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const Coeffs<float> q = coefficients<float>(tr, tv.x[k]);
    a.x[k] = q.alpha_in, b.x[k] = q.gamma_in, c.x[k] = q.alpha_to, d.x[k] = q.gamma_to;
  }
  if (kStream) {
    stcs4(ai + i, a), stcs4(gi + i, b), stcs4(at + i, c), stcs4(gt + i, d);
  } else {
    vstore<float, V>(ai, i, a), vstore<float, V>(gi, i, b), vstore<float, V>(at, i, c), vstore<float, V>(gt, i, d);
  }
}

// Same traffic, no arithmetic: reads one stream, writes it to four.
__global__ void move4_flat32(const float* __restrict__ t, int n, float* __restrict__ ai, float* __restrict__ gi,
                             float* __restrict__ at, float* __restrict__ gt) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i >= n) return;
  const F4 v = vload<float, V>(t, i);
  vstore<float, V>(ai, i, v), vstore<float, V>(gi, i, v), vstore<float, V>(at, i, v), vstore<float, V>(gt, i, v);
}

// ---- timing ---------------------------------------------------------------------------------------

struct Timer {
  void* flush = nullptr;
  size_t flush_bytes = 0;
  cudaEvent_t start, stop;
  Timer() {
    int dev = 0, l2 = 0;
    CHECK(cudaGetDevice(&dev));
    CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    flush_bytes = std::max<size_t>(size_t(l2) * 4, size_t(64) << 20);  // more than the L2 holds
    CHECK(cudaMalloc(&flush, flush_bytes));
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
  }
  // Median ms of `repeats` calls, the L2 overwritten (untimed) before each.
  float median_ms(const std::function<void()>& launch, int repeats = 25) {
    for (int w = 0; w < 3; ++w) launch();
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int r = 0; r < repeats; ++r) {
      CHECK(cudaMemsetAsync(flush, r & 0xff, flush_bytes));
      CHECK(cudaEventRecord(start));
      launch();
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      CHECK(cudaGetLastError());
      float t = 0;
      CHECK(cudaEventElapsedTime(&t, start, stop));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

std::vector<float> to_host(const float* d, size_t n) {
  std::vector<float> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  return h;
}

__global__ void fill_random(float* p, int n, uint32_t seed, float lo, float hi) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t h = uint32_t(i) * 2654435761u ^ seed;  // a cheap hash: inputs are never zeros
  h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
  p[i] = lo + (hi - lo) * (float(h >> 8) * (1.0f / 16777216.0f));
}

struct Row {
  std::string name;
  float ms;
  double bytes;
  int same;  // 1 bit-equal to the shipped op, 0 different, -1 not compared (no arithmetic)
};

void print_rows(const char* title, const std::vector<Row>& rows, double copy_gbps) {
  std::printf("\n%s\n%-34s %9s %9s %7s  %s\n", title, "variant", "ms", "GB/s", "% copy", "bits vs shipped");
  for (const Row& r : rows) {
    const double gbps = r.bytes / (r.ms * 1e-3) / 1e9;
    std::printf("%-34s %9.4f %9.1f %6.1f%%  %s\n", r.name.c_str(), r.ms, gbps, 100 * gbps / copy_gbps,
                r.same < 0 ? "-" : r.same ? "equal" : "DIFFERENT");
  }
}

}  // namespace

int main() {
  int dev = 0, sms = 0;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int rows = 256, row_size = 4 * 256 * 256, n = rows * row_size;  // 64M float32, as the benchmark
  std::printf("%s, %d SMs, L2 %d MB; %d x %d float32 (%d elements)\n", prop.name, sms, prop.l2CacheSize >> 20, rows,
              row_size, n);
  const size_t bytes = size_t(n) * sizeof(float);
  float *x, *z, *t, *tn, *o1, *o2, *r1, *r2, *c[4];
  for (float** p : {&x, &z, &o1, &o2, &r1, &r2, &tn, &c[0], &c[1], &c[2], &c[3]}) CHECK(cudaMalloc(p, bytes));
  CHECK(cudaMalloc(&t, rows * sizeof(float)));
  const int fill_grid = (n + kBlock - 1) / kBlock;
  fill_random<<<fill_grid, kBlock>>>(x, n, 1, -2.f, 2.f);
  fill_random<<<fill_grid, kBlock>>>(z, n, 2, -2.f, 2.f);
  fill_random<<<fill_grid, kBlock>>>(tn, n, 3, 0.05f, 0.95f);  // per-element times for coefficients
  fill_random<<<1, kBlock>>>(t, rows, 4, 0.05f, 0.95f);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  Timer timer;

  // The copy the benchmark's % copy refers to: n floats read + n written.
  const float copy_ms = timer.median_ms([&] { CHECK(cudaMemcpyAsync(o1, x, bytes, cudaMemcpyDeviceToDevice)); });
  const double copy_gbps = 2.0 * bytes / (copy_ms * 1e-3) / 1e9;
  std::printf("cudaMemcpyAsync: %.4f ms, %.1f GB/s (read + write)\n", copy_ms, copy_gbps);

  const int g1 = n / (kBlock * V), g2 = (n + 2 * kBlock * V - 1) / (2 * kBlock * V);
  const int gs = std::min<int64_t>(int64_t(sms) * 8, g1);
  int resident = 0;  // blocks of mix_stride64 that fit on an SM at once
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, mix_stride64, kBlock, 0));
  const int gw = std::min<int64_t>(int64_t(sms) * resident, g1);
  std::printf("mix_stride64: %d blocks of %d threads resident per SM: 8/SM grid %d, one-wave grid %d\n", resident,
              kBlock, gs, gw);
  for (int tr : {int(kLinear), int(kEDM)}) {
    // Shipped op first: its outputs are the reference bits.
    auto shipped = [&] { CHECK(cudaError_t(mix_cuda(kFloat32, x, z, t, 1, r1, r2, rows, row_size, tr, kInterp, nullptr))); };
    shipped();
    CHECK(cudaDeviceSynchronize());
    const std::vector<float> ref1 = to_host(r1, n), ref2 = to_host(r2, n);
    auto same_as_shipped = [&](const std::function<void()>& launch) {
      CHECK(cudaMemset(o1, 0xff, bytes));  // NaN: an unwritten element cannot match
      CHECK(cudaMemset(o2, 0xff, bytes));
      launch();
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      return int(std::memcmp(to_host(o1, n).data(), ref1.data(), bytes) == 0 &&
                 std::memcmp(to_host(o2, n).data(), ref2.data(), bytes) == 0);
    };
    std::vector<std::pair<std::string, std::function<void()>>> variants = {
        {"stride64 8/SM (until 81a8d40)", [&] { mix_stride64<<<gs, kBlock>>>(x, z, t, o1, o2, n, row_size, tr); }},
        {"stride64 wave (81a8d40)", [&] { mix_stride64<<<gw, kBlock>>>(x, z, t, o1, o2, n, row_size, tr); }},
        {"stride64 cover (shipped)", [&] { mix_stride64<<<g1, kBlock>>>(x, z, t, o1, o2, n, row_size, tr); }},
        {"flat64", [&] { mix_flat64<<<g1, kBlock>>>(x, z, t, o1, o2, n, row_size, tr); }},
        {"flat32", [&] { mix_flat32<<<g1, kBlock>>>(x, z, t, o1, o2, n, row_size, tr); }},
        {"flat32x2", [&] { mix_flat32x2<<<g2, kBlock>>>(x, z, t, o1, o2, n, row_size, tr); }},
        {"flat32cs", [&] { mix_flat32cs<<<g1, kBlock>>>(x, z, t, o1, o2, n, row_size, tr); }},
    };
    std::vector<Row> out = {{"shipped ucgm::mix_cuda", timer.median_ms(shipped), 4.0 * bytes, 1}};
    for (auto& [name, launch] : variants) {
      const int same = same_as_shipped(launch);
      out.push_back({name, timer.median_ms(launch), 4.0 * bytes, same});
    }
    out.push_back({"move2_flat32 (no arithmetic)",
                   timer.median_ms([&] { move2_flat32<<<g1, kBlock>>>(x, z, o1, o2, n); }), 4.0 * bytes, -1});
    print_rows(tr == kLinear ? "interpolate, Linear (read 2 streams, write 2)" : "interpolate, EDM", out, copy_gbps);
  }

  for (int tr : {int(kLinear), int(kEDM)}) {
    auto shipped = [&] { CHECK(cudaError_t(coefficients_cuda(kFloat32, tn, n, tr, c[0], c[1], c[2], c[3], nullptr))); };
    shipped();
    CHECK(cudaDeviceSynchronize());
    std::vector<std::vector<float>> ref;
    for (float* p : c) ref.push_back(to_host(p, n));
    float* o[4] = {o1, o2, r1, r2};  // the mix buffers, reused
    auto same_as_shipped = [&](const std::function<void()>& launch) {
      for (float* p : o) CHECK(cudaMemset(p, 0xff, bytes));
      launch();
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      for (int k = 0; k < 4; ++k)
        if (std::memcmp(to_host(o[k], n).data(), ref[k].data(), bytes) != 0) return 0;
      return 1;
    };
    auto plain = [&] { coef_flat32<false><<<g1, kBlock>>>(tn, n, tr, o[0], o[1], o[2], o[3]); };
    auto stream = [&] { coef_flat32<true><<<g1, kBlock>>>(tn, n, tr, o[0], o[1], o[2], o[3]); };
    std::vector<Row> out = {{"shipped ucgm::coefficients_cuda", timer.median_ms(shipped), 5.0 * bytes, 1}};
    out.push_back({"flat32", timer.median_ms(plain), 5.0 * bytes, same_as_shipped(plain)});
    out.push_back({"flat32cs", timer.median_ms(stream), 5.0 * bytes, same_as_shipped(stream)});
    out.push_back({"move4_flat32 (no arithmetic)",
                   timer.median_ms([&] { move4_flat32<<<g1, kBlock>>>(tn, n, o[0], o[1], o[2], o[3]); }), 5.0 * bytes,
                   -1});
    print_rows(tr == kLinear ? "coefficients, Linear (read 1 stream, write 4)" : "coefficients, EDM", out, copy_gbps);
  }
  return 0;
}
