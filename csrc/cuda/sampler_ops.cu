// CUDA kernels of the sampler ops. One thread owns one quad of 4 consecutive elements, the unit of
// one Philox call (philox.h), so each thread draws exactly the noise of its elements; grid-stride
// over quads. Step math comes from sampler.h, shared with the CPU kernels.
#include "../ucgm/philox.h"
#include "../ucgm/sampler.h"
#include "../ucgm/sampler_ops.h"
#include "launch.cuh"

namespace ucgm {
namespace {

constexpr int kBlock = 256;

template <typename F>
int dispatch_state_model_cuda(int state_dtype, int model_dtype, F&& f) {
  auto with_state = [&](auto s) { return dispatch_dtype_cuda(model_dtype, [&](auto m, auto) { return f(s, m); }); };
  if (state_dtype == kFloat32) return with_state(float{});
  if (state_dtype == kFloat64) return with_state(double{});
  return int(kBadArgument);
}

// kWide: n is a multiple of 4 and every pointer is aligned for a quad, so each of the thread's
// arrays moves in one access (16 bytes for a float32 state) and a warp reads 512 contiguous bytes;
// element by element, each load instruction would touch 4x the sectors it uses.
template <typename S, typename M, bool kWide>
__global__ void sampler_step_kernel(const M* __restrict__ F, const S* __restrict__ x, S* __restrict__ xp,
                                    S* __restrict__ zp, const double* __restrict__ sched,
                                    const int64_t* __restrict__ seed, int64_t n, int step, int transport,
                                    int mode, S* __restrict__ out, S* __restrict__ oxh, S* __restrict__ ozh) {
  const StepCoeffs<double> k = step_coeffs<double>(transport, sched);
  const uint64_t sd = static_cast<uint64_t>(*seed);
  const bool apply = mode == kExtrapolApply, record = mode != kExtrapolOff;
  const int64_t quads = (n + 3) / 4;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = 4 * q;
    const int count = static_cast<int>(n - i < 4 ? n - i : 4);
    float nz[4] = {0.f, 0.f, 0.f, 0.f};
    if (k.noise) philox_normal4(sd, static_cast<uint32_t>(step), static_cast<uint64_t>(q), nz);
    S xv[4] = {}, xpv[4] = {}, zpv[4] = {}, xo[4] = {}, xr[4] = {}, zr[4] = {}, zu[4] = {};
    M Fv[4] = {};
    load_vec<kWide>(x + i, xv, count);
    load_vec<kWide>(F + i, Fv, count);
    if (apply) {
      load_vec<kWide>(xp + i, xpv, count);
      load_vec<kWide>(zp + i, zpv, count);
    }
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const StepResult<double> r = step_element<double>(k, apply, double(xv[lane]), load<double>(Fv[lane]),
                                                        double(nz[lane]), double(xpv[lane]), double(zpv[lane]));
      xo[lane] = static_cast<S>(r.x_next);
      xr[lane] = static_cast<S>(r.x_raw);
      zr[lane] = static_cast<S>(r.z_raw);
      zu[lane] = static_cast<S>(r.z_used);
    }
    store_vec<kWide>(out + i, xo, count);
    if (record) {
      store_vec<kWide>(xp + i, xr, count);
      store_vec<kWide>(zp + i, zr, count);
    }
    if (oxh) store_vec<kWide>(oxh + i, xr, count);
    if (ozh) store_vec<kWide>(ozh + i, zu, count);
  }
}

template <typename S, typename M>
__global__ void sampler_correct_kernel(const M* __restrict__ F, const S* __restrict__ xn, const S* __restrict__ x,
                                       const S* __restrict__ zh, const double* __restrict__ sched, int64_t n,
                                       int transport, S* __restrict__ out) {
  const CorrectCoeffs<double> k = correct_coeffs<double>(transport, sched);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<S>(correct_element<double>(k, double(x[i]), double(xn[i]), load<double>(F[i]), double(zh[i])));
}

