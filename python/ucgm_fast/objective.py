"""The UCGM training objective: one object trains multi-step (lambda = 0), few-step (lambda = 1)
and everything between, as published (Sun, Jiang, Lin 2025; LINs-lab/UCGM), formulas in :class:`UCGM`.

    ucgm = UCGM(transport="Linear", consistency_ratio=1.0, enhanced_ratio=2.0, ...)
    for x, y in loader:
        loss = ucgm.loss(model, x, y)
        opt.zero_grad(); loss.backward(); opt.step()
        ucgm.update_target(model)          # once per optimizer step (EMA target network)

Target network (used only when enhanced_ratio != 0), per ``target_ema_decay`` = D:

* 0 < D < 1: an EMA of the model. :meth:`loss` creates it lazily (a copy of the model: the
  published first update, whose decay is 0); :meth:`update_target` -- call it once after each
  optimizer step -- moves it with decay d, then d <- d + (1 - d)(D - d)/2, exactly the published
  sequence (the published step updates before its passes; updating after the previous step is the
  same arithmetic).
* D = 1: a frozen copy taken at the first :meth:`loss` call; :meth:`update_target` does nothing.
* D = 0: the online model itself; nothing is copied.

The target network, d and the update count are in :meth:`state_dict`, so a resumed run continues
the same EMA (and the same frozen copy). All the work between model calls runs in fused kernels
that never synchronize with the host, so the loss (model calls included) can be captured in a CUDA
graph (after a warm-up call has created the target network). :meth:`update_target` stays outside the
graph: its decay d changes every step and is passed from the host.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch

from ._validate import batch_times, check_data, compute_dtype
from .ops.objective import (_check_model_output, _enhance, _fd_inputs, _fd_target, _loss, _range, _ratio,
                             _time_weighting_flag)
from .ops.transport import _interpolate
from .transports import Transport, get_transport

__all__ = ["UCGM"]


# Published YAML `transport:` keys -> constructor arguments.
_PUBLISHED_KEYS = {
    "type": "transport", "consistc_ratio": "consistency_ratio", "enhanced_ratio": "enhanced_ratio",
    "lab_drop_ratio": "label_drop_ratio", "scaled_cbl_eps": "huber_eps", "ema_decay_rate": "target_ema_decay",
    "enhanced_range": "enhanced_range", "time_dist_ctrl": "time_dist", "weight_funcion": "time_weighting",
    "wt_cosine_loss": "cosine_loss",
}


def _unwrap_ddp(model):
    """The module inside DistributedDataParallel / DataParallel (the no-grad passes skip its hooks)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def _version(v: torch.Tensor):
    """v's version counter (it counts in-place writes), or None where there is none to read: under
    torch.compile, and for inference tensors. Lets model calls share an input while none writes it."""
    if torch.compiler.is_compiling() or v.is_inference():
        return None
    return v._version


def _unwrap_all(model):
    """The plain module: DDP / DataParallel and torch.compile wrappers removed."""
    while True:
        model = _unwrap_ddp(model)
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        return model


class UCGM:
    """Unified Continuous Generative Model objective: loss(model, x, y) for any consistency ratio.

    Parameters
    ----------
    transport : str or Transport
        One of :data:`ucgm_fast.TRANSPORTS` or a user-defined :class:`ucgm_fast.Transport`.
    consistency_ratio : float
        lambda in [0, 1]: 0 = flow matching / diffusion, 1 = consistency model.
    enhanced_ratio : float
        e >= 0, the enhanced-target ratio (0 disables it). At lambda = 0 a ratio e >= 1 is
        remapped to (e - 1)/e, as published.
    enhanced_range : (float, float)
        (lo, hi) with 0 <= lo < hi <= 1: rows with lo < t < hi get the enhanced target.
    label_drop_ratio : float
        p in [0, 1): the last round(p B) labels of each batch become the null class
        ``model.num_classes``.
    huber_eps : float
        h >= 0 of the pseudo-Huber loss sqrt(mean (F - target)^2 + h^2) - h.
    cosine_loss : bool
        Add mean(1 - cos_sim(F, target, dim=1)).
    time_weighting : {None, "cosine"}
        Weight each sample's loss by cos(1.57 t).
    time_dist : (float, float, float)
        (a, b, c): t ~ Beta(a, b) * c, clamped to [0, 1].
    target_ema_decay : float
        D in [0, 1] of the target network (see the module docstring).
    fd_eps : float
        eps > 0 of the central difference at lambda = 1.
    batch_fd_passes : bool, keyword-only
        At lambda = 1 run the two no-grad passes (t + eps, t - eps) as one model call of 2B
        samples (default); False runs two calls of B (less peak memory).

    Notes
    -----
    The model is called as ``model(x_t, t, y)`` with ``t`` of shape (B,) and must return a tensor
    shaped like x (its dtype, or float16/bfloat16 for float32 x under autocast). It should be
    deterministic: the published code replays the CUDA RNG state before every pass, which would
    synchronize with the host; ucgm_fast does not.

    For 0 < lambda < 1, f(t) uses the online output F_t already computed at the original x_t
    together with the enhanced x'_t (as the published code does, and as its checkpoints were
    trained); only f(lambda t) costs a model pass. With D = 0 and lambda > 0 the enhanced target's
    "with" prediction is F_t itself (the same model at the same input), saving a pass.

    The target copy (D > 0) follows the model to another device or dtype when the model moves
    after the copy was made.
    """

    def __init__(self, transport="Linear", consistency_ratio=0.0, enhanced_ratio=0.0, enhanced_range=(0.0, 0.75),
                 label_drop_ratio=0.1, huber_eps=0.0, cosine_loss=False, time_weighting=None,
                 time_dist=(1.0, 1.0, 1.0), target_ema_decay=0.999, fd_eps=0.005, *, batch_fd_passes=True):
        self.transport: Transport = get_transport(transport)
        self.consistency_ratio = _ratio("UCGM", "consistency_ratio", consistency_ratio)
        if not 0.0 <= self.consistency_ratio <= 1.0:
            raise ValueError(f"UCGM: consistency_ratio must be in [0, 1], got {consistency_ratio!r}")
        self.enhanced_ratio = _ratio("UCGM", "enhanced_ratio", enhanced_ratio)
        if self.enhanced_ratio < 0:
            raise ValueError(f"UCGM: enhanced_ratio must be >= 0, got {enhanced_ratio!r}")
        self.enhanced_range = _range("UCGM", enhanced_range)
        self.label_drop_ratio = _ratio("UCGM", "label_drop_ratio", label_drop_ratio)
        if not 0.0 <= self.label_drop_ratio < 1.0:
            raise ValueError(f"UCGM: label_drop_ratio must be in [0, 1), got {label_drop_ratio!r}")
        self.huber_eps = _ratio("UCGM", "huber_eps", huber_eps)
        if self.huber_eps < 0:
            raise ValueError(f"UCGM: huber_eps must be >= 0, got {huber_eps!r}")
        if cosine_loss not in (True, False):  # 0 and 1 too, as a YAML or argparse value may be
            raise TypeError(f"UCGM: cosine_loss must be a bool, got {cosine_loss!r}")
        self.cosine_loss = bool(cosine_loss)
        self.time_weighting = "cosine" if _time_weighting_flag("UCGM", time_weighting) else None
        try:
            a, b, c = (_ratio("UCGM", "time_dist", v) for v in time_dist)
        except (TypeError, ValueError):
            raise ValueError(f"UCGM: time_dist must be three numbers (a, b, c), got {time_dist!r}") from None
        if min(a, b, c) <= 0:
            raise ValueError(f"UCGM: time_dist (a, b, c) must be positive, got {time_dist!r}")
        self.time_dist = (a, b, c)
        self.target_ema_decay = _ratio("UCGM", "target_ema_decay", target_ema_decay)
        if not 0.0 <= self.target_ema_decay <= 1.0:
            raise ValueError(f"UCGM: target_ema_decay must be in [0, 1], got {target_ema_decay!r}")
        self.fd_eps = _ratio("UCGM", "fd_eps", fd_eps)
        if self.fd_eps <= 0:
            raise ValueError(f"UCGM: fd_eps must be > 0, got {fd_eps!r}")
        self.batch_fd_passes = bool(batch_fd_passes)

        # The ratio the kernels use: the published remapping of e >= 1 at lambda = 0.
        e = self.enhanced_ratio
        self._ratio = (e - 1.0) / e if (e >= 1.0 and self.consistency_ratio == 0.0) else e

        self.target: Optional[torch.nn.Module] = None  # the EMA / frozen copy (None until needed)
        self._target_call = None  # self.target, or its torch.compile wrapper for a compiled model
        self.target_decay = 0.0  # d of the next EMA update
        self.target_updates = 0
        self._pending_target_state = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, d):
        """A UCGM from a dict of constructor arguments or of the published YAML ``transport:`` keys.

        A whole published config (a dict with a ``transport:`` mapping) is accepted too. Published
        keys: type, consistc_ratio, enhanced_ratio, lab_drop_ratio, scaled_cbl_eps, ema_decay_rate,
        enhanced_range, time_dist_ctrl, weight_funcion, wt_cosine_loss.
        """
        if not isinstance(d, dict):
            raise TypeError(f"UCGM.from_config: expected a dict, got {type(d).__name__}")
        import inspect
        valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
        if isinstance(d.get("transport"), dict):
            # A whole config: its other sections are not ours, but a stray constructor argument beside
            # the mapping would be silently dropped.
            stray = sorted(k for k in d if k != "transport" and _PUBLISHED_KEYS.get(k, k) in valid)
            if stray:
                raise ValueError(f"UCGM.from_config: {', '.join(map(repr, stray))} given beside a 'transport' "
                                 "mapping; put them inside it")
            d = d["transport"]
        kwargs = {}
        for key, value in d.items():
            name = _PUBLISHED_KEYS.get(key, key)
            if name not in valid:
                raise ValueError(f"UCGM.from_config: unknown key {key!r}; expected constructor arguments "
                                 f"({', '.join(sorted(valid))}) or published keys ({', '.join(_PUBLISHED_KEYS)})")
            if name in kwargs:
                raise ValueError(f"UCGM.from_config: {key!r} given twice (as {name!r})")
            kwargs[name] = value
        return cls(**kwargs)

    def __repr__(self):
        return (f"UCGM(transport={self.transport.name!r}, consistency_ratio={self.consistency_ratio}, "
                f"enhanced_ratio={self.enhanced_ratio}, enhanced_range={self.enhanced_range}, "
                f"label_drop_ratio={self.label_drop_ratio}, huber_eps={self.huber_eps}, "
                f"cosine_loss={self.cosine_loss}, time_weighting={self.time_weighting!r}, "
                f"time_dist={self.time_dist}, target_ema_decay={self.target_ema_decay}, fd_eps={self.fd_eps})")

    # -- target network ----------------------------------------------------------------------

    @property
    def uses_target_copy(self) -> bool:
        """Whether a separate target network (EMA or frozen copy) is kept: enhancement on and D > 0."""
        return self._ratio != 0.0 and self.target_ema_decay > 0.0

    def _create_target(self, model):
        base = _unwrap_all(model)
        if not isinstance(base, torch.nn.Module):
            raise TypeError(f"UCGM.loss: the target network is a copy of the model (enhancement with "
                            f"target_ema_decay={self.target_ema_decay} > 0), which needs a torch.nn.Module; got "
                            f"{type(base).__name__}. Use target_ema_decay=0 for a plain function")
        target = copy.deepcopy(base).requires_grad_(False).train()
        if self._pending_target_state is not None:
            try:
                target.load_state_dict(self._pending_target_state)
            except RuntimeError as err:
                raise ValueError(f"UCGM: the loaded target network state does not fit the model: {err}") from None
            self._pending_target_state = None
        else:
            # The copy is the published first EMA update (decay 0): d moves on from 0.
            self.target_decay = self._next_decay(0.0)
            self.target_updates = 1
        compiled = _unwrap_ddp(model) is not base
        self.target = target  # assigned last: a failed load leaves no half-made copy behind
        self._target_call = torch.compile(target) if compiled else target

    def check_target_state(self, model) -> None:
        """ValueError when a loaded target-network state (kept until the copy is made) does not fit ``model``:
        names and shapes, checked now rather than at the first loss."""
        pending = self._pending_target_state
        if pending is None:
            return
        own = _unwrap_all(model).state_dict()
        wrong = sorted(set(pending) ^ set(own)) + sorted(k for k in set(pending) & set(own)
                                                        if pending[k].shape != own[k].shape)
        if wrong:
            raise ValueError(f"UCGM: the loaded target network state does not fit the model: {', '.join(wrong[:8])}"
                             f"{' ...' if len(wrong) > 8 else ''}")

    def _next_decay(self, d: float) -> float:
        D = self.target_ema_decay
        return d + (1.0 - d) * (D - d) * 0.5

    def target_network(self, model):
        """The network of the enhanced target: the EMA / frozen copy (created on first use) or the model."""
        if not self.uses_target_copy:
            return _unwrap_ddp(model)
        if self.target is None:
            self._create_target(model)
        else:
            self._follow(_unwrap_all(model))
        return self._target_call

    @torch.no_grad()
    def _follow(self, base) -> None:
        """Moves the copy's tensors to the device and dtype of the model's same-named ones when the
        model moved after the copy was made (``model.cuda()``, ``model.double()``): the copy would
        otherwise fail in its forward or in the EMA update with a bare dtype/device error. Checked
        on the first parameter, each call (a microsecond)."""
        p, q = next(base.parameters(), None), next(self.target.parameters(), None)
        if p is None or q is None or (p.device == q.device and p.dtype == q.dtype):
            return
        own = dict(base.named_parameters())
        own.update(base.named_buffers())
        for name, v in [*self.target.named_parameters(), *self.target.named_buffers()]:
            src = own.get(name)
            if src is not None and (v.device != src.device or v.dtype != src.dtype):
                v.data = v.data.to(device=src.device, dtype=src.dtype)

    @torch.no_grad()
    def update_target(self, model) -> None:
        """One EMA step of the target network toward ``model``: p_tgt <- d p_tgt + (1 - d) p, then d moves toward D.

        Call once per optimizer step, after ``opt.step()``. A no-op for D = 0 (online model),
        D = 1 (frozen copy) and without enhancement; creates the copy if no loss ran yet.
        """
        if not self.uses_target_copy:
            return
        if self.target is None:
            self._create_target(model)
            return
        base = _unwrap_all(model)
        self._follow(base)
        if self.target_ema_decay >= 1.0:
            return
        src = dict(base.named_parameters())
        dst, new = [], []
        for name, p in self.target.named_parameters():
            if name not in src:
                raise KeyError(f"UCGM.update_target: parameter {name!r} of the target network is not in the model")
            dst.append(p)
            new.append(src[name].detach())
        weight = 1.0 - self.target_decay
        if dst:
            torch._foreach_lerp_(dst, new, weight)  # one multi-tensor launch per dtype/device group
        self.target_decay = self._next_decay(self.target_decay)
        self.target_updates += 1

    def state_dict(self) -> "OrderedDict[str, object]":
        """target_decay, target_updates and the target network's tensors under ``mod.`` (as published)."""
        sd = OrderedDict(target_decay=self.target_decay, target_updates=self.target_updates)
        state = self.target.state_dict() if self.target is not None else self._pending_target_state
        for k, v in (state or {}).items():
            sd["mod." + k] = v
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Restores :meth:`state_dict` (also a published ``unigen`` checkpoint's ``mod.*`` entries).

        If the target network does not exist yet its tensors are kept and loaded when it is created.
        """
        target = OrderedDict()
        for key, value in state_dict.items():
            if key == "target_decay":
                self.target_decay = float(value)
            elif key == "target_updates":
                self.target_updates = int(value)
            elif key.startswith("mod."):
                name = key[4:]
                while name.startswith("module."):
                    name = name[7:]
                target[name] = value
            else:
                raise ValueError(f"UCGM.load_state_dict: unexpected key {key!r}")
        if not self.uses_target_copy:
            return  # D = 0 keeps no copy (a published checkpoint then stores the online model itself)
        if not target:
            # Saved before the copy existed: so it is again, made from the model at the next use.
            self.target = self._target_call = self._pending_target_state = None
            return
        # Copies: the caller's tensors may go on changing (another UCGM's live state).
        target = OrderedDict((k, v.detach().clone()) for k, v in target.items())
        if self.target is not None:
            self.target.load_state_dict(target)
        else:
            self._pending_target_state = target

    # -- the loss -----------------------------------------------------------------------------

    def num_dropped(self, batch: int) -> int:
        """round(p B) trailing labels are dropped (Python round, as published); errors if p > 0 drops none."""
        n = round(self.label_drop_ratio * batch)
        if self.label_drop_ratio > 0 and n == 0:
            raise ValueError(f"UCGM.loss: batch of {batch} is too small for label_drop_ratio="
                             f"{self.label_drop_ratio}: round(p * B) = 0 would drop no label (the published code "
                             "would drop all); use a larger batch or label_drop_ratio=0")
        return n

    def sample_time(self, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        """t ~ Beta(a, b) * c clamped to [0, 1], shape (B,), sampled on the device (no host sync)."""
        a, b, c = self.time_dist
        ga = torch._standard_gamma(torch.full((batch,), a, dtype=dtype, device=device))
        gb = torch._standard_gamma(torch.full((batch,), b, dtype=dtype, device=device))
        return torch.clamp(ga / (ga + gb) * c, 0.0, 1.0)

    @staticmethod
    def _null_class(model) -> int:
        m = model
        for _ in range(8):  # the published lookup walks .module; also step through torch.compile
            if hasattr(m, "num_classes"):
                return int(m.num_classes)
            m = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
            if m is None:
                break
        raise ValueError("UCGM.loss: the model has no num_classes attribute, needed as the null (dropped) label; "
                         "set model.num_classes or use label_drop_ratio=0 (and no enhancement at lambda = 0)")

    @staticmethod
    def _check_output(F, x, what="model", like=None):
        """F must be a tensor shaped like x, in x's dtype (or 16-bit for float32 x), and in like's dtype
        when given: the kernels read all of one step's model outputs as one dtype."""
        _check_model_output("UCGM.loss", f"the {what} output", F, x, "x")
        if like is not None and F.dtype != like.dtype:
            raise TypeError(f"UCGM.loss: the {what} output has dtype {F.dtype} but the model's output at x_t "
                            f"has dtype {like.dtype}; run every pass the same way (e.g. all under one autocast)")

    def loss(self, model, x, y, t=None, z=None) -> torch.Tensor:
        """The scalar UCGM training loss of one batch, differentiable w.r.t. the model's parameters.

        Parameters
        ----------
        model : callable
            ``model(x_t, t, y)``, t of shape (B,); ``model.num_classes`` is the null label.
        x : Tensor
            Data (latents), shape (B, ...).
        y : Tensor
            Integer class labels, shape (B,). Not modified (the published code drops in place).
        t : float or Tensor, optional
            Times (B,) (or a float); sampled from Beta(a, b) * c on the device when omitted.
        z : Tensor, optional
            Noise shaped like x; ``torch.randn_like(x)`` when omitted. Given t and z the loss
            is deterministic.

        Returns
        -------
        Tensor
            0-d, float32 (float64 for float64 data).
        """
        op = "UCGM.loss"
        check_data(op, x=x)
        B = x.shape[0]
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"{op}: y must be an integer tensor of class labels, got "
                            f"{type(y).__name__ if not isinstance(y, torch.Tensor) else y.dtype}")
        if y.shape != (B,):
            raise ValueError(f"{op}: y has shape {tuple(y.shape)}; expected ({B},), one label per sample")
        if y.device != x.device:
            raise ValueError(f"{op}: y is on {y.device} but x is on {x.device}")
        ndrop = self.num_dropped(B)
        t = self.sample_time(B, x.device, compute_dtype(x.dtype)) if t is None else batch_times(op, t, x)
        if z is None:
            z = torch.randn_like(x)
        else:
            check_data(op, x=x, z=z)
        lam, e, tr = self.consistency_ratio, self._ratio, self.transport
        if self.cosine_loss and x.dim() < 2:
            raise ValueError(f"{op}: cosine_loss needs data with a channel dimension (B, C, ...), got shape "
                             f"{tuple(x.shape)}")
        null = self._null_class(model) if (ndrop > 0 or (lam == 0.0 and e != 0.0)) else None
        # The labels of the batched finite-difference passes (y twice) are made first, when they are
        # needed, and y is their first half: one copy and one fill per step instead of two each.
        y2 = torch.cat([y, y]) if lam == 1.0 and self.batch_fd_passes else None
        if y2 is not None:
            if ndrop:
                y2.view(2, B).narrow(1, B - ndrop, ndrop).fill_(null)
            y, y2_version = y2[:B], _version(y2)
        elif ndrop:
            y = y.clone()
            y.narrow(0, B - ndrop, ndrop).fill_(null)  # a host-known bound: no mask, no sync

        # Everything is checked above and each model output as it comes: the ops' private runners
        # skip the public functions' checks (host time that matters at training sizes).
        lo, hi = self.enhanced_range
        x_t, target = _interpolate(x, z, t, tr)
        # Model calls get a copy of t (B numbers): t is read again below, and a model may scale its
        # time input in place. The training target is a constant in every regime.
        t_in = t.clone()
        t_version = _version(t_in)
        F_t = model(x_t, t_in, y)
        if t_version is None or _version(t_in) != t_version:
            t_in = t.clone()  # the call wrote its time input: the next gets a copy of its own
        target = target.detach()
        self._check_output(F_t, x)
        F_d = F_t.detach()
        if lam == 0.0:
            if e != 0.0:
                with torch.no_grad():
                    F_wo = self.target_network(model)(x_t, t_in, torch.full_like(y, null))
                    self._check_output(F_wo, x, "target network", like=F_d)
                    target = _enhance(x, z, F_d, F_wo, t, tr, e, lo, hi, ndrop, True)
        else:
            with torch.no_grad():
                if e != 0.0:
                    # D = 0: the target network is the online model at the same input, i.e. F_t itself.
                    F_w = F_d if not self.uses_target_copy else self.target_network(model)(x_t, t_in, y)
                    self._check_output(F_w, x, "target network")
                    x_tar, z_tar = _enhance(x, z, F_w, None, t, tr, e, lo, hi, ndrop, False)
                else:
                    x_tar, z_tar = x, z
                inputs, r = _fd_inputs(x_tar, z_tar, t, tr, lam, self.fd_eps)
                online = _unwrap_ddp(model)
                if y2 is not None:
                    if y2_version is None or _version(y2) != y2_version:
                        # A call wrote its labels (y is y2's first half): as when the pair was made
                        # here, both halves get the written labels, in a tensor of their own (the
                        # gradient pass may have saved y).
                        y2 = torch.cat([y, y])
                    F_2 = online(inputs, r, y2)
                    self._check_output(F_2, inputs, like=F_d)
                    F_a, F_b = F_2[:B], F_2[B:]
                else:
                    if lam == 1.0:
                        F_a, F_b = online(inputs[:B], r[:B], y), online(inputs[B:], r[B:], y)
                        self._check_output(F_a, x, like=F_d)
                    else:
                        F_a, F_b = F_d, online(inputs, r, y)
                    self._check_output(F_b, x, like=F_d)
                target = _fd_target(F_d, F_a, F_b, x_tar, z_tar, t, tr, lam, self.fd_eps)
        return _loss(F_t, target, t, self.huber_eps, self.cosine_loss, self.time_weighting is not None)

    __call__ = loss

    # -- sampling -----------------------------------------------------------------------------

    def sample(self, model, noise, **kwargs):
        """``ucgm_fast.sample(model, noise, transport=<this transport>, **kwargs)``: see :func:`ucgm_fast.sample`."""
        from .sampler import sample  # the sampler module lands separately; imported on use
        kwargs.setdefault("transport", self.transport)
        return sample(model, noise, **kwargs)
