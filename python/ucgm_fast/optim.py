"""The training tail without per-parameter Python loops: fused AdamW, multi-tensor EMA, gradient hygiene.

The published loop spends most of its tail in Python loops over parameters (``nan_to_num_`` per
gradient, ``mul_/add_`` per EMA tensor). Here each stage is a handful of multi-tensor
(``torch._foreach_*``) or fused kernels whatever the parameter count.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["make_optimizer", "lr_at", "ema_update", "ema_init", "clip_and_sanitize_grads"]


def make_optimizer(params: Iterable[torch.nn.Parameter], type: str = "AdamW", lr: float = 1e-4,
                   weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   **_unused) -> torch.optim.Optimizer:
    """AdamW / Adam with ``fused=True`` where this torch supports it for the parameters' device and
    dtype, else ``foreach=True``; RAdam with ``foreach=True`` (torch has no fused RAdam)."""
    params = list(params)
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=(beta1, beta2), eps=eps)
    if type in ("AdamW", "Adam"):
        cls = torch.optim.AdamW if type == "AdamW" else torch.optim.Adam
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            # fused needs a supported device/dtype (CUDA, or CPU since torch 2.4); foreach is the fallback
            return cls(params, foreach=True, **kwargs)
    if type == "RAdam":
        return torch.optim.RAdam(params, foreach=True, decoupled_weight_decay=True, **kwargs)
    raise ValueError(f"optimizer type: unknown optimizer {type!r}; valid: AdamW, Adam, RAdam")


def lr_at(step: int, total_steps: int, lr: float, lr_schedule: str = "constant", warmup_steps: int = 0,
          min_lr: float = 0.0, **_unused) -> float:
    """lr(s) = lr·min(1, (s+1)/W) · decay: min_lr + (lr-min_lr)·(1+cos(π·p))/2 (cosine) or ·(1-p) (linear).

    p = (s - W) / (total_steps - W) clamped to [0, 1]: the decay starts after the warm-up W and ends at
    ``total_steps``. A pure function of the step, so a resumed run follows the same schedule.
    """
    if lr_schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr_schedule: unknown schedule {lr_schedule!r}; valid: constant, cosine, linear")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return lr
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    shape = 0.5 * (1.0 + math.cos(math.pi * p)) if lr_schedule == "cosine" else 1.0 - p
    return min_lr + (lr - min_lr) * shape


def _float_tensors(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t for t in tensors if t.is_floating_point()]


@torch.no_grad()
def ema_init(ema: torch.nn.Module, model: torch.nn.Module) -> None:
    """ema <- model (parameters and buffers), one multi-tensor copy."""
    torch._foreach_copy_(list(ema.parameters()), list(model.parameters()))
    ema_buffers, buffers = list(ema.buffers()), list(model.buffers())
    if buffers:
        torch._foreach_copy_(ema_buffers, buffers)


class EMA:
    """ema <- decay * ema + (1 - decay) * model over all parameters in one ``_foreach_lerp_``.

    The tensor lists are gathered once (``parameters()`` walks the module tree in Python on every
    call); buffers are copied, as an EMA of running statistics is not what the model computes.
    """

    def __init__(self, ema: torch.nn.Module, model: torch.nn.Module):
        self.ema_params = list(ema.parameters())
        self.params = list(model.parameters())
        if len(self.ema_params) != len(self.params):
            raise ValueError(f"EMA: the EMA model has {len(self.ema_params)} parameters, the model "
                             f"{len(self.params)}")
        self.ema_buffers = _float_tensors(list(ema.buffers()))
        self.buffers = _float_tensors(list(model.buffers()))

    @torch.no_grad()
    def update(self, decay: float) -> None:
        # lerp(ema, p, w) = ema + w (p - ema) = decay*ema + (1-decay)*p with w = 1 - decay
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
        if self.buffers:
            torch._foreach_copy_(self.ema_buffers, self.buffers)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One EMA step; see :class:`EMA` (which keeps the tensor lists across steps)."""
    EMA(ema, model).update(decay)


@torch.no_grad()
def clip_and_sanitize_grads(params: Sequence[torch.nn.Parameter], max_norm: Optional[float] = None,
                            zero_nonfinite: bool = True) -> torch.Tensor:
    """Zeroes nan/inf gradient entries (optional), then clips the global L2 norm to max_norm (optional).

    Returns the global gradient norm before clipping (after zeroing). Costs one ``_foreach_norm``
    for both jobs; only when that norm is not finite (one host sync, skipped when zero_nonfinite is
    False) are the gradients flattened into one buffer, ``nan_to_num_``-ed in one kernel and copied
    back. Zeroing comes before clipping: clipping a non-finite norm would turn every gradient into NaN.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if zero_nonfinite and not bool(torch.isfinite(total)):
        # Dense grads of one device and dtype: flattened in one cat, cleaned in one kernel.
        for group in _group_by_device_dtype(grads).values():
            flat = _flatten_dense_tensors(group)
            flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_copy_(group, _unflatten_dense_tensors(flat, group))
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if max_norm is not None:
        # clip_grad_norm_'s rule, on device: scale = min(1, max_norm / (norm + 1e-6))
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale)
    return total


def _group_by_device_dtype(tensors: Sequence[torch.Tensor]) -> Dict:
    # Only on the rare non-finite path: cat needs one device and dtype per buffer.
    groups: Dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups
