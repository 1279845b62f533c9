"""Calls into the compiled module: picks the CPU or CUDA entry point and torch's current stream."""
from __future__ import annotations

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
        """Whether this build has the kernel for ``like``'s device."""
        if like.is_cuda:
            return self.cuda is not None
        return self.cpu is not None and like.device.type == "cpu"

    def __call__(self, like: torch.Tensor, *args) -> None:
        if not like.is_cuda:
            self.cpu(*args)
            return
        device = like.device
        if device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                self.cuda(*args, torch.cuda.current_stream().cuda_stream)
        else:
            self.cuda(*args, torch.cuda.current_stream().cuda_stream)


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """True when a call may skip the dispatcher: plain tensors, no autograd to record, not tracing.

    The torch.library op costs ~40 us of dispatch per call on top of the kernel; eager calls
    that need neither autograd nor tracing call the kernel directly instead.
    """
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for x in tensors:
        if type(x) is not torch.Tensor or (grad and x.requires_grad):
            return False
    return True


def build_info() -> dict:
    """What was compiled: CPU, OpenMP, CUDA (yes/no, version, architectures), compiler, sanitizers.

    ``cpu_isas`` lists the instruction-set builds of the CPU kernels this CPU can run and
    ``cpu_isa`` the one in use (the best, unless the UCGM_CPU_ISA environment variable chose).
    """
    if _C is None:
        return {"cpu": False, "cuda": False, "openmp": False, "error": str(IMPORT_ERROR)}
    info = dict(_C.build_info())
    info["cuda_available_at_runtime"] = bool(info["cuda"] and torch.cuda.is_available())
    return info
