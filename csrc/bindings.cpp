// Python binding of the compiled ops. Deliberately thin and torch-free: pointers arrive as integers
// (tensor.data_ptr()), streams as integers (torch.cuda.current_stream().cuda_stream), and every
// status code becomes a Python exception. Validation and allocation live in python/ucgm_fast/.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ucgm/common.h"
#include "ucgm/transport_ops.h"
#include "ucgm/objective.h"
#include "ucgm/objective_ops.h"
#include "ucgm/philox.h"
#include "ucgm/sampler_ops.h"
#include "cpu/isa.h"
#include "cpu/stream_store.h"

namespace py = pybind11;

namespace ucgm {
std::atomic<int64_t> cpu_stream_min_bytes{kStreamMinBytes};  // cpu/stream_store.h
}  // namespace ucgm

using ptr = std::uintptr_t;

namespace {

template <typename T> const void* cp(T p) { return reinterpret_cast<const void*>(p); }
template <typename T> void* mp(T p) { return reinterpret_cast<void*>(p); }

void check(int status, const char* op, bool cuda) {
  if (status == 0) return;
#ifdef UCGM_WITH_CUDA
  if (cuda) throw std::runtime_error(std::string("ucgm_fast.") + op + ": CUDA error: " + ucgm::cuda_error_string(status));
#endif
  (void)cuda;
  throw std::invalid_argument(std::string("ucgm_fast.") + op + ": invalid argument (status " + std::to_string(status) + ")");
}

py::dict build_info() {
  py::dict d;
  d["cpu"] = true;
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = _OPENMP;
#else
  d["openmp"] = false;
#endif
#ifdef UCGM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = UCGM_CUDA_VERSION;
  d["cuda_architectures"] = UCGM_CUDA_ARCHITECTURES;
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["cuda_architectures"] = py::none();
#endif
#ifdef UCGM_SANITIZE
  d["sanitize"] = true;
#else
  d["sanitize"] = false;
#endif
  d["compiler"] = UCGM_CXX_COMPILER;
  py::list isas;
  for (int i : {ucgm::kIsaBase, ucgm::kIsaAvx2})
    if (ucgm::cpu_isa_supported(i)) isas.append(ucgm::kIsaNames[i]);
  d["cpu_isas"] = isas;
  d["cpu_isa"] = ucgm::kIsaNames[ucgm::cpu_isa().load()];
  if (ucgm::kStreamingStores)
    d["cpu_stream_min_bytes"] = ucgm::cpu_stream_min_bytes.load();
  else
    d["cpu_stream_min_bytes"] = py::none();
  return d;
}

// Sets the CPU kernels' streaming threshold (cpu/stream_store.h) and returns the previous one:
// tests stream small outputs with 0 and turn streaming off with a huge value.
int64_t set_cpu_stream_min_bytes(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("set_cpu_stream_min_bytes: bytes must be >= 0, got " + std::to_string(bytes));
  return ucgm::cpu_stream_min_bytes.exchange(bytes);
}

// Selects the build of the CPU kernels by name; returns the previous one's name.
std::string set_cpu_isa(const std::string& name) {
  const int isa = ucgm::cpu_isa_named(name.c_str());
  if (isa >= 0) return ucgm::kIsaNames[ucgm::cpu_isa().exchange(isa)];
  throw std::invalid_argument("set_cpu_isa: " + name + " is not built or not supported by this CPU (build_info()['cpu_isas'])");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ucgm_fast compiled kernels (raw-pointer interface; use the ucgm_fast package instead).";
  m.def("build_info", &build_info);
  m.def("set_cpu_isa", &set_cpu_isa);
  m.def("set_cpu_stream_min_bytes", &set_cpu_stream_min_bytes);
  auto gil = py::call_guard<py::gil_scoped_release>();

  m.def("mix_cpu", [](int dtype, ptr u, ptr v, ptr t, int64_t ts, ptr o1, ptr o2, int64_t rows, int64_t rs, int tr, int mode) {
    check(UCGM_CPU(mix_cpu)(dtype, cp(u), cp(v), cp(t), ts, mp(o1), mp(o2), rows, rs, tr, mode), "mix", false);
  }, gil);
  m.def("coefficients_cpu", [](int dtype, ptr t, int64_t n, int tr, ptr ai, ptr gi, ptr at, ptr gt) {
    check(UCGM_CPU(coefficients_cpu)(dtype, cp(t), n, tr, mp(ai), mp(gi), mp(at), mp(gt)), "coefficients", false);
  }, gil);

#ifdef UCGM_WITH_CUDA
  m.def("mix_cuda", [](int dtype, ptr u, ptr v, ptr t, int64_t ts, ptr o1, ptr o2, int64_t rows, int64_t rs, int tr, int mode, ptr s) {
    check(ucgm::mix_cuda(dtype, cp(u), cp(v), cp(t), ts, mp(o1), mp(o2), rows, rs, tr, mode, mp(s)), "mix", true);
  }, gil);
  m.def("coefficients_cuda", [](int dtype, ptr t, int64_t n, int tr, ptr ai, ptr gi, ptr at, ptr gt, ptr s) {
    check(ucgm::coefficients_cuda(dtype, cp(t), n, tr, mp(ai), mp(gi), mp(at), mp(gt), mp(s)), "coefficients", true);
  }, gil);
#endif

  // ---- objective ops (ucgm/objective_ops.h) ----
  // Optional pointers (F_wo, out2, grad_target) arrive as 0 and reach the kernels as nullptr.
  m.def("ucgm_loss_workspace_size", &ucgm::ucgm_loss_workspace_size);
  m.def("enhance_target_cpu", [](int dd, int dm, ptr x, ptr z, ptr fw, ptr fwo, ptr t, int64_t ts, ptr o1, ptr o2,
                                 int64_t rows, int64_t rs, int64_t ndrop, double e, double lo, double hi, int tr, int emit) {
    check(UCGM_CPU(enhance_target_cpu)(dd, dm, cp(x), cp(z), cp(fw), cp(fwo), cp(t), ts, mp(o1), mp(o2), rows, rs, ndrop, e,
                                       lo, hi, tr, emit), "enhance_target", false);
  }, gil);
  m.def("fd_inputs_cpu", [](int dd, ptr x, ptr z, ptr t, int64_t ts, ptr xo, ptr ro, int64_t rows, int64_t rs,
                            double lam, double eps, int tr) {
    check(UCGM_CPU(fd_inputs_cpu)(dd, cp(x), cp(z), cp(t), ts, mp(xo), mp(ro), rows, rs, lam, eps, tr), "fd_inputs", false);
  }, gil);
  m.def("fd_target_cpu", [](int dd, int dm, ptr ft, ptr fa, ptr fb, ptr x, ptr z, ptr t, int64_t ts, ptr o,
                            int64_t rows, int64_t rs, double lam, double eps, int tr) {
    check(UCGM_CPU(fd_target_cpu)(dd, dm, cp(ft), cp(fa), cp(fb), cp(x), cp(z), cp(t), ts, mp(o), rows, rs, lam, eps, tr),
          "fd_target", false);
  }, gil);
  m.def("ucgm_loss_cpu", [](int df, int dt, ptr f, ptr tg, ptr t, int64_t ts, ptr loss, ptr root, ptr /*ws*/,
                            int64_t rows, int64_t ch, int64_t pos, double h, int cos, int tw) {
    check(UCGM_CPU(ucgm_loss_cpu)(df, dt, cp(f), cp(tg), cp(t), ts, mp(loss), mp(root), rows, ch, pos, h, cos, tw),
          "ucgm_loss", false);
  }, gil);
  m.def("ucgm_loss_backward_cpu", [](int df, int dt, ptr g, ptr f, ptr tg, ptr t, int64_t ts, ptr root, ptr gf,
                                     ptr gt, int64_t rows, int64_t ch, int64_t pos, int cos, int tw) {
    check(UCGM_CPU(ucgm_loss_backward_cpu)(df, dt, cp(g), cp(f), cp(tg), cp(t), ts, cp(root), mp(gf), mp(gt), rows, ch,
                                           pos, cos, tw), "ucgm_loss_backward", false);
  }, gil);
#ifdef UCGM_WITH_CUDA
  m.def("enhance_target_cuda", [](int dd, int dm, ptr x, ptr z, ptr fw, ptr fwo, ptr t, int64_t ts, ptr o1, ptr o2,
                                  int64_t rows, int64_t rs, int64_t ndrop, double e, double lo, double hi, int tr,
                                  int emit, ptr s) {
    check(ucgm::enhance_target_cuda(dd, dm, cp(x), cp(z), cp(fw), cp(fwo), cp(t), ts, mp(o1), mp(o2), rows, rs, ndrop,
                                    e, lo, hi, tr, emit, mp(s)), "enhance_target", true);
  }, gil);
  m.def("fd_inputs_cuda", [](int dd, ptr x, ptr z, ptr t, int64_t ts, ptr xo, ptr ro, int64_t rows, int64_t rs,
                             double lam, double eps, int tr, ptr s) {
    check(ucgm::fd_inputs_cuda(dd, cp(x), cp(z), cp(t), ts, mp(xo), mp(ro), rows, rs, lam, eps, tr, mp(s)),
          "fd_inputs", true);
  }, gil);
  m.def("fd_target_cuda", [](int dd, int dm, ptr ft, ptr fa, ptr fb, ptr x, ptr z, ptr t, int64_t ts, ptr o,
                             int64_t rows, int64_t rs, double lam, double eps, int tr, ptr s) {
    check(ucgm::fd_target_cuda(dd, dm, cp(ft), cp(fa), cp(fb), cp(x), cp(z), cp(t), ts, mp(o), rows, rs, lam, eps, tr,
                               mp(s)), "fd_target", true);
  }, gil);
  m.def("ucgm_loss_cuda", [](int df, int dt, ptr f, ptr tg, ptr t, int64_t ts, ptr loss, ptr root, ptr ws,
                             int64_t rows, int64_t ch, int64_t pos, double h, int cos, int tw, ptr s) {
    check(ucgm::ucgm_loss_cuda(df, dt, cp(f), cp(tg), cp(t), ts, mp(loss), mp(root), mp(ws), rows, ch, pos, h, cos,
                               tw, mp(s)), "ucgm_loss", true);
  }, gil);
  m.def("ucgm_loss_backward_cuda", [](int df, int dt, ptr g, ptr f, ptr tg, ptr t, int64_t ts, ptr root, ptr gf,
                                      ptr gt, int64_t rows, int64_t ch, int64_t pos, int cos, int tw, ptr s) {
    check(ucgm::ucgm_loss_backward_cuda(df, dt, cp(g), cp(f), cp(tg), cp(t), ts, cp(root), mp(gf), mp(gt), rows, ch,
                                        pos, cos, tw, mp(s)), "ucgm_loss_backward", true);
  }, gil);
#endif
  // ---- end objective ops ----

  // ---- sampler ops (ucgm/sampler_ops.h) ----
  m.def("sampler_step_cpu", [](int sd, int md, ptr F, ptr x, ptr xp, ptr zp, ptr sched, ptr seed, int64_t n, int step,
                               int tr, int mode, ptr xn, ptr xh, ptr zh) {
    check(UCGM_CPU(sampler_step_cpu)(sd, md, cp(F), cp(x), mp(xp), mp(zp), cp(sched), cp(seed), n, step, tr, mode, mp(xn),
                                     mp(xh), mp(zh)), "sampler_step", false);
  }, gil);
  m.def("sampler_correct_cpu", [](int sd, int md, ptr F, ptr xn, ptr x, ptr zh, ptr sched, int64_t n, int tr, ptr out) {
    check(UCGM_CPU(sampler_correct_cpu)(sd, md, cp(F), cp(xn), cp(x), cp(zh), cp(sched), n, tr, mp(out)), "sampler_correct",
          false);
  }, gil);
  m.def("philox4x32_10", [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    const ucgm::Philox4 w = ucgm::philox4x32_10(ucgm::Philox4{{c0, c1, c2, c3}}, k0, k1);
    return py::make_tuple(w.v[0], w.v[1], w.v[2], w.v[3]);
  }, "Philox4x32-10 of one counter and key (the raw generator the sampler's noise comes from).");
  m.def("philox_cpu", [](ptr seed, int step, int64_t n, int raw, ptr out) {
    check(UCGM_CPU(philox_cpu)(cp(seed), step, n, raw, mp(out)), "philox", false);
  }, gil);
#ifdef UCGM_WITH_CUDA
  m.def("sampler_step_cuda", [](int sd, int md, ptr F, ptr x, ptr xp, ptr zp, ptr sched, ptr seed, int64_t n, int step,
                                int tr, int mode, ptr xn, ptr xh, ptr zh, ptr s) {
    check(ucgm::sampler_step_cuda(sd, md, cp(F), cp(x), mp(xp), mp(zp), cp(sched), cp(seed), n, step, tr, mode, mp(xn),
                                  mp(xh), mp(zh), mp(s)), "sampler_step", true);
  }, gil);
  m.def("sampler_correct_cuda", [](int sd, int md, ptr F, ptr xn, ptr x, ptr zh, ptr sched, int64_t n, int tr, ptr out,
                                   ptr s) {
    check(ucgm::sampler_correct_cuda(sd, md, cp(F), cp(xn), cp(x), cp(zh), cp(sched), n, tr, mp(out), mp(s)),
          "sampler_correct", true);
  }, gil);
  m.def("philox_cuda", [](ptr seed, int step, int64_t n, int raw, ptr out, ptr s) {
    check(ucgm::philox_cuda(cp(seed), step, n, raw, mp(out), mp(s)), "philox", true);
  }, gil);
#endif
  // ---- end sampler ops ----

  // ---- model block ops (ucgm/block_ops.h) ----
  // ---- end model block ops ----
}
