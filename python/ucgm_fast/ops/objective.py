"""The fused training-objective ops: enhanced target, finite-difference target and the loss.

Registered as torch.library custom ops in the ``ucgm_fast`` namespace (fake + CPU/CUDA kernels;
the loss also has a fused backward registered as its autograd formula), so they run eagerly,
under ``torch.compile(fullgraph=True)`` and inside CUDA graphs. No op reads a value back to the
host: per-row choices (enhancement range, dropped labels) are made inside the kernels.

Dtypes: the data (x, z) and the model outputs (F) share a dtype, or the data is float32 and the
model float16/bfloat16 (autocast). Targets come back in the compute dtype (float32, float64 for
float64 data), so a 16-bit model's targets keep float32 accuracy, as in the published code.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..reference import objective as reference
from .._kernels import (DTYPE_CODE, Kernel, _C, eager_fast_path, fresh_outputs, needs_reference, plain_eager,
                        saveable)
from .._validate import FLOAT_DTYPES, batch_times, check_data, check_raw, compute_dtype, is_real_number
from ..transports import TRANSPORTS, get_transport

__all__ = ["enhance_target", "fd_inputs", "fd_target", "ucgm_loss"]

_NS = "ucgm_fast"
_ENHANCE = Kernel("enhance_target")
_FD_INPUTS = Kernel("fd_inputs")
_FD_TARGET = Kernel("fd_target")
_LOSS = Kernel("ucgm_loss")
_LOSS_BACKWARD = Kernel("ucgm_loss_backward")
_LOW = (torch.float16, torch.bfloat16)


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _times(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ct = compute_dtype(like.dtype)
    return t if t.dtype == ct else t.to(ct)


def _row_size(x: torch.Tensor) -> int:
    return x.numel() // x.shape[0] if x.shape[0] else 0


def _loss_layout(F: torch.Tensor, cosine: bool):
    """(channels, positions) of the (B, channels, positions) view the loss kernels use."""
    if not cosine:
        return 1, max(_row_size(F), 1)
    channels = F.shape[1] if F.dim() >= 2 else 1
    return max(channels, 1), max(math.prod(F.shape[2:]), 1)


# ---------------------------------------------------------------------------------------------
# enhance_target
# ---------------------------------------------------------------------------------------------

torch.library.define(
    f"{_NS}::enhance_target",
    "(Tensor x, Tensor z, Tensor F_w, Tensor? F_wo, Tensor t, SymInt ndrop, float ratio, float lo, float hi, "
    "int transport, bool emit_target) -> (Tensor, Tensor)")


def _enhance_kernel(x, z, F_w, F_wo, t, ndrop, ratio, lo, hi, transport, emit_target):
    if not _ENHANCE.available(x):
        return fresh_outputs(reference.enhance_target_op(x, z, F_w, F_wo, t, ndrop, ratio, lo, hi,
                                                         TRANSPORTS[transport], emit_target), x, z, F_w, F_wo)
    x, z, F_w = _contig(x), _contig(z), _contig(F_w)
    F_wo = None if F_wo is None else _contig(F_wo)
    t = _times(t, x)
    if emit_target:
        out1 = torch.empty_like(x, dtype=compute_dtype(x.dtype), memory_format=torch.contiguous_format)
        out2 = x.new_empty((0,))
    else:
        out1 = torch.empty_like(x, memory_format=torch.contiguous_format)
        out2 = torch.empty_like(z, memory_format=torch.contiguous_format)
    if x.numel():
        _ENHANCE(x, DTYPE_CODE[x.dtype], DTYPE_CODE[F_w.dtype], x.data_ptr(), z.data_ptr(), F_w.data_ptr(),
                 0 if F_wo is None else F_wo.data_ptr(), t.data_ptr(), t.stride(0), out1.data_ptr(),
                 out2.data_ptr() if out2.numel() else 0, x.shape[0], _row_size(x), ndrop, ratio, lo, hi,
                 transport, int(emit_target))
    return out1, out2


@torch.library.register_fake(f"{_NS}::enhance_target")
def _enhance_fake(x, z, F_w, F_wo, t, ndrop, ratio, lo, hi, transport, emit_target):
    if emit_target:
        return x.new_empty(x.shape, dtype=compute_dtype(x.dtype)), x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(z, memory_format=torch.contiguous_format)


def _enhance_op(x, z, F_w, F_wo, t, ndrop, ratio, lo, hi, transport, emit_target):
    check_raw("enhance_target", x, same=(z,), shaped=(F_w, F_wo), rows=(t,))
    check_raw("enhance_target", F_w, same=(F_wo,))
    return _enhance_kernel(x, z, F_w, F_wo, t, ndrop, ratio, lo, hi, transport, emit_target)


torch.library.impl(f"{_NS}::enhance_target", ("CPU", "CUDA"), _enhance_op)


# ---------------------------------------------------------------------------------------------
# fd_inputs / fd_target
# ---------------------------------------------------------------------------------------------

torch.library.define(f"{_NS}::fd_inputs",
                     "(Tensor x, Tensor z, Tensor t, float lam, float eps, int transport) -> (Tensor, Tensor)")


def _passes(lam: float) -> int:
    return 2 if lam == 1.0 else 1


def _fd_inputs_kernel(x, z, t, lam, eps, transport):
    if not _FD_INPUTS.available(x):
        return fresh_outputs(reference.fd_inputs_op(x, z, t, lam, eps, TRANSPORTS[transport]), x, z, t)
    x, z, t = _contig(x), _contig(z), _times(t, x)
    k = _passes(lam)
    out = x.new_empty((k * x.shape[0], *x.shape[1:]))
    r = torch.empty((k * x.shape[0],), dtype=compute_dtype(x.dtype), device=x.device)
    if x.numel():
        _FD_INPUTS(x, DTYPE_CODE[x.dtype], x.data_ptr(), z.data_ptr(), t.data_ptr(), t.stride(0), out.data_ptr(),
                   r.data_ptr(), x.shape[0], _row_size(x), lam, eps, transport)
    elif x.shape[0]:  # rows of size 0 still get their times
        r.copy_(reference.fd_times(t, lam, eps))
    return out, r


@torch.library.register_fake(f"{_NS}::fd_inputs")
def _fd_inputs_fake(x, z, t, lam, eps, transport):
    k = _passes(lam)
    return x.new_empty((k * x.shape[0],) + tuple(x.shape[1:])), \
        x.new_empty((k * x.shape[0],), dtype=compute_dtype(x.dtype))


def _fd_inputs_op(x, z, t, lam, eps, transport):
    check_raw("fd_inputs", x, same=(z,), rows=(t,))
    return _fd_inputs_kernel(x, z, t, lam, eps, transport)


torch.library.impl(f"{_NS}::fd_inputs", ("CPU", "CUDA"), _fd_inputs_op)

torch.library.define(
    f"{_NS}::fd_target",
    "(Tensor F_t, Tensor F_a, Tensor F_b, Tensor x, Tensor z, Tensor t, float lam, float eps, int transport) -> Tensor")


def _fd_target_kernel(F_t, F_a, F_b, x, z, t, lam, eps, transport):
    if not _FD_TARGET.available(x):
        return fresh_outputs(reference.fd_target_op(F_t, F_a, F_b, x, z, t, lam, eps, TRANSPORTS[transport]),
                             F_t, F_a, F_b, x, z)
    F_t, F_a, F_b, x, z = (_contig(v) for v in (F_t, F_a, F_b, x, z))
    t = _times(t, x)
    out = torch.empty_like(x, dtype=compute_dtype(x.dtype), memory_format=torch.contiguous_format)
    if x.numel():
        _FD_TARGET(x, DTYPE_CODE[x.dtype], DTYPE_CODE[F_t.dtype], F_t.data_ptr(), F_a.data_ptr(), F_b.data_ptr(),
                   x.data_ptr(), z.data_ptr(), t.data_ptr(), t.stride(0), out.data_ptr(), x.shape[0], _row_size(x),
                   lam, eps, transport)
    return out


@torch.library.register_fake(f"{_NS}::fd_target")
def _fd_target_fake(F_t, F_a, F_b, x, z, t, lam, eps, transport):
    return x.new_empty(x.shape, dtype=compute_dtype(x.dtype))


def _fd_target_op(F_t, F_a, F_b, x, z, t, lam, eps, transport):
    check_raw("fd_target", x, same=(z,), shaped=(F_t, F_a, F_b), rows=(t,))
    check_raw("fd_target", F_t, same=(F_a, F_b))
    return _fd_target_kernel(F_t, F_a, F_b, x, z, t, lam, eps, transport)


torch.library.impl(f"{_NS}::fd_target", ("CPU", "CUDA"), _fd_target_op)


# ---------------------------------------------------------------------------------------------
# ucgm_loss (+ fused backward)
# ---------------------------------------------------------------------------------------------

torch.library.define(
    f"{_NS}::ucgm_loss",
    "(Tensor F, Tensor target, Tensor t, float huber_eps, bool cosine, bool time_weighting) -> (Tensor, Tensor)")
torch.library.define(
    f"{_NS}::ucgm_loss_backward",
    "(Tensor grad, Tensor F, Tensor target, Tensor t, Tensor root, bool cosine, bool time_weighting, "
    "bool target_grad) -> (Tensor, Tensor)")


def _loss_kernel(F, target, t, huber_eps, cosine, time_weighting):
    # Rows of no elements (B > 0, numel 0): a mean over nothing, NaN as in the reference; the kernels
    # assume at least one element per row.
    if not _LOSS.available(F) or (F.numel() == 0 and F.shape[0] > 0):
        return reference.ucgm_loss_op(F, target, t, huber_eps, cosine, time_weighting)
    F, target = _contig(F), _contig(target)
    t = _times(t, target)
    ct = compute_dtype(target.dtype)
    loss = torch.empty((), dtype=ct, device=F.device)
    root = torch.empty((F.shape[0],), dtype=ct, device=F.device)
    channels, positions = _loss_layout(F, cosine)
    ws = torch.empty((_C.ucgm_loss_workspace_size(F.shape[0], positions) if F.is_cuda else 0,), dtype=ct,
                     device=F.device)
    _LOSS(F, DTYPE_CODE[F.dtype], DTYPE_CODE[target.dtype], F.data_ptr(), target.data_ptr(), t.data_ptr(),
          t.stride(0), loss.data_ptr(), root.data_ptr(), ws.data_ptr(), F.shape[0], channels, positions,
          float(huber_eps), int(cosine), int(time_weighting))
    return loss, root


def _loss_backward_kernel(grad, F, target, t, root, cosine, time_weighting, target_grad):
    if not _LOSS_BACKWARD.available(F):
        return fresh_outputs(reference.ucgm_loss_backward_op(grad, F, target, t, root, cosine, time_weighting,
                                                             target_grad), F, target)
    F, target, root = _contig(F), _contig(target), _contig(root)
    t = _times(t, target)
    ct = compute_dtype(target.dtype)
    grad = _contig(grad.to(ct))
    gF = torch.empty_like(F, memory_format=torch.contiguous_format)
    gT = torch.empty_like(target, memory_format=torch.contiguous_format) if target_grad else \
        target.new_empty((0,))
    channels, positions = _loss_layout(F, cosine)
    if F.numel():
        _LOSS_BACKWARD(F, DTYPE_CODE[F.dtype], DTYPE_CODE[target.dtype], grad.data_ptr(), F.data_ptr(),
                       target.data_ptr(), t.data_ptr(), t.stride(0), root.data_ptr(), gF.data_ptr(),
                       gT.data_ptr() if target_grad else 0, F.shape[0], channels, positions, int(cosine),
                       int(time_weighting))
    return gF, gT


@torch.library.register_fake(f"{_NS}::ucgm_loss")
def _loss_fake(F, target, t, huber_eps, cosine, time_weighting):
    ct = compute_dtype(target.dtype)
    return F.new_empty((), dtype=ct), F.new_empty((F.shape[0],), dtype=ct)


@torch.library.register_fake(f"{_NS}::ucgm_loss_backward")
def _loss_backward_fake(grad, F, target, t, root, cosine, time_weighting, target_grad):
    gT = torch.empty_like(target, memory_format=torch.contiguous_format) if target_grad else target.new_empty((0,))
    return torch.empty_like(F, memory_format=torch.contiguous_format), gT


def _loss_op(F, target, t, huber_eps, cosine, time_weighting):
    check_raw("ucgm_loss", F, shaped=(target,), rows=(t,))
    return _loss_kernel(F, target, t, huber_eps, cosine, time_weighting)


def _loss_backward_op(grad, F, target, t, root, cosine, time_weighting, target_grad):
    check_raw("ucgm_loss_backward", F, shaped=(target,), rows=(t, root))
    if grad.numel() != 1 or root.dtype != compute_dtype(target.dtype):
        raise ValueError("ucgm_fast::ucgm_loss_backward: grad must hold one value and root the forward's "
                         f"{compute_dtype(target.dtype)} (B,) output")
    return _loss_backward_kernel(grad, F, target, t, root, cosine, time_weighting, target_grad)


torch.library.impl(f"{_NS}::ucgm_loss", ("CPU", "CUDA"), _loss_op)
torch.library.impl(f"{_NS}::ucgm_loss_backward", ("CPU", "CUDA"), _loss_backward_op)


def _loss_setup_context(ctx, inputs, output):
    F, target, t, huber_eps, cosine, time_weighting = inputs
    F, target, t = (saveable(v) for v in (F, target, t))
    ctx.save_for_backward(F, target, t, output[1])
    ctx.huber_eps, ctx.cosine, ctx.time_weighting = huber_eps, cosine, time_weighting
    ctx.mark_non_differentiable(output[1])


def _loss_backward(ctx, grad, _grad_root):
    if grad is None:  # _EagerLoss does not materialize the zero gradient of an unused loss
        return None, None, None, None, None, None
    F, target, t, root = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph: the gradient must be differentiable again; the fused kernel's is not, so
        # take autograd's gradient of the reference loss, recorded in terms of F and target.
        wrt = [v for v in (F, target) if v.requires_grad]
        loss = reference.ucgm_loss_op(F, target, t, ctx.huber_eps, ctx.cosine, ctx.time_weighting)[0]
        grads = iter(torch.autograd.grad(loss, wrt, grad, create_graph=True))
        gF, gT = (next(grads) if v.requires_grad else None for v in (F, target))
        return gF, gT, None, None, None, None
    target_grad = bool(ctx.needs_input_grad[1])
    backward = _loss_backward_kernel if eager_fast_path(grad, F, target, t, root) else \
        torch.ops.ucgm_fast.ucgm_loss_backward
    gF, gT = backward(grad, F, target, t, root, ctx.cosine, ctx.time_weighting, target_grad)
    return gF, (gT if target_grad else None), None, None, None, None


torch.library.register_autograd(f"{_NS}::ucgm_loss", _loss_backward, setup_context=_loss_setup_context)


class _EagerLoss(torch.autograd.Function):
    """The same forward and backward for eager autograd, without the op's dispatch.

    Through the dispatcher, recording the op for autograd and running its registered backward cost
    ~250 us of Python per training step: a quarter of the objective's time at batch 256 on a GPU,
    where every kernel here takes microseconds. Tracing and torch.func still get the custom op.
    """

    # forward(ctx, ...) rather than a separate setup_context: with one, every apply() binds the
    # arguments through inspect.signature (~70 us).
    @staticmethod
    def forward(ctx, *inputs):
        output = _loss_kernel(*inputs)
        _loss_setup_context(ctx, inputs, output)
        # The (B,) root output is not differentiable: without this, every backward would first
        # allocate and zero a gradient for it (an allocation and a fill launch per step).
        ctx.set_materialize_grads(False)
        return output

    backward = staticmethod(_loss_backward)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _check_model_output(op: str, name: str, F, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """F must be shaped like the data, on its device, in its dtype (or 16-bit for float32 data)."""
    if not isinstance(F, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(F).__name__}")
    if F.shape != like.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(F.shape)} but {like_name} has shape {tuple(like.shape)}; "
                         "they must match")
    if F.device != like.device:
        raise ValueError(f"{op}: {name} is on {F.device} but {like_name} is on {like.device}")
    if F.dtype != like.dtype and not (like.dtype == torch.float32 and F.dtype in _LOW):
        raise TypeError(f"{op}: {name} has dtype {F.dtype} but {like_name} has dtype {like.dtype}; expected the "
                        "same dtype (or float16/bfloat16 model outputs with float32 data)")
    return F


def _ratio(op: str, name: str, value) -> float:
    # abs(v) < inf rather than math.isfinite: the latter is not traceable by torch.compile.
    if not is_real_number(value) or not abs(value) < math.inf:
        raise TypeError(f"{op}: {name} must be a finite number, got {value!r}")
    return float(value)


def _range(op: str, enhanced_range):
    """(lo, hi) with 0 <= lo < hi <= 1; ValueError naming enhanced_range otherwise."""
    try:
        lo, hi = (_ratio(op, "enhanced_range", v) for v in enhanced_range)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: enhanced_range must be two numbers (lo, hi), got {enhanced_range!r}") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"{op}: enhanced_range must be increasing within [0, 1] (0 <= lo < hi <= 1), "
                         f"got {enhanced_range!r}")
    return lo, hi


def _consistency(op: str, consistency_ratio) -> float:
    lam = _ratio(op, "consistency_ratio", consistency_ratio)
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"{op}: consistency_ratio must be in (0, 1] for a finite-difference target, got {lam}")
    return lam


def _fd_eps(op: str, fd_eps) -> float:
    eps = _ratio(op, "fd_eps", fd_eps)
    if eps <= 0:
        raise ValueError(f"{op}: fd_eps must be > 0, got {eps}")
    return eps


def enhance_target(x, z, F_w, F_wo, t, transport, ratio, enhanced_range=(0.0, 0.75), num_dropped=0,
                   return_target=False):
    """x_tar = x + e (x_w - x_wo) in range, (x + x_w)/2 out of range, (x + x_wo)/2 dropped (same for z).

    (x_w, z_w) and (x_wo, z_wo) are the decoded predictions of the model outputs ``F_w`` and
    ``F_wo`` at x_t = alpha_in(t) z + gamma_in(t) x (decoding is fused in). Per row, "in range"
    means not label-dropped and lo < t < hi; the last ``num_dropped`` rows are the dropped ones.
    Rows are chosen inside the kernel: no mask, no boolean indexing, no host synchronization.

    Parameters
    ----------
    x, z : Tensor
        Data and noise, shape (B, ...), same dtype and device.
    F_w : Tensor
        Model output "with" (label / guidance), shaped like x; x's dtype or float16/bfloat16 for
        float32 data.
    F_wo : Tensor or None
        Model output "without" (null label). None selects the consistency form (lambda > 0): the
        "without" prediction is the unmodified target (x, z) itself.
    t : float or Tensor
        One time per sample: a float, a 0-d tensor, (B,) or (B, 1, ..., 1).
    transport : str or Transport
        One of :data:`ucgm_fast.TRANSPORTS` or a user-defined :class:`ucgm_fast.Transport`.
    ratio : float
        The enhancement ratio e (used as given; :class:`ucgm_fast.UCGM` applies the published
        remapping of e >= 1 at lambda = 0).
    enhanced_range : (float, float)
        (lo, hi), 0 <= lo < hi <= 1.
    num_dropped : int
        Number of trailing label-dropped rows, 0 <= num_dropped <= B.
    return_target : bool
        If True return the regression target alpha_to(t) z_tar + gamma_to(t) x_tar instead.

    Returns
    -------
    (x_tar, z_tar) : tuple of Tensor
        In the data dtype; or, with ``return_target``, one Tensor in the compute dtype (float32,
        float64 for float64 data). Constants for training: no gradient flows through them.
    """
    op = "enhance_target"
    tr = get_transport(transport)
    check_data(op, x=x, z=z)
    _check_model_output(op, "F_w", F_w, x, "x")
    if F_wo is not None:
        _check_model_output(op, "F_wo", F_wo, x, "x")
        if F_wo.dtype != F_w.dtype:
            raise TypeError(f"{op}: F_wo has dtype {F_wo.dtype} but F_w has dtype {F_w.dtype}")
    e = _ratio(op, "ratio", ratio)
    lo, hi = _range(op, enhanced_range)
    if isinstance(num_dropped, bool) or not isinstance(num_dropped, numbers.Integral) \
            or not 0 <= num_dropped <= x.shape[0]:
        raise ValueError(f"{op}: num_dropped must be an int in [0, B={x.shape[0]}], got {num_dropped!r}")
    return _enhance(x, z, F_w, F_wo, batch_times(op, t, x), tr, e, lo, hi, int(num_dropped), bool(return_target))


# The private runners below take checked arguments: t as its (B,) tensor, the Transport, plain
# numbers. The public functions check and call them; UCGM.loss checks once per step and calls them
# directly, since at training sizes the checks cost as much host time as the kernels.

def _enhance(x, z, F_w, F_wo, tt, tr, e, lo, hi, ndrop, return_target):
    args = (x.detach(), z.detach(), F_w.detach(), None if F_wo is None else F_wo.detach(), tt.detach())
    if tr.id is None:
        out = reference.enhance_target_op(*args, ndrop, e, lo, hi, tr, return_target)
    elif plain_eager(*args[:3], args[4]):  # detached: no autograd to record
        out = _enhance_kernel(*args, ndrop, e, lo, hi, tr.id, return_target)
    else:
        out = torch.ops.ucgm_fast.enhance_target(*args, ndrop, e, lo, hi, tr.id, return_target)
    return out[0] if return_target else out


def fd_inputs(x, z, t, transport, consistency_ratio, fd_eps=0.005):
    """x'_r = alpha_in(r) z + gamma_in(r) x at the finite-difference times r, stacked on the batch.

    lambda = 1: r in (t + eps, t - eps), output (2B, ...) with the t + eps rows first, so one
    model call serves both passes; 0 < lambda < 1: r = t - (t - lambda t), output (B, ...).

    Parameters
    ----------
    x, z : Tensor
        (Enhanced) data and noise, shape (B, ...).
    t : float or Tensor
        One time per sample.
    transport : str or Transport
        The transport.
    consistency_ratio : float
        lambda in (0, 1].
    fd_eps : float
        The central-difference half step (lambda = 1), > 0.

    Returns
    -------
    (inputs, times) : tuple of Tensor
        Model inputs (k B, ...) in x's dtype and their times (k B,) in the compute dtype: constants
        (no gradient flows through them), as the passes they feed run without gradients.
    """
    op = "fd_inputs"
    tr = get_transport(transport)
    check_data(op, x=x, z=z)
    lam, eps = _consistency(op, consistency_ratio), _fd_eps(op, fd_eps)
    return _fd_inputs(x, z, batch_times(op, t, x), tr, lam, eps)


def _fd_inputs(x, z, tt, tr, lam, eps):
    x, z, tt = x.detach(), z.detach(), tt.detach()  # inputs of no-grad model passes: constants
    if tr.id is None:
        return reference.fd_inputs_op(x, z, tt, lam, eps, tr)
    if plain_eager(x, z, tt):  # detached: no autograd to record
        return _fd_inputs_kernel(x, z, tt, lam, eps, tr.id)
    return torch.ops.ucgm_fast.fd_inputs(x, z, tt, lam, eps, tr.id)


def fd_target(F_t, F_a, F_b, x, z, t, transport, consistency_ratio, fd_eps=0.005):
    """target = F_t - alpha_in(t)/den(t) * 4/sin(1.57 t) * clamp((f(r_a) - f(r_b)) / (r_a - r_b), -1, 1).

    f(r) = (F_r alpha_in(r) - x'_r alpha_to(r)) / den(r), x'_r = alpha_in(r) z + gamma_in(r) x.
    lambda = 1: r_a, r_b = t + eps, t - eps (central difference); 0 < lambda < 1: r_a = t (F_a is
    then the online F_t) and r_b = lambda t.

    Parameters
    ----------
    F_t : Tensor
        Online model output at (x_t, t), shape (B, ...) (detached: the target is a constant).
    F_a, F_b : Tensor
        Model outputs at (x'_{r_a}, r_a) and (x'_{r_b}, r_b), shaped like F_t.
    x, z : Tensor
        The (enhanced) data and noise the finite-difference inputs were built from.
    t : float or Tensor
        One time per sample.
    transport : str or Transport
        The transport.
    consistency_ratio : float
        lambda in (0, 1].
    fd_eps : float
        The central-difference half step, > 0.

    Returns
    -------
    Tensor
        The target in the compute dtype (float32 for float32/16-bit data, float64 for float64),
        all in one pass.
    """
    op = "fd_target"
    tr = get_transport(transport)
    check_data(op, x=x, z=z)
    for name, F in (("F_t", F_t), ("F_a", F_a), ("F_b", F_b)):
        _check_model_output(op, name, F, x, "x")
    if not (F_t.dtype == F_a.dtype == F_b.dtype):
        raise TypeError(f"{op}: F_t, F_a and F_b must share a dtype, got {F_t.dtype}, {F_a.dtype}, {F_b.dtype}")
    lam, eps = _consistency(op, consistency_ratio), _fd_eps(op, fd_eps)
    return _fd_target(F_t, F_a, F_b, x, z, batch_times(op, t, x), tr, lam, eps)


def _fd_target(F_t, F_a, F_b, x, z, tt, tr, lam, eps):
    args = tuple(v.detach() for v in (F_t, F_a, F_b, x, z, tt))
    if tr.id is None:
        return reference.fd_target_op(*args, lam, eps, tr)
    if plain_eager(*args):  # detached: no autograd to record
        return _fd_target_kernel(*args, lam, eps, tr.id)
    return torch.ops.ucgm_fast.fd_target(*args, lam, eps, tr.id)


def _time_weighting_flag(op: str, time_weighting) -> bool:
    if time_weighting is None or time_weighting is False:
        return False
    if time_weighting is True:
        return True
    if isinstance(time_weighting, str):
        if time_weighting.lower() == "cosine":
            return True
        if time_weighting.lower() == "none":
            return False
    raise ValueError(f"{op}: time_weighting must be None, False, True or 'cosine', got {time_weighting!r}")


def ucgm_loss(F, target, t, huber_eps=0.0, cosine=False, time_weighting=False):
    """mean_b w_b (sqrt(mean((F_b - T_b)^2) + h^2) - h + [mean(1 - cos_sim(F_b, T_b, dim=1))]).

    w_b = cos(1.57 t_b) with time weighting, 1 otherwise; h = ``huber_eps`` (h = 0: the RMS
    error). The cosine term compares channel vectors (dim 1) at each position and averages over
    positions (for (B, C) data: one cosine per sample). Forward and backward are fused kernels.

    Parameters
    ----------
    F : Tensor
        Model output, shape (B, ...), differentiable.
    target : Tensor
        Regression target shaped like F, in F's dtype (or float32 for a float16/bfloat16 F).
    t : float or Tensor
        One time per sample (used by the time weighting).
    huber_eps : float
        h >= 0.
    cosine : bool
        Add the channel-cosine term.
    time_weighting : bool or {"cosine", None}
        Weight each sample by cos(1.57 t).

    Returns
    -------
    Tensor
        0-d, float32 (float64 for float64 inputs), differentiable w.r.t. F (and target).
    """
    op = "ucgm_loss"
    if not isinstance(F, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: F and target must be torch.Tensors")
    if F.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: F has dtype {F.dtype}; expected float16, bfloat16, float32 or float64")
    if F.dim() == 0:
        raise ValueError(f"{op}: F must have a batch dimension (shape (B, ...)), got a 0-d tensor")
    if target.shape != F.shape:
        raise ValueError(f"{op}: target has shape {tuple(target.shape)} but F has shape {tuple(F.shape)}; "
                         "they must match")
    if target.device != F.device:
        raise ValueError(f"{op}: target is on {target.device} but F is on {F.device}")
    if target.dtype != F.dtype and not (F.dtype in _LOW and target.dtype == torch.float32):
        raise TypeError(f"{op}: target has dtype {target.dtype} but F has dtype {F.dtype}; expected F's dtype "
                        "(or float32 for a float16/bfloat16 F)")
    h = _ratio(op, "huber_eps", huber_eps)
    if h < 0:
        raise ValueError(f"{op}: huber_eps must be >= 0, got {h}")
    if cosine and F.dim() < 2:
        raise ValueError(f"{op}: cosine=True needs F with a channel dimension (B, C, ...), got shape "
                         f"{tuple(F.shape)}")
    return _loss(F, target, batch_times(op, t, target), h, bool(cosine), _time_weighting_flag(op, time_weighting))


def _loss(F, target, tt, h, cosine, tw):
    if needs_reference(tt):
        return reference.ucgm_loss_op(F, target, tt, h, cosine, tw)[0]
    loss = _loss_kernel if eager_fast_path(F, target, tt) else \
        _EagerLoss.apply if plain_eager(F, target, tt) else torch.ops.ucgm_fast.ucgm_loss
    return loss(F, target, tt, h, cosine, tw)[0]
