"""The fused transport ops: torch.library custom ops with fake, CPU/CUDA and autograd kernels.

Each op is registered once in the ``ucgm_fast`` namespace (``torch.ops.ucgm_fast.*``) so it runs
eagerly, under ``torch.compile(fullgraph=True)`` and in CUDA graphs. The public functions below
validate their arguments, put ``t`` in its (B,) form and call the op; a user-defined
:class:`~ucgm_fast.Transport` goes to the eager reference instead.
"""
from __future__ import annotations

import torch

from ..reference import transport as reference
from .._kernels import DTYPE_CODE, Kernel, eager_fast_path, fresh_outputs, needs_reference, plain_eager, saveable
from .._validate import FLOAT_DTYPES, batch_times, check_data, check_raw, is_real_number
from ..transports import TRANSPORTS, get_transport

__all__ = ["coefficients", "interpolate", "decode"]

_NS = "ucgm_fast"
# MixMode of csrc/ucgm/transport.h: the 2x2 per-row map applied by the "mix" kernel.
_INTERP, _INTERP_ADJ, _DECODE, _DECODE_ADJ = 0, 1, 2, 3
_REFERENCE = {_INTERP: reference.interpolate, _INTERP_ADJ: reference.interpolate_backward,
              _DECODE: reference.decode, _DECODE_ADJ: reference.decode_backward}


_MIX = Kernel("mix")
_COEFFICIENTS = Kernel("coefficients")


def _mix(u: torch.Tensor, v: torch.Tensor, t: torch.Tensor, transport: int, mode: int):
    """(out1, out2) = M(t[row]) (u, v) per element (M: MixMode of transport.h); t is (B,)."""
    if not _MIX.available(u):
        return fresh_outputs(_REFERENCE[mode](u, v, t, TRANSPORTS[transport]), u, v, t)
    if not u.is_contiguous():
        u = u.contiguous()
    if not v.is_contiguous():
        v = v.contiguous()
    out1 = torch.empty_like(u, memory_format=torch.contiguous_format)
    out2 = torch.empty_like(u, memory_format=torch.contiguous_format)
    n = u.numel()
    if n:
        ct = torch.float64 if u.dtype == torch.float64 else torch.float32
        if t.dtype != ct:
            t = t.to(ct)
        _MIX(u, DTYPE_CODE[u.dtype], u.data_ptr(), v.data_ptr(), t.data_ptr(), t.stride(0), out1.data_ptr(),
             out2.data_ptr(), u.shape[0], n // u.shape[0], transport, mode)
    return out1, out2


def _mix_kernel(mode: int):
    def kernel(u: torch.Tensor, v: torch.Tensor, t: torch.Tensor, transport: int):
        check_raw(_OP_NAME[mode], u, same=(v,), rows=(t,))
        return _mix(u, v, t, transport, mode)
    return kernel


def _mix_fake(u, v, t, transport):
    return torch.empty_like(u, memory_format=torch.contiguous_format), \
        torch.empty_like(u, memory_format=torch.contiguous_format)


_MIX_OPS = {
    "interpolate": ("x, Tensor z", _INTERP),
    "interpolate_backward": ("g_xt, Tensor g_target", _INTERP_ADJ),
    "decode": ("x_t, Tensor F", _DECODE),
    "decode_backward": ("g_xhat, Tensor g_zhat", _DECODE_ADJ),
}
for _name, (_args, _mode) in _MIX_OPS.items():
    torch.library.define(f"{_NS}::{_name}", f"(Tensor {_args}, Tensor t, int transport) -> (Tensor, Tensor)")
    torch.library.impl(f"{_NS}::{_name}", ("CPU", "CUDA"), _mix_kernel(_mode))
    torch.library.register_fake(f"{_NS}::{_name}", _mix_fake)


_OP_NAME = {mode: name for name, (_, mode) in _MIX_OPS.items()}
_ADJOINT = {_INTERP: _INTERP_ADJ, _INTERP_ADJ: _INTERP, _DECODE: _DECODE_ADJ, _DECODE_ADJ: _DECODE}


def _mix_backward(mode: int, g1, g2, t, transport: int):
    """Gradients of mix op ``mode`` w.r.t. its two tensor inputs.

    Every mix op is linear in them, with the adjoint op as its transpose, so the backward is that op:
    its kernel directly, or the op itself (differentiable again) when a graph of the backward is
    being recorded, so first and higher derivatives stay fused.
    """
    g1 = torch.zeros_like(g2) if g1 is None else g1
    g2 = torch.zeros_like(g1) if g2 is None else g2
    adjoint = _ADJOINT[mode]
    if eager_fast_path(g1, g2, t):
        return _mix(g1, g2, t, transport, adjoint)
    return getattr(torch.ops.ucgm_fast, _OP_NAME[adjoint])(g1, g2, t, transport)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(saveable(inputs[2]))
    ctx.transport = inputs[3]


for _name, (_, _mode) in _MIX_OPS.items():
    def _backward(ctx, g1, g2, mode=_mode):
        return *_mix_backward(mode, g1, g2, ctx.saved_tensors[0], ctx.transport), None, None

    torch.library.register_autograd(f"{_NS}::{_name}", _backward, setup_context=_setup_context)


class _EagerMix(torch.autograd.Function):
    """A mix op under eager autograd without the op's dispatch, as ops.objective._EagerLoss.

    Recording the op and running its registered backward cost ~100 us of Python per call, more
    than the eager reference's whole forward and backward at small sizes.
    """

    @staticmethod
    def forward(ctx, u, v, t, transport, mode):
        ctx.save_for_backward(saveable(t))
        ctx.transport, ctx.mode = transport, mode
        return _mix(u, v, t, transport, mode)

    @staticmethod
    def backward(ctx, g1, g2):
        return *_mix_backward(ctx.mode, g1, g2, ctx.saved_tensors[0], ctx.transport), None, None, None

torch.library.define(f"{_NS}::coefficients", "(Tensor t, int transport) -> (Tensor, Tensor, Tensor, Tensor)")


def _coefficients_kernel(t: torch.Tensor, transport: int):
    if not _COEFFICIENTS.available(t):
        return fresh_outputs(reference.coefficients(t, TRANSPORTS[transport]), t)
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(4)]
    if t.numel():
        _COEFFICIENTS(t, DTYPE_CODE[t.dtype], t.data_ptr(), t.numel(), transport, *(o.data_ptr() for o in out))
    return tuple(out)