__global__ void philox_kernel(const int64_t* __restrict__ seed, int step, int64_t n, int raw, void* out) {
  const uint64_t sd = static_cast<uint64_t>(*seed);
  const int64_t quads = (n + 3) / 4;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += int64_t(gridDim.x) * blockDim.x) {
    if (raw) {
      const Philox4 w = philox_quad(sd, static_cast<uint32_t>(step), static_cast<uint64_t>(q));
      for (int lane = 0; lane < 4 && 4 * q + lane < n; ++lane) static_cast<uint32_t*>(out)[4 * q + lane] = w.v[lane];
    } else {
      float nz[4];
      philox_normal4(sd, static_cast<uint32_t>(step), static_cast<uint64_t>(q), nz);
      for (int lane = 0; lane < 4 && 4 * q + lane < n; ++lane) static_cast<float*>(out)[4 * q + lane] = nz[lane];
    }
  }
}

}  // namespace

int sampler_step_cuda(int state_dtype, int model_dtype, const void* F, const void* x, void* x_prev, void* z_prev,
                      const void* sched, const void* seed, int64_t n, int step, int transport, int mode,
                      void* x_next, void* x_hat, void* z_hat, void* stream) {
  if (transport < 0 || transport >= kNumTransports || mode < kExtrapolOff || mode > kExtrapolApply || n < 0 ||
      step < 0 || x_next == nullptr || (mode != kExtrapolOff && (x_prev == nullptr || z_prev == nullptr)) ||
      ((x_hat == nullptr) != (z_hat == nullptr)))  // as the CPU entry point checks
    return kBadArgument;
  if (n == 0) return kOk;
  return dispatch_state_model_cuda(state_dtype, model_dtype, [&](auto s, auto m) {
    using C = decltype(s);  // storage type of the state
    using M = decltype(m);
    const bool wide = n % 4 == 0 && vec_aligned<M, 4>(F) && vec_aligned<C, 4>(x) && vec_aligned<C, 4>(x_prev) &&
                      vec_aligned<C, 4>(z_prev) && vec_aligned<C, 4>(x_next) && vec_aligned<C, 4>(x_hat) &&
                      vec_aligned<C, 4>(z_hat);
    auto launch = [&](auto kernel) {
      kernel<<<grid_size((n + 3) / 4, kBlock), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const M*>(F), static_cast<const C*>(x), static_cast<C*>(x_prev), static_cast<C*>(z_prev),
          static_cast<const double*>(sched), static_cast<const int64_t*>(seed), n, step, transport, mode,
          static_cast<C*>(x_next), static_cast<C*>(x_hat), static_cast<C*>(z_hat));
    };
    if (wide) launch(sampler_step_kernel<C, M, true>); else launch(sampler_step_kernel<C, M, false>);
    return launch_status();
  });
}

int sampler_correct_cuda(int state_dtype, int model_dtype, const void* F, const void* x_next, const void* x,
                         const void* z_hat, const void* sched, int64_t n, int transport, void* out, void* stream) {
  if (transport < 0 || transport >= kNumTransports || n < 0) return kBadArgument;
  if (n == 0) return kOk;
  return dispatch_state_model_cuda(state_dtype, model_dtype, [&](auto s, auto m) {
    using C = decltype(s);  // storage type of the state
    using M = decltype(m);
    const auto kernel = sampler_correct_kernel<C, M>;
    kernel<<<grid_size(n, kBlock), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const M*>(F), static_cast<const C*>(x_next), static_cast<const C*>(x),
        static_cast<const C*>(z_hat), static_cast<const double*>(sched), n, transport, static_cast<C*>(out));
    return launch_status();
  });
}

int philox_cuda(const void* seed, int step, int64_t n, int raw, void* out, void* stream) {
  if (n < 0 || step < 0) return kBadArgument;
  if (n == 0) return kOk;
  philox_kernel<<<grid_size((n + 3) / 4, kBlock), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const int64_t*>(seed), step, n, raw, out);
  return launch_status();
}

}  // namespace ucgm
