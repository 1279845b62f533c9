"""Calls into the compiled module: picks the CPU or CUDA entry point and torch's current stream."""
from __future__ import annotations

import functools
import re
import warnings

import torch

try:
    from . import _C
    IMPORT_ERROR = None
except ImportError as exc:  # a broken or missing build: every op falls back to the eager reference
    _C = None
    IMPORT_ERROR = exc

#: dtype codes of csrc/ucgm/common.h (DType).
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


class Kernel:
    """One compiled op: ``kernel(like, *raw_args)`` runs it on ``like``'s device.

    The entry points ``_C.<name>_cpu`` / ``_C.<name>_cuda`` are looked up once, here, because
    at training sizes these ops are launch-bound and every microsecond of Python counts.
    """

    def __init__(self, name: str):
        self.name = name
        self.cpu = getattr(_C, f"{name}_cpu", None)
        self.cuda = getattr(_C, f"{name}_cuda", None)

    def available(self, like: torch.Tensor) -> bool:
        """Whether this build has the kernel for ``like``'s device (CUDA: code that device can run)."""
        if like.is_cuda:
            return self.cuda is not None and cuda_code_runs_on(like.get_device())
        return self.cpu is not None and like.is_cpu

    def __call__(self, like: torch.Tensor, *args) -> None:
        if not like.is_cuda:
            self.cpu(*args)
            return
        index = like.get_device()
        if index != torch.cuda.current_device():
            with torch.cuda.device(index):
                self.cuda(*args, _raw_stream(index))
        else:
            self.cuda(*args, _raw_stream(index))


def _current_stream_handle(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# The current stream's cudaStream_t of a device, as torch.compile's generated code reads it: without
# building a torch.cuda.Stream object per call (a few microseconds of Python per launch).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_handle)


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True outside torch.compile, torch.func transforms, dispatch modes (make_fx, FlopCounterMode)
    and the torch.jit tracer, for plain tensors (no subclasses).

    Such calls may run the kernels without the dispatcher (the kernels take raw pointers, which a
    mode or tracer cannot see: its graph would hold only the empty outputs); anything else goes
    through the torch.library op, which tracing and transforms understand.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._get_tracing_state() is not None:
        return False
    return all(type(x) is torch.Tensor for x in tensors)


def fresh_outputs(outs, *inputs):
    """The eager reference's outputs (the fallback where no kernel runs) as the op's fake promises:
    contiguous, and aliasing no input (the reference keeps an input's layout, and returns t itself
    for a coefficient equal to t)."""
    storages = {i.untyped_storage().data_ptr() for i in inputs if isinstance(i, torch.Tensor) and i.numel()}

    def fresh(o):
        if o.is_contiguous() and not (o.numel() and o.untyped_storage().data_ptr() in storages):
            return o
        return o.clone(memory_format=torch.contiguous_format)
    return fresh(outs) if isinstance(outs, torch.Tensor) else tuple(fresh(o) for o in outs)


def saveable(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it when it was made under torch.inference_mode, which save_for_backward refuses
    (the eager reference, which lets autograd save what it needs, accepts such inputs)."""
    return t.clone() if t.is_inference() else t


def _forward_ad_level() -> int:
    # torch.autograd.forward_ad keeps the innermost open dual level here (-1: none).
    return getattr(torch.autograd.forward_ad, "_current_level", -1)


def needs_reference(t: torch.Tensor) -> bool:
    """True when a built-in transport's call must take the eager reference instead of the kernels.

    The ops have backward formulas for their data arguments only: no forward-mode (jvp) formula, no
    batching rule and no derivative in ``t``. So forward-mode AD, torch.func transforms outside
    torch.compile (which traces the ops themselves) and times that require grad take the reference,
    which autograd and torch.func differentiate exactly, instead of silently losing derivatives.
    """
    if t.requires_grad and torch.is_grad_enabled():
        return True
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or _forward_ad_level() >= 0


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """True when a call may skip the dispatcher: :func:`plain_eager`, and no autograd to record.

    The torch.library op costs ~40 us of dispatch per call on top of the kernel; eager calls
    that need neither autograd nor tracing call the kernel directly instead.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return plain_eager(*tensors)


def archs_run_on(archs: str, major: int, minor: int) -> bool:
    """Whether CUDA code built for ``archs`` (CMake's list, e.g. "80-real,90") runs at capability major.minor.

    Real code (SASS) for sm_XY runs on X.Z for Z >= Y; PTX for compute_XY is JIT-compiled for any
    capability >= X.Y; an "a"-suffixed (architecture-specific) entry runs on exactly its own.
    """
    for entry in archs.replace(";", ",").split(","):
        m = re.fullmatch(r"\s*(\d+)([a-z]?)(?:-(real|virtual))?\s*", entry)
        if m is None:
            if entry.strip():
                return True  # "all", "native", ...: CMake chose, trust it
            continue
        n, suffix, kind = int(m.group(1)), m.group(2), m.group(3)
        if suffix:
            if (n // 10, n % 10) == (major, minor):
                return True
            continue
        if kind != "virtual" and n // 10 == major and n % 10 <= minor:
            return True
        if kind != "real" and n <= 10 * major + minor:
            return True
    return False


@functools.lru_cache(maxsize=None)
def cuda_code_runs_on(index: int) -> bool:
    """Whether this build's CUDA kernels run on device ``index``; warns once per device if not (the ops
    then run the eager reference there instead of failing with "no kernel image")."""
    archs = str(_C.build_info().get("cuda_architectures", "")) if _C is not None else ""
    major, minor = torch.cuda.get_device_capability(index)
    if archs_run_on(archs, major, minor):
        return True
    warnings.warn(f"ucgm_fast: this build has CUDA code for {archs or 'no architecture'}, none of which runs on "
                  f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}); the ops run the eager "
                  f"reference there. Rebuild with UCGM_CUDA_ARCHS={major}{minor} pip install . for the fused kernels.",
                  RuntimeWarning, stacklevel=3)
    return False


def build_info() -> dict:
    """What was compiled: CPU, OpenMP, CUDA (yes/no, version, architectures), compiler, sanitizers.

    ``cpu_isas`` lists the instruction-set builds of the CPU kernels this CPU can run and
    ``cpu_isa`` the one in use (the best, unless the UCGM_CPU_ISA environment variable chose).
    ``cpu_stream_min_bytes``: on CPU, interpolate, decode (and their gradients) and the
    coefficients of Linear / ReLinear write outputs that together reach this many bytes, in rows of
    at least 256 bytes, with streaming (non-temporal) stores, which skip reading each line before
    writing it; None: never (off x86). ``ucgm_fast._C.set_cpu_stream_min_bytes`` changes it.
    """
    if _C is None:
        return {"cpu": False, "cuda": False, "openmp": False, "error": str(IMPORT_ERROR)}
    info = dict(_C.build_info())
    info["cuda_available_at_runtime"] = bool(info["cuda"] and torch.cuda.is_available()
                                             and cuda_code_runs_on(torch.cuda.current_device()))
    return info