def _coefficients_fake(t, transport):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(4))


def _coefficients_op(t: torch.Tensor, transport: int):
    check_raw("coefficients", t)
    return _coefficients_kernel(t, transport)


torch.library.impl(f"{_NS}::coefficients", ("CPU", "CUDA"), _coefficients_op)
torch.library.register_fake(f"{_NS}::coefficients", _coefficients_fake)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _apply(op: str, mode: int, data: dict, t, transport):
    """Validates, puts t in its (B,) form and runs the mix op."""
    u, v = data.values()
    check_data(op, **data)
    return _run_mix(op, mode, u, v, batch_times(op, t, u), get_transport(transport))


def _run_mix(op: str, mode: int, u, v, tt, tr):
    """The mix op on checked arguments: reference, direct kernel or dispatcher."""
    if tr.id is None or needs_reference(tt):
        return _REFERENCE[mode](u, v, tt, tr)
    if eager_fast_path(u, v):
        return _mix(u, v, tt, tr.id, mode)
    if plain_eager(u, v, tt):
        return _EagerMix.apply(u, v, tt, tr.id, mode)
    return getattr(torch.ops.ucgm_fast, op)(u, v, tt, tr.id)


def _interpolate(x, z, tt, tr):
    """:func:`interpolate` on checked arguments (t as its (B,) tensor, a Transport)."""
    return _run_mix("interpolate", _INTERP, x, z, tt, tr)


def coefficients(t, transport):
    """(alpha_in(t), gamma_in(t), alpha_to(t), gamma_to(t)).

    Parameters
    ----------
    t : float or Tensor
        Times in [0, 1], any shape, floating dtype.
    transport : str or Transport
        One of :data:`ucgm_fast.TRANSPORTS` or a user-defined :class:`ucgm_fast.Transport`.

    Returns
    -------
    tuple of Tensor
        Four tensors shaped like ``t`` with its dtype (a 0-d float32 tensor for a Python float),
        computed in float32 (float64 for float64 ``t``); differentiable in ``t`` through the eager
        reference when ``t`` requires grad.
    """
    tr = get_transport(transport)
    if not isinstance(t, torch.Tensor):
        if not is_real_number(t):
            raise TypeError(f"coefficients: t must be a float or a floating tensor, got {type(t).__name__}")
        t = torch.tensor(float(t), dtype=torch.float32)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"coefficients: t has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if tr.id is None or needs_reference(t):
        return reference.coefficients(t, tr)
    if eager_fast_path(t):
        return _coefficients_kernel(t, tr.id)
    return torch.ops.ucgm_fast.coefficients(t, tr.id)


def interpolate(x, z, t, transport):
    """x_t = alpha_in(t) z + gamma_in(t) x,  target = alpha_to(t) z + gamma_to(t) x.

    Parameters
    ----------
    x : Tensor
        Data, shape (B, ...), float16, bfloat16, float32 or float64.
    z : Tensor
        Noise, same shape, dtype and device as ``x``.
    t : float or Tensor
        One time per sample: a float, a 0-d tensor, or a tensor of shape (B,) or (B, 1, ..., 1).
    transport : str or Transport
        One of :data:`ucgm_fast.TRANSPORTS` or a user-defined :class:`ucgm_fast.Transport`.

    Returns
    -------
    (x_t, target) : tuple of Tensor
        In the input dtype, computed in float32 (float64 for float64 inputs), differentiable
        with respect to ``x`` and ``z``.
    """
    return _apply("interpolate", _INTERP, {"x": x, "z": z}, t, transport)


def decode(x_t, F, t, transport):
    """x_hat = (F alpha_in - x_t alpha_to) / den,  z_hat = (x_t gamma_to - F gamma_in) / den.

    den = alpha_in gamma_to - gamma_in alpha_to, all at the sample's time t.

    Parameters
    ----------
    x_t : Tensor
        Noisy input, shape (B, ...), float16, bfloat16, float32 or float64.
    F : Tensor
        Model output at (x_t, t), same shape, dtype and device.
    t : float or Tensor
        One time per sample: a float, a 0-d tensor, or a tensor of shape (B,) or (B, 1, ..., 1).
    transport : str or Transport
        One of :data:`ucgm_fast.TRANSPORTS` or a user-defined :class:`ucgm_fast.Transport`.

    Returns
    -------
    (x_hat, z_hat) : tuple of Tensor
        Data and noise estimates in the input dtype, differentiable with respect to ``x_t`` and
        ``F`` (and ``t``, forward-mode AD and torch.func transforms through the eager reference).
    """
    return _apply("decode", _DECODE, {"x_t": x_t, "F": F}, t, transport)
