"""The fused sampler ops: torch.library custom ops with fake and CPU/CUDA kernels.

``sampler_step`` decodes the model output, extrapolates against the previous raw estimates (kept
in buffers it updates in place), mixes in Philox noise drawn inside the kernel and writes the new
state, in one pass; ``sampler_correct`` is the fused order-2 (Heun) correction; ``philox_noise``
materializes the noise a step draws. Per-step scalars (t, t', kappa, e) travel in a small
``sched`` tensor on the data's device, so a captured CUDA graph replays with new values.
"""
from __future__ import annotations

import numbers
import struct
from typing import Optional

import torch

from ..reference import sampler as reference
from .._kernels import DTYPE_CODE, Kernel, eager_fast_path, plain_eager
from .._validate import FLOAT_DTYPES, check_raw, is_real_number
from ..transports import TRANSPORTS, get_transport

__all__ = ["sampler_step", "sampler_correct", "sampler_noise"]

_NS = "ucgm_fast"
# ExtrapolMode of csrc/ucgm/sampler.h.
EXTRAPOL_OFF, EXTRAPOL_RECORD, EXTRAPOL_APPLY = 0, 1, 2
STATE_DTYPES = (torch.float32, torch.float64)

_STEP = Kernel("sampler_step")
_CORRECT = Kernel("sampler_correct")
_PHILOX = Kernel("philox")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _empty0(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# Kernels behind the ops, unchecked: the public functions validate their arguments first, and the
# registered ops (_step_op, ... below) check what keeps a raw torch.ops call in bounds
# ---------------------------------------------------------------------------------------------

def _step_impl(F, x, x_prev, z_prev, sched, seed, step: int, transport: int, extrapol_mode: int, hats: bool):
    mode = extrapol_mode
    F, x = _flat(F), _flat(x)
    x_next = torch.empty_like(x, memory_format=torch.contiguous_format)
    x_hat = torch.empty_like(x_next) if hats else _empty0(x)
    z_hat = torch.empty_like(x_next) if hats else _empty0(x)
    if not _STEP.available(x):
        return _step_fallback(F, x, x_prev, z_prev, sched, seed, step, transport, mode, x_next, x_hat, z_hat, hats)
    n = x.numel()
    if n:
        _STEP(x, DTYPE_CODE[x.dtype], DTYPE_CODE[F.dtype], F.data_ptr(), x.data_ptr(),
              x_prev.data_ptr() if mode else 0, z_prev.data_ptr() if mode else 0, sched.data_ptr(), seed.data_ptr(),
              n, step, transport, mode, x_next.data_ptr(), x_hat.data_ptr() if hats else 0,
              z_hat.data_ptr() if hats else 0)
    return x_next, x_hat, z_hat


def _step_fallback(F, x, x_prev, z_prev, sched, seed, step, transport, mode, x_next, x_hat, z_hat, hats):
    # No compiled kernel for this device: the eager reference with the same noise.
    noise = reference.philox_noise(x.numel(), int(seed.reshape(-1)[0]), step).reshape(x.shape).to(x.device)
    out = reference.sampler_step(F, x, sched[0], sched[1], TRANSPORTS[transport], step=step, stochast_ratio=sched[2],
                                 extrapol_ratio=sched[3], x_prev=x_prev if mode else None,
                                 z_prev=z_prev if mode else None, return_hats=True, noise=noise)
    x_next.copy_(out[0])
    if hats:
        x_hat.copy_(out[1])
        z_hat.copy_(out[2])
    return x_next, x_hat, z_hat


def _correct_impl(F, x_next, x, z_hat, sched, transport: int):
    F, x_next, x, z_hat = _flat(F), _flat(x_next), _flat(x), _flat(z_hat)
    if not _CORRECT.available(x):
        return reference.sampler_correct(F, x_next, x, z_hat, sched[0], sched[1], TRANSPORTS[transport])
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel():
        _CORRECT(x, DTYPE_CODE[x.dtype], DTYPE_CODE[F.dtype], F.data_ptr(), x_next.data_ptr(), x.data_ptr(),
                 z_hat.data_ptr(), sched.data_ptr(), x.numel(), transport, out.data_ptr())
    return out


def _philox_impl(seed, step: int, numel: int, raw: bool):
    out = torch.empty(numel, dtype=torch.int32 if raw else torch.float32, device=seed.device)
    if not _PHILOX.available(seed):
        ref = reference.philox_noise(numel, int(seed.reshape(-1)[0]), step, raw)
        return out.copy_(ref.to(torch.int32) if raw else ref)
    if numel:
        _PHILOX(seed, seed.data_ptr(), step, numel, int(raw), out.data_ptr())
    return out


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------

torch.library.define(
    f"{_NS}::sampler_step",
    "(Tensor F, Tensor x, Tensor(a!) x_prev, Tensor(b!) z_prev, Tensor sched, Tensor seed, int step, int transport, "
    "int extrapol_mode, bool hats) -> (Tensor, Tensor, Tensor)")


def _check_schedule(op, x, sched, seed=None):
    if sched.device != x.device or sched.dtype != torch.float64 or sched.numel() < 4 or not sched.is_contiguous():
        raise ValueError(f"ucgm_fast::{op}: sched must be 4 contiguous float64 values on {x.device}")
    if seed is not None and (seed.device != x.device or seed.dtype != torch.int64 or seed.numel() < 1):
        raise ValueError(f"ucgm_fast::{op}: seed must be an int64 tensor on {x.device}")


def _step_op(F, x, x_prev, z_prev, sched, seed, step, transport, extrapol_mode, hats):
    check_raw("sampler_step", x, shaped=(F,))
    _check_schedule("sampler_step", x, sched, seed)
    if extrapol_mode:
        for buf in (x_prev, z_prev):
            if buf.device != x.device or buf.dtype != x.dtype or buf.numel() != x.numel() or not buf.is_contiguous():
                raise ValueError(f"ucgm_fast::sampler_step: x_prev / z_prev must be contiguous, with x's "
                                 f"{x.numel()} elements, dtype {x.dtype} and device")
    return _step_impl(F, x, x_prev, z_prev, sched, seed, step, transport, extrapol_mode, hats)


torch.library.impl(f"{_NS}::sampler_step", ("CPU", "CUDA"), _step_op)


@torch.library.register_fake(f"{_NS}::sampler_step")
def _step_fake(F, x, x_prev, z_prev, sched, seed, step, transport, extrapol_mode, hats):
    x_next = torch.empty_like(x, memory_format=torch.contiguous_format)
    if hats:
        return x_next, torch.empty_like(x_next), torch.empty_like(x_next)
    return x_next, x.new_empty((0,)), x.new_empty((0,))


torch.library.define(f"{_NS}::sampler_correct",
                     "(Tensor F, Tensor x_next, Tensor x, Tensor z_hat, Tensor sched, int transport) -> Tensor")


def _correct_op(F, x_next, x, z_hat, sched, transport):
    check_raw("sampler_correct", x, same=(x_next,), shaped=(F, z_hat))
    _check_schedule("sampler_correct", x, sched)
    return _correct_impl(F, x_next, x, z_hat, sched, transport)


torch.library.impl(f"{_NS}::sampler_correct", ("CPU", "CUDA"), _correct_op)


@torch.library.register_fake(f"{_NS}::sampler_correct")
def _correct_fake(F, x_next, x, z_hat, sched, transport):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


torch.library.define(f"{_NS}::philox_noise", "(Tensor seed, int step, int numel, bool raw) -> Tensor")


def _philox_op(seed, step, numel, raw):
    if seed.dtype != torch.int64 or seed.numel() < 1 or numel < 0:
        raise ValueError("ucgm_fast::philox_noise: seed must be an int64 tensor and numel >= 0")
    return _philox_impl(seed, step, numel, raw)


torch.library.impl(f"{_NS}::philox_noise", ("CPU", "CUDA"), _philox_op)


@torch.library.register_fake(f"{_NS}::philox_noise")
def _philox_fake(seed, step, numel, raw):
    return seed.new_empty((numel,), dtype=torch.int32 if raw else torch.float32)


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------

def check_state(op: str, x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in STATE_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; the sampler state must be float32 or float64")


def check_model_output(op: str, F, x, name: str = "F") -> None:
    if not isinstance(F, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(F).__name__}")
    if F.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {F.dtype}; expected float16, bfloat16, float32 or float64")
    if F.shape != x.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(F.shape)} but the state x has shape {tuple(x.shape)}")
    if F.device != x.device:
        raise ValueError(f"{op}: {name} is on {F.device} but the state x is on {x.device}")


def _scalar(op: str, name: str, v, x: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{op}: {name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
        if v.device != x.device and v.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {v.device} but the state x is on {x.device}")
        return v.reshape(()).to(x.device, torch.float64)
    if not is_real_number(v):
        raise TypeError(f"{op}: {name} must be a float or a one-element tensor, got {type(v).__name__}")
    return torch.tensor(float(v), dtype=torch.float64)


# A step's schedule row and seed as one host buffer: {t, t', kappa, e} as float64, then the int64 seed.
_SCHED_SEED = struct.Struct("=4dq")


def make_sched_seed(op: str, x: torch.Tensor, t, t_next, kappa, e, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """(make_sched(...), make_seed(...)); for plain numbers, one buffer and one host-to-device copy.

    At training sizes a step is bound by host time on a GPU: a copy of a small pageable tensor costs
    several microseconds, the kernel of a 1M-element step little more.
    """
    # Plain eager calls only: torch.compile cannot trace the packing, and under a dispatch mode
    # (make_fx, FakeTensorMode) torch.frombuffer makes a real tensor among fake ones.
    if (is_real_number(t) and is_real_number(t_next) and is_real_number(kappa) and is_real_number(e) and type(seed) is int
            and -2 ** 63 <= seed < 2 ** 63 and plain_eager(x)):
        row = bytearray(_SCHED_SEED.pack(float(t), float(t_next), float(kappa), float(e), seed))
        if x.device.type == "cpu":  # two views of the one buffer (cheaper than slicing a tensor)
            return (torch.frombuffer(row, dtype=torch.float64, count=4),
                    torch.frombuffer(row, dtype=torch.int64, count=1, offset=32))
        buf = torch.frombuffer(row, dtype=torch.int64).to(x.device, non_blocking=True)
        return buf[:4].view(torch.float64), buf[4:]
    return make_sched(op, x, t, t_next, kappa, e), make_seed(op, seed, x.device)


def make_sched(op: str, x: torch.Tensor, t, t_next, kappa, e) -> torch.Tensor:
    """The schedule row {t, t', kappa, e}, float64 on x's device (sampler.h, SchedField)."""
    vals = [t, t_next, kappa, e]
    if all(is_real_number(v) for v in vals):
        row = torch.tensor([float(v) for v in vals], dtype=torch.float64)
        return row.to(x.device, non_blocking=True) if x.device.type != "cpu" else row
    names = ["t", "t_next", "stochast_ratio", "extrapol_ratio"]
    return torch.stack([_scalar(op, n, v, x).to(x.device) for n, v in zip(names, vals)])


def make_seed(op: str, seed, device: torch.device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"{op}: seed must be an int or a one-element int64 tensor")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{op}: seed must be an int, got {type(seed).__name__}")
    if not -2 ** 63 <= int(seed) < 2 ** 64:
        raise ValueError(f"{op}: seed must fit in 64 bits, got {seed}")
    s = int(seed)
    s = s - 2 ** 64 if s >= 2 ** 63 else s
    t = torch.tensor([s], dtype=torch.int64)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t


def _span(v: torch.Tensor):
    """(storage address, first byte, one past the last byte) a tensor's elements may occupy."""
    if v.numel() == 0:
        return None
    last = sum((n - 1) * abs(st) for n, st in zip(v.shape, v.stride()))
    low = v.storage_offset() - sum((n - 1) * -st for n, st in zip(v.shape, v.stride()) if st < 0)
    size = v.element_size()
    return v.untyped_storage().data_ptr(), low * size, (low + last + 1) * size


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = _span(a), _span(b)
    return sa is not None and sb is not None and sa[0] == sb[0] and sa[1] < sb[2] and sb[1] < sa[2]


def _check_step(op: str, step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= int(step) < 2 ** 31:
        raise ValueError(f"{op}: step must be an int in [0, 2^31), got {step!r}")
    return int(step)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def sampler_step(F, x, t, t_next, transport, *, step: int = 0, stochast_ratio=0.0, extrapol_ratio=0.0, seed=0,
                 x_prev: Optional[torch.Tensor] = None, z_prev: Optional[torch.Tensor] = None,
                 return_hats: bool = False):
    """x_next = gamma_in(t') x_hat + alpha_in(t') (sqrt(1 - kappa) z_hat + sqrt(kappa) noise), fused.

    (x_hat, z_hat) are decoded from (x, F) at t. With buffers ``x_prev`` / ``z_prev`` given, step
    indices >= 2 first extrapolate x_hat += e (x_hat - x_prev) (z_hat likewise), and the buffers
    receive this step's raw estimates in place. The noise is Philox4x32-10 keyed by (seed, step)
    (see :func:`sampler_noise`), drawn inside the kernel only when kappa > 0.

    Parameters
    ----------
    F : Tensor
        Model output at (x, t), shape of ``x``, any float dtype.
    x : Tensor
        State, float32 or float64; the arithmetic and every output use its dtype.
    t, t_next : float or one-element Tensor
        Current and next time.
    transport : str or Transport
    step : int
        Step index: keys the noise and turns extrapolation on from 2.
    stochast_ratio : float or one-element Tensor
        kappa in [0, 1].
    extrapol_ratio : float or one-element Tensor
        e >= 0; needs ``x_prev`` and ``z_prev`` when non-zero.
    seed : int or int64 Tensor
    x_prev, z_prev : Tensor, optional
        Contiguous buffers shaped and typed like ``x`` (updated in place).
    return_hats : bool
        Also return the raw x_hat and the z_hat the update used (needed by :func:`sampler_correct`).

    Returns
    -------
    Tensor or (Tensor, Tensor, Tensor)
        x_next, or (x_next, x_hat, z_hat); not differentiable (sampling runs under no_grad).
    """
    op = "sampler_step"
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        # PyTorch's own message here ("Batching rule not implemented ... out= or view ops") names
        # neither cause; a reference fallback would give every vmapped sample the same noise.
        raise RuntimeError(f"{op} does not run under torch.func transforms (vmap, grad, jvp): its noise is "
                           "keyed by element index in the whole state and it updates x_prev / z_prev in place. "
                           "It is elementwise: call it on the batched state directly")
    check_state(op, x)
    check_model_output(op, F, x)
    F, x = F.detach(), x.detach()  # a sampler step is not differentiated: no output claims a gradient
    tr = get_transport(transport)
    step = _check_step(op, step)
    for name, v, lo, hi in (("stochast_ratio", stochast_ratio, 0.0, 1.0), ("extrapol_ratio", extrapol_ratio, 0.0, None)):
        if is_real_number(v) and not (v >= lo and (hi is None or v <= hi)):
            raise ValueError(f"{op}: {name} must be in [{lo}, {f'{hi}]' if hi is not None else 'inf)'}, got {v}")
    if (x_prev is None) != (z_prev is None):
        raise ValueError(f"{op}: pass both x_prev and z_prev or neither")
    if x_prev is None:
        if isinstance(extrapol_ratio, torch.Tensor) or extrapol_ratio != 0:
            raise ValueError(f"{op}: extrapol_ratio != 0 needs the buffers x_prev and z_prev")
        mode = EXTRAPOL_OFF
        x_prev = z_prev = _empty0(x)
    else:
        for name, b in (("x_prev", x_prev), ("z_prev", z_prev)):
            if not isinstance(b, torch.Tensor) or b.shape != x.shape or b.dtype != x.dtype or b.device != x.device:
                raise ValueError(f"{op}: {name} must be a tensor shaped, typed and placed like x")
            if not b.is_contiguous():
                raise ValueError(f"{op}: {name} must be contiguous (it is updated in place)")
        # The kernels read every input element before writing the buffers, but only element by element.
        # (Storage addresses are not traceable: under torch.compile only the same tensor passed twice is caught.)
        pairs = ((x_prev, z_prev, "each other"), (x_prev, x, "x"), (z_prev, x, "x"), (x_prev, F, "F"),
                 (z_prev, F, "F"))
        compiling = torch.compiler.is_compiling()
        for a, b, what in pairs:
            if a is b if compiling else _overlap(a, b):
                raise ValueError(f"{op}: x_prev and z_prev must not share memory with {what} "
                                 "(they are updated in place)")
        mode = EXTRAPOL_APPLY if step >= 2 else EXTRAPOL_RECORD
    sched, sd = make_sched_seed(op, x, t, t_next, stochast_ratio, extrapol_ratio, seed)
    if tr.id is None:
        return reference.sampler_step(F, x, sched[0], sched[1], tr, step=step, stochast_ratio=sched[2],
                                      extrapol_ratio=sched[3], seed=int(sd[0]),
                                      x_prev=x_prev if mode else None, z_prev=z_prev if mode else None,
                                      return_hats=return_hats)
    if eager_fast_path(F, x):
        out = _step_impl(F, x, x_prev, z_prev, sched, sd, step, tr.id, mode, return_hats)
    else:
        out = torch.ops.ucgm_fast.sampler_step(F, x, x_prev, z_prev, sched, sd, step, tr.id, mode, return_hats)
    x_next = out[0].view(x.shape)
    return (x_next, out[1].view(x.shape), out[2].view(x.shape)) if return_hats else x_next


def sampler_correct(F, x_next, x, z_hat, t, t_next, transport):
    """x_new = x gamma_in(t')/gamma_in(t) + (alpha_in(t') - gamma_in(t') alpha_in(t)/gamma_in(t)) (z_hat + z_pri)/2, fused.

    z_pri = (x_next gamma_to(t') - F gamma_in(t')) / den(t') decodes the model output F at
    (x_next, t'): the order-2 (Heun) correction of the sampler.

    Parameters
    ----------
    F : Tensor
        Model output at (x_next, t'), any float dtype.
    x_next, x, z_hat : Tensor
        First-stage state, current state and the z_hat the first stage used; float32 or float64,
        one dtype, one shape.
    t, t_next : float or one-element Tensor
    transport : str or Transport

    Returns
    -------
    Tensor
        The corrected next state, in the state dtype.
    """
    op = "sampler_correct"
    check_state(op, x)
    check_model_output(op, F, x)
    F, x_next, x, z_hat = (v.detach() if isinstance(v, torch.Tensor) else v for v in (F, x_next, x, z_hat))
    for name, v in (("x_next", x_next), ("z_hat", z_hat)):
        if not isinstance(v, torch.Tensor) or v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            raise ValueError(f"{op}: {name} must be a tensor shaped, typed and placed like x")
    tr = get_transport(transport)
    sched = make_sched(op, x, t, t_next, 0.0, 0.0)
    if tr.id is None:
        return reference.sampler_correct(F, x_next, x, z_hat, sched[0], sched[1], tr)
    if eager_fast_path(F, x_next, x, z_hat):
        out = _correct_impl(F, x_next, x, z_hat, sched, tr.id)
    else:
        out = torch.ops.ucgm_fast.sampler_correct(F, x_next, x, z_hat, sched, tr.id)
    return out.view(x.shape)


def sampler_noise(shape, seed=0, step: int = 0, device=None, raw: bool = False) -> torch.Tensor:
    """noise[i] = Box-Muller(Philox4x32-10({i/4, i/4 >> 32, seed >> 32, 0}, {seed, step}))[i % 4].

    The standard normals (float32) that :func:`sampler_step` draws at ``step`` with ``seed``, or with
    ``raw`` the generator's uint32 words (as int32 bit patterns). The same on CPU and CUDA, bit for bit.
    """
    op = "sampler_noise"
    shape = torch.Size([shape] if isinstance(shape, numbers.Integral) else shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    step = _check_step(op, step)
    sd = make_seed(op, seed, device)
    numel = shape.numel()
    if eager_fast_path():
        out = _philox_impl(sd, step, numel, raw)
    else:
        out = torch.ops.ucgm_fast.philox_noise(sd, step, numel, raw)
    return out.view(shape)
