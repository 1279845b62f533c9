"""The training tail without per-parameter Python loops: fused AdamW, multi-tensor EMA, gradient hygiene.

The published loop spends most of its tail in Python loops over parameters (``nan_to_num_`` per
gradient, ``mul_/add_`` per EMA tensor). Here each stage is a handful of multi-tensor
(``torch._foreach_*``) or fused kernels whatever the parameter count.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional

import torch

__all__ = ["make_optimizer", "load_optimizer_state", "lr_at", "ema_update", "ema_init", "FlatGrads"]


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


def load_optimizer_state(opt: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Loads ``state``'s per-parameter moments into ``opt``, keeping ``opt``'s own group settings.

    ``Optimizer.load_state_dict`` also restores the saved hyper-parameters (weight decay, betas, eps,
    fused / foreach); the config the run was started with must win over them, so an override on
    resume takes effect. (The learning rate is set every step by the schedule anyway.)

    The optimizer gets its own copies of the moments: ``Optimizer.load_state_dict`` keeps a tensor that
    is already on the parameter's device and dtype, and it updates them in place every step, while
    :func:`ucgm_fast.checkpoint.load_checkpoint` returns views of the memory-mapped file (copy-on-write,
    so the file would not change, but the mapping would live as long as the run).
    """
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    loaded = {id(v) for s in state.get("state", {}).values() for v in s.values() if isinstance(v, torch.Tensor)}
    opt.load_state_dict(state)
    for group, own in zip(opt.param_groups, settings):
        group.update(own)
    for s in opt.state.values():
        for key, value in s.items():
            if id(value) in loaded:  # not moved or cast by load_state_dict: still the caller's tensor
                s[key] = value.clone()


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
        self.ema_buffers = list(ema.buffers())
        self.buffers = list(model.buffers())

    @torch.no_grad()
    def update(self, decay: float) -> None:
        # lerp(ema, p, w) = ema + w (p - ema) = decay*ema + (1-decay)*p with w = 1 - decay
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
        if self.buffers:
            torch._foreach_copy_(self.ema_buffers, self.buffers)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One EMA step; see :class:`EMA` (which keeps the tensor lists across steps)."""
    EMA(ema, model).update(decay)


class FlatGrads:
    """Gradients as views of one flat buffer per (device, dtype): zeroing, nan/inf cleaning, the
    global norm and clipping are then one kernel each over every parameter, and none of them waits
    for the device.

    Autograd accumulates into a ``.grad`` that is already defined in place, so after
    ``FlatGrads(params)`` each backward writes straight into the buffer. Use :meth:`zero_` instead of
    ``optimizer.zero_grad(set_to_none=True)``, which would detach the views (:meth:`clip_` notices and
    re-attaches them, at the cost of a copy). Costs: the gradients stay allocated between steps, and
    a parameter that gets no gradient sees a zero one (AdamW still decays it) instead of being skipped.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self.views: List[torch.Tensor] = [None] * len(self.params)
        self.flats: List[torch.Tensor] = []
        groups: Dict = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        for (device, dtype), idx in groups.items():
            flat = torch.zeros(sum(self.params[i].numel() for i in idx), device=device, dtype=dtype)
            offset = 0
            for i in idx:
                p = self.params[i]
                self.views[i] = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            self.flats.append(flat)
        self.attach()

    def attach(self) -> None:
        """Makes every ``.grad`` a view of the buffer again (after something replaced or cleared it).

        The one per-parameter loop: identity checks, plus a copy for a grad someone replaced.
        """
        with torch.no_grad():
            for p, v in zip(self.params, self.views):
                if p.grad is not v:
                    if p.grad is None:
                        v.zero_()
                    else:
                        v.copy_(p.grad)
                    p.grad = v

    @torch.no_grad()
    def zero_(self) -> None:
        """g <- 0 for every gradient: one fill per buffer."""
        for flat in self.flats:
            flat.zero_()

    @torch.no_grad()
    def clip_(self, max_norm: Optional[float] = None, zero_nonfinite: bool = True) -> torch.Tensor:
        """The published gradient hygiene: ``clip_grad_norm_`` over the raw gradients, then ``nan_to_num``.

        With ``max_norm``: n = ‖g‖₂ over all raw gradients, g <- nan_to_num(g) · s with
        s = min(1, max_norm / (n + 1e-6)) when n is finite, else 0. A single inf or NaN entry makes the
        published clip factor 0 or NaN, which ``nan_to_num`` then turns into an all-zero gradient (AdamW
        still applies its momentum and weight decay), rather than a step with the bad entries dropped
        and the rest rescaled by a norm that left them out.
        Without ``max_norm``: g <- nan_to_num(g), the bad entries alone are zeroed (as published).
        ``zero_nonfinite=False`` leaves out the ``nan_to_num`` (non-finite entries then stay, as NaN
        where the factor is 0).

        Returns the global L2 norm as a 0-d tensor: with ``max_norm``, that of the raw gradients
        (before zeroing and clipping; inf or NaN when an entry is, as ``clip_grad_norm_`` returns it);
        without, that of the gradients after zeroing. Nothing here synchronizes with the host.
        """
        self.attach()
        if max_norm is None and zero_nonfinite:
            for flat in self.flats:
                flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        norms = [torch.linalg.vector_norm(flat, 2.0, dtype=torch.promote_types(flat.dtype, torch.float32))
                 for flat in self.flats]
        if not norms:
            return torch.zeros(())
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(
            torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
        if max_norm is not None:
            # The factor is computed on the device from the raw norm (a where, not an ``if``: no sync).
            scale = torch.where(torch.isfinite(total), torch.clamp(max_norm / (total + 1e-6), max=1.0),
                                torch.zeros_like(total))
            for flat in self.flats:
                if zero_nonfinite:
                    flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                flat.mul_(scale.to(flat.device))
        return total
