"""``ucgm_fast.sample``: the unified UCGM sampler with fused steps and optional CUDA-graph replay.

Semantics: the published ``uni_sample`` of LINs-lab/UCGM, quirks included:
a Kumaraswamy-mapped time grid, decode, extrapolation from step index 2 against the previous raw
estimates, stochastic mixing, an optional order-2 (Heun) correction, "auto" kappa fixed at the first
step, and the last raw x_hat as the sample. Each step is one fused kernel (``sampler_step``), the
correction another (``sampler_correct``); the noise is drawn inside the kernel from Philox keyed by
(seed, step index), so a seed gives the same samples on CPU and CUDA. Without a seed each call draws
one from torch's default CPU generator: batches get independent noise, and torch.manual_seed
reproduces a run.

Nothing in the loop waits for the device: every per-step scalar (times, kappa, extrapolation
ratio, guidance weight) is computed on the host before the loop and copied once, so the whole loop,
model calls included, can be captured as one CUDA graph and replayed (``cuda_graph=True``).
"""
from __future__ import annotations

import numbers
import types
from collections import OrderedDict
from typing import Optional

import torch

from ._kernels import eager_fast_path
from ._validate import FLOAT_DTYPES, is_real_number
from .ops import sampler as fused
from .reference import sampler as reference
from .transports import get_transport

__all__ = ["sample", "clear_graph_cache", "check_settings"]

#: Captured loops kept at most (least recently used dropped first): each holds its own memory pool.
GRAPH_CACHE_SIZE = 8
_GRAPHS: "OrderedDict[tuple, _Captured]" = OrderedDict()


def clear_graph_cache() -> None:
    """Drops every captured sampling graph (and the memory it holds) and the cached per-step tables."""
    _GRAPHS.clear()
    _TABLES.clear()


def _real(op, name, v):
    if not is_real_number(v):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    return float(v)


def _pair(op, name, v, n):
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != n:
        raise ValueError(f"{op}: {name} must be a sequence of {n} numbers, got {v!r}")
    return tuple(_real(op, name, x) for x in v)


def _owner(model):
    """The object a bound method (model.forward, ema.forward_with_cfg) belongs to; any other model itself."""
    return model.__self__ if isinstance(model, types.MethodType) else model


def _num_classes(model) -> Optional[int]:
    # As published: the attribute of the innermost module (DDP wrappers expose .module; a compiled
    # module forwards attribute reads to its original). A bound method (model.forward_with_cfg, as the
    # published eval passes) reads its module's: attribute reads on a method go to its function.
    m = _owner(model)
    while hasattr(m, "module"):
        m = m.module
    return getattr(m, "num_classes", None)


#: Per-step tables kept at most: building them (grid, kappa, guidance weights, device copies) costs
#: more host time than a few-step loop's kernels, and a sampling run repeats the same settings.
TABLE_CACHE_SIZE = 32
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if t.device == dev:
        return t
    if t.device.type != "cpu" or dev.type == "cpu":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def _tables(steps, order, tr, time_dist, gaps, kappa, e, scale, interval, batch, t_dtype, dev, cache=True):
    """(sched (K, 4) float64: t, t', kappa, e; t_model (K + 1, batch), weight (K + 1,) in t_dtype) on dev,
    followed on CUDA by the event that marks their copies done and the stream that made them.

    Built once per setting (built-in transports; a custom one is not a stable key) and shared by
    every call with it: they are only read, by the loop and when a captured graph's copies are filled.
    ``cache=False`` builds without keeping them (:func:`check_settings`' probes are never sampled).
    """
    cache = cache and tr.id is not None
    key = (steps, order, tr.id, time_dist, gaps, kappa, e, scale, interval, batch, t_dtype, dev)
    if cache and key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    grid = reference.time_grid(steps, order, tr, time_dist, gaps)  # also checks the transport
    if not torch.isfinite(grid).all():
        raise ValueError(f"sample: the time grid has non-finite values for time_dist_ctrl {time_dist}")
    if order == 2 and len(grid) > 2:
        # The Heun correction divides by gamma_in(t) at every step but the last; the published loop
        # returns NaN when a grid starts exactly at the noise end (gamma_in = 0), e.g. g0 = 0.
        gamma = tr.coefficients(grid[:-2])[1]
        if not bool((gamma != 0).all()):
            t_bad = float(grid[:-2][gamma == 0][0])
            raise ValueError(f"sample: order=2 corrects the step at t={t_bad:g}, where gamma_in(t) = 0 "
                             f"({tr.name}): the correction divides by it. Keep the grid off the noise end "
                             f"with rfba_gap_steps[0] > 0 (got {gaps}; published default 0.001), or use order=1")
    if kappa == "auto":  # published: fixed at the first step
        kappa = reference.auto_stochast_ratio(tr, float(grid[0]), float(grid[1]))
    iters = len(grid) - 1
    sched = torch.empty(iters, 4, dtype=torch.float64)
    sched[:, 0], sched[:, 1], sched[:, 2], sched[:, 3] = grid[:-1], grid[1:], kappa, e
    # The model sees t in float32 (float64 for float64 noise), as published: t_cur.to(float32).
    t_model = grid.to(t_dtype).reshape(-1, 1).expand(-1, batch).contiguous()
    # The interval test sees the t the model gets, as published (forward_with_cfg: t[0] >= lo and
    # t[0] <= hi, t float32, lo and hi Python floats, so compared in float32, both ends inclusive):
    # on the float64 grid, t = 1 - 0.9 = 0.09999999999999998 would miss lo = 0.1 that float32 t hits.
    lo, hi = interval
    t_grid = t_model[:, 0]
    weight = torch.ones_like(t_grid).masked_fill_((t_grid >= lo) & (t_grid <= hi), scale)
    tables = tuple(_to_device(v, dev) for v in (sched, t_model, weight))
    if dev.type == "cuda":  # the copies are asynchronous: a call on another stream waits for them
        stream = torch.cuda.current_stream(dev)
        ready = torch.cuda.Event()
        ready.record(stream)
        tables += (ready, stream)
    if cache:
        _TABLES[key] = tables
        while len(_TABLES) > TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    return tables


class _Plan:
    """Everything the loop needs, fixed before it runs: validated arguments and per-step tables."""

    def __init__(self, model, noise, transport, steps, order, stochast_ratio, extrapol_ratio, time_dist_ctrl,
                 rfba_gap_steps, cfg_scale, cfg_interval, seed, state_dtype, return_trajectory, cuda_graph, y,
                 cache_tables=True, cfg_channels=None):
        op = "sample"
        if not callable(model):
            raise TypeError(f"{op}: model must be callable as model(x, t, y), got {type(model).__name__}")
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"{op}: noise must be a torch.Tensor, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"{op}: noise has dtype {noise.dtype}; expected a floating dtype")
        if noise.dim() == 0 or noise.shape[0] == 0:
            raise ValueError(f"{op}: noise must have shape (B, ...) with B >= 1, got {tuple(noise.shape)}")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"{op}: steps must be an integer >= 1, got {steps!r}")
        if order not in (1, 2) or isinstance(order, bool):
            raise ValueError(f"{op}: order must be 1 or 2, got {order!r}")
        self.auto = isinstance(stochast_ratio, str)
        if self.auto:
            if stochast_ratio.lower() != "auto":
                raise ValueError(f"{op}: stochast_ratio must be a number in [0, 1] or 'auto', got {stochast_ratio!r}")
        else:
            kappa = _real(op, "stochast_ratio", stochast_ratio)
            if not 0.0 <= kappa <= 1.0:
                raise ValueError(f"{op}: stochast_ratio must be in [0, 1] (or 'auto'), got {kappa}")
        e = _real(op, "extrapol_ratio", extrapol_ratio)
        if not e >= 0.0:
            raise ValueError(f"{op}: extrapol_ratio must be >= 0, got {e}")
        a, b, c = _pair(op, "time_dist_ctrl", time_dist_ctrl, 3)
        if not (a > 0 and b > 0 and c > 0):
            raise ValueError(f"{op}: time_dist_ctrl (a, b, c) must all be > 0, got {(a, b, c)}")
        g0, g1 = _pair(op, "rfba_gap_steps", rfba_gap_steps, 2)
        if not (g0 >= 0 and g1 >= 0 and g0 < 1.0 - g1):
            raise ValueError(f"{op}: rfba_gap_steps {(g0, g1)} leave an empty time interval [g0, 1 - g1]; "
                             "need 0 <= g0 < 1 - g1 with g1 >= 0")
        scale = _real(op, "cfg_scale", cfg_scale)
        if not scale >= 0:
            raise ValueError(f"{op}: cfg_scale must be >= 0 (0 disables guidance), got {scale}")
        lo, hi = _pair(op, "cfg_interval", cfg_interval, 2)
        if not lo <= hi:
            raise ValueError(f"{op}: cfg_interval must be (lo, hi) with lo <= hi, got {(lo, hi)}")
        if state_dtype not in fused.STATE_DTYPES:
            raise TypeError(f"{op}: state_dtype must be torch.float32 or torch.float64, got {state_dtype}")
        if cfg_channels is not None and (isinstance(cfg_channels, bool) or not isinstance(cfg_channels, numbers.Integral)
                                         or cfg_channels < 1):
            raise ValueError(f"{op}: cfg_channels must be None (every channel) or an int >= 1, got {cfg_channels!r}")
        if cfg_channels is not None and noise.dim() < 2:
            raise ValueError(f"{op}: cfg_channels needs noise with a channel dimension (B, C, ...), got shape "
                             f"{tuple(noise.shape)}")
        # Guided channels: all, or the first cfg_channels when that leaves some out.
        self.cfg_channels = int(cfg_channels) if cfg_channels is not None and cfg_channels < noise.shape[1] else None
        if seed is None:
            # A fresh key per call, from torch's default CPU generator: independent noise for every
            # batch, reproducible under torch.manual_seed. Drawn on the host: no device sync, and a
            # captured graph gets it copied into its seed before each replay, like an explicit one.
            seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64)
        # A seed tensor stays where it is (a CUDA one is not read back by the host).
        self.seed = fused.make_seed(op, seed, seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu"))
        tr = get_transport(transport)
        # Guidance: off at scale 0, and at scale 1 (uncond + 1 (cond - uncond) = cond, one half suffices).
        self.cfg = scale not in (0.0, 1.0)
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != noise.shape[0]:
                raise ValueError(f"{op}: y must be a tensor of shape (B,) = ({noise.shape[0]},) of class labels")
            if y.device != noise.device:
                raise ValueError(f"{op}: y is on {y.device} but noise is on {noise.device}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"{op}: y must hold integer class labels, got dtype {y.dtype}")
        if self.cfg:
            if y is None:
                raise ValueError(f"{op}: classifier-free guidance (cfg_scale={scale}) needs class labels y")
            null = _num_classes(model)
            if null is None:
                raise ValueError(f"{op}: classifier-free guidance needs model.num_classes (the null class label)")
            y = torch.cat([y, torch.full_like(y, int(null))])
        if cuda_graph and not noise.is_cuda:
            raise ValueError(f"{op}: cuda_graph=True needs CUDA noise (got noise on {noise.device})")
        if cuda_graph and tr.id is None:
            raise ValueError(f"{op}: cuda_graph=True needs a built-in transport (custom transports run eagerly)")

        self.model, self.noise, self.tr, self.order, self.e = model, noise, tr, order, e
        self.state_dtype, self.trajectory, self.y = state_dtype, bool(return_trajectory), y
        batch = noise.shape[0] * (2 if self.cfg else 1)
        t_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        dev = noise.device
        self.sched, self.t_model, self.weight, *copied = _tables(
            int(steps), order, tr, (a, b, c), (g0, g1), "auto" if self.auto else kappa, e, scale, (lo, hi), batch,
            t_dtype, dev, cache_tables)
        if copied:
            ready, made_on = copied
            stream = torch.cuda.current_stream(dev)
            stream.wait_event(ready)
            if stream != made_on:  # freed (evicted) while this stream may still read them: tell the allocator
                for t in (self.sched, self.t_model, self.weight):
                    t.record_stream(stream)
        self.iters = self.sched.shape[0]
        self.seed = _to_device(self.seed, dev)

    def graph_key(self) -> tuple:
        """What a captured loop was captured for: the model, shapes, dtypes, step count, settings that change
        the kernels launched (not the per-step values, which are copied in before each replay)."""
        noise, y = self.noise, self.y
        dev = noise.device
        # A captured graph holds the kernels the model launched, so an autocast region around the call
        # (which changes them) is part of what it was captured for.
        amp = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        return (_model_identity(self.model), tuple(noise.shape), noise.dtype, dev, self.state_dtype, self.iters,
                self.order, self.tr.id, self.e > 0, self.cfg, self.cfg_channels,
                None if y is None else (y.dtype, tuple(y.shape)),
                self.trajectory, amp)


def _model_identity(model):
    """The graph cache's name for a model: id(model), and for a bound method (model.forward,
    ema.forward_with_cfg) its owner's id and its function.

    Every attribute access makes a new bound-method object, so id(model.forward) differs between
    calls (a capture and a private memory pool per call); its owner and function do not. The cached
    graph keeps the model (for a method, its owner through it) alive, so no id is reused meanwhile.
    """
    if isinstance(model, types.MethodType):
        return id(model.__self__), model.__func__
    return id(model)


def _tensor_slots(model) -> list:
    """(dict, name) of every parameter and buffer of the model (a bound method's owner), when it is a module.

    Walked once, at capture: reading the slots back is cheap, walking the module tree is not (DiT-XL/2
    has 437 modules). A tensor replaced in its slot (load_state_dict(assign=True)) or re-allocated
    (model.half(), .to()) then shows as another address; a submodule replaced later is not seen.
    """
    owner = _owner(model)
    if not isinstance(owner, torch.nn.Module):
        return []
    return [(d, name) for m in owner.modules() for d in (m._parameters, m._buffers)
            for name, v in d.items() if v is not None]


def _addresses(slots: list) -> tuple:
    """(data address, dtype) of the tensors now in these slots (a missing one reads as None).

    The dtype too: a tensor converted twice (float -> half -> bfloat16) may land where it started.
    """
    return tuple([None if v is None else (v.data_ptr(), v.dtype) for v in [d.get(name) for d, name in slots]])


class _Probe:
    """A stand-in model for :func:`check_settings` (never called)."""

    num_classes = 1

    def __call__(self, x, t, y=None):
        return x


def check_settings(transport="Linear", steps: int = 2, order: int = 1, stochast_ratio=1.0,
                   extrapol_ratio: float = 0.0, time_dist_ctrl=(1.0, 1.0, 1.0), rfba_gap_steps=(0.001, 0.3),
                   cfg_scale: float = 0.0, cfg_interval=(0.0, 0.75), cfg_channels=None) -> None:
    """Raises the ValueError / TypeError :func:`sample` would raise for these settings, without a model.

    For configs and command lines, checked before hours of training end in a failed sample grid. The
    defaults are :func:`sample`'s, so a setting left out is checked as sample() would run it. Nothing
    is cached: the probe's per-step tables are built and dropped.
    """
    _Plan(_Probe(), torch.zeros(1, 1), transport, steps, order, stochast_ratio, extrapol_ratio, time_dist_ctrl,
          rfba_gap_steps, cfg_scale, cfg_interval, 0, torch.float32, False, False,
          torch.zeros(1, dtype=torch.long), cache_tables=False, cfg_channels=cfg_channels)


def _run(plan: _Plan, noise: torch.Tensor, sched: torch.Tensor, t_model: torch.Tensor, weight: torch.Tensor,
         seed: torch.Tensor, y: Optional[torch.Tensor]):
    """The sampling loop on device tensors: no host synchronization, nothing that grows with steps
    unless the trajectory is kept."""
    model, tr, order, last = plan.model, plan.tr, plan.order, plan.iters - 1
    mdtype = noise.dtype
    fast = eager_fast_path() and tr.id is not None

    def call(x, i):
        xin = x if x.dtype == mdtype else x.to(mdtype)
        if plan.cfg:
            xin = torch.cat([xin, xin])
        t_i = t_model[i].clone()  # the model's own copy: the table is cached across calls
        try:
            out = model(xin, t_i) if y is None else model(xin, t_i, y)
        except torch.cuda.OutOfMemoryError:  # not the input's fault
            raise
        except Exception as exc:
            if i == 0:
                raise ValueError(f"sample: the model rejected its first input, noise of shape {tuple(noise.shape)}"
                                 f"{'' if y is None else ' with labels y'} ({type(exc).__name__}: {exc})") from exc
            raise
        if not isinstance(out, torch.Tensor) or out.shape != xin.shape:
            raise ValueError(f"sample: the model returned {tuple(getattr(out, 'shape', ()))} for input "
                             f"{tuple(xin.shape)}; it must return a tensor shaped like its input")
        if out.device != xin.device or out.dtype not in FLOAT_DTYPES:  # the kernels read its pointer
            raise ValueError(f"sample: the model returned a {out.dtype} tensor on {out.device} for input on "
                             f"{xin.device}; it must return a floating tensor on the input's device")
        if plan.cfg:
            cond, uncond = out.chunk(2)
            guided = uncond + weight[i].to(out.dtype) * (cond - uncond)
            k = plan.cfg_channels
            # As the published networks' forward_with_cfg (a DiT quirk): channels past k keep the
            # conditional output.
            out = guided if k is None else torch.cat([guided[:, :k], cond[:, k:]], dim=1)
        return out

    def step(F, x, xp, zp, i, mode, hats):
        if tr.id is None:
            noise_i = fused.sampler_noise(x.shape, seed, i, device=x.device) if x.numel() else None
            s = sched[i]
            return reference.sampler_step(F, x, s[0], s[1], tr, step=i, stochast_ratio=s[2], extrapol_ratio=s[3],
                                          x_prev=xp if mode else None, z_prev=zp if mode else None,
                                          return_hats=True, noise=noise_i)
        if fast:
            return fused._step_impl(F, x, xp, zp, sched[i], seed, i, tr.id, mode, hats)
        return torch.ops.ucgm_fast.sampler_step(F, x, xp, zp, sched[i], seed, i, tr.id, mode, hats)

    def correct(F, xn, x, zh, i):
        if tr.id is None:
            return reference.sampler_correct(F, xn, x, zh, sched[i, 0], sched[i, 1], tr)
        if fast:
            return fused._correct_impl(F, xn, x, zh, sched[i], tr.id)
        return torch.ops.ucgm_fast.sampler_correct(F, xn, x, zh, sched[i], tr.id)

    shape = noise.shape
    x = noise.to(plan.state_dtype).contiguous()
    if plan.e > 0:
        xp, zp = torch.empty_like(x), torch.empty_like(x)
    else:
        xp = zp = x.new_empty((0,))
    hats_all = []
    x_hat = None
    for i in range(plan.iters):
        F = call(x, i)
        mode = fused.EXTRAPOL_OFF if plan.e == 0 else (fused.EXTRAPOL_APPLY if i >= 2 else fused.EXTRAPOL_RECORD)
        correcting = order == 2 and i < last
        hats = plan.trajectory or correcting or i == last
        x_next, x_hat, z_hat = step(F.reshape(shape), x, xp, zp, i, mode, hats)
        if plan.trajectory:
            hats_all.append(x_hat.view(shape))
        if correcting:
            F_pri = call(x_next.view(shape), i + 1)
            x_next = correct(F_pri.reshape(shape), x_next, x, z_hat, i)
        x = x_next.view(shape)
    x_hat = x_hat.view(shape)
    return (x_hat, torch.stack(hats_all)) if plan.trajectory else x_hat


class _Captured:
    """One captured loop: static inputs copied in before each replay, static outputs cloned after."""

    def __init__(self, plan: _Plan):
        self.model = plan.model  # keeps the ids in the key (model, a method's owner) from being reused while cached
        self.noise = plan.noise.clone()
        self.sched, self.t_model = plan.sched.clone(), plan.t_model.clone()
        self.weight, self.seed = plan.weight.clone(), plan.seed.clone()
        self.tables = (plan.sched, plan.t_model, plan.weight)  # the (cached, read-only) tables copied in
        self.y = None if plan.y is None else plan.y.clone()
        args = (plan, self.noise, self.sched, self.t_model, self.weight, self.seed, self.y)
        # Warm up on a side stream (lazy initializations must not happen during capture).
        side = torch.cuda.Stream(device=plan.noise.device)
        side.wait_stream(torch.cuda.current_stream(plan.noise.device))
        with torch.cuda.stream(side):
            _run(*args)
        torch.cuda.current_stream(plan.noise.device).wait_stream(side)
        # An autocast region around the call caches its weight casts until it ends. Casts cached
        # before capture live outside the graph's memory pool and are freed when the region ends,
        # so a graph that read them would replay from freed memory: it must make its own.
        torch.clear_autocast_cache()
        self.graph = torch.cuda.CUDAGraph()
        # Captured on a stream of the noise's device: torch.cuda.graph's default capture stream
        # belongs to whichever device was current at the process's first capture.
        with torch.cuda.graph(self.graph, stream=side):
            self.out = _run(*args)
        # The graph reads the model's tensors where they were at capture (after the warm-up, which may
        # have made lazy ones): see moved().
        self.slots = _tensor_slots(plan.model)
        self.addresses = _addresses(self.slots)
        self.done = torch.cuda.Event()  # recorded after each replay's outputs are copied out

    def moved(self) -> bool:
        """Whether a parameter or buffer of the model is no longer where the graph reads it: a replay
        would read freed (or reused) memory. Checked before every replay: ~70 us for DiT-XL/2's 293
        tensors on this project's busy 2-core machine (a whole CPU sample() call of a trivial model: ~155 us)."""
        return _addresses(self.slots) != self.addresses

    def replay(self, plan: _Plan):
        stream = torch.cuda.current_stream(plan.noise.device)
        # The last replay, if it ran on another stream, may still read the static inputs or write the
        # outputs this one overwrites and copies out: wait for it (on the same stream, a no-op).
        stream.wait_event(self.done)
        self.noise.copy_(plan.noise)
        tables = (plan.sched, plan.t_model, plan.weight)
        if any(a is not b for a, b in zip(tables, self.tables)):  # other settings of the same graph
            for dst, src in zip((self.sched, self.t_model, self.weight), tables):
                dst.copy_(src)
            self.tables = tables
        self.seed.copy_(plan.seed)
        if self.y is not None:
            self.y.copy_(plan.y)
        self.graph.replay()
        out = tuple(o.clone() for o in self.out) if isinstance(self.out, tuple) else self.out.clone()
        self.done.record(stream)
        return out


@torch.no_grad()
def sample(model, noise, transport="Linear", steps=2, order=1, stochast_ratio=1.0, extrapol_ratio=0.0,
           time_dist_ctrl=(1.0, 1.0, 1.0), rfba_gap_steps=(0.001, 0.3), cfg_scale=0.0, cfg_interval=(0.0, 0.75),
           seed=None, state_dtype=torch.float32, return_trajectory=False, cuda_graph=False, y=None,
           cfg_channels=None):
    """x = x_hat of the last step of the UCGM sampler started from ``noise``.

    Each step: (x_hat, z_hat) = decode(model(x, t, y)) at t; from step index 2 on,
    x_hat += e (x_hat - previous raw x_hat) (z_hat likewise); x <- gamma_in(t') x_hat +
    alpha_in(t') (sqrt(1 - kappa) z_hat + sqrt(kappa) eps), eps ~ Philox(seed, step). Order 2 adds a
    Heun correction with a second model call at t' (every step but the last).

    The defaults (steps=2, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.3)) are few-step settings, for
    a model trained with consistc_ratio=1. A multi-step model wants the published multi-step recipe:
    ``uni_sample``'s own defaults and the configs in configs/sampling_multi_steps/ use
    stochast_ratio=0.0 and rfba_gap_steps=(0.001, 0.001) (one config (0.001, 0.002)), with 40 to 150
    steps, extrapol_ratio 0.28 to 0.54 and time_dist_ctrl (1.17, 0.8, 1.1) or (1.2, 0.72, 1.2). Left at
    kappa = 1 and g1 = 0.3, a multi-step model samples off its data (the exact denoiser of N(0, 0.5^2)
    data, 30 steps: sample std 0.30 instead of 0.48 with the multi-step settings).

    Parameters
    ----------
    model : callable
        Called as ``model(x, t, y)`` (``model(x, t)`` without labels), x in noise's dtype, t of shape
        (B,) in float32 (float64 for float64 noise); returns F shaped like x. A module, or a bound
        method of one (``model.forward_with_cfg``); guidance reads ``num_classes`` from it.
    noise : Tensor
        Initial noise (B, ...); its dtype is the dtype the model is fed.
    transport : str or Transport
    steps : int
        Number of steps, >= 1 (order 2 takes (steps + 1) // 2 steps; each but the last makes two model calls).
    order : {1, 2}
    stochast_ratio : float or "auto"
        kappa in [0, 1]; "auto" computes it at the first step and keeps it (as published).
    extrapol_ratio : float
        e >= 0.
    time_dist_ctrl : (a, b, c)
        Kumaraswamy time map (1 - (1 - u^a)^b)^c, all > 0.
    rfba_gap_steps : (g0, g1)
        Boundary gaps: the grid spans [g0, 1 - g1] before the map; 0 <= g0 < 1 - g1.
    cfg_scale : float
        Classifier-free guidance scale w >= 0; 0 (or 1) disables it. With guidance the model is called
        once on the conditional and unconditional halves (labels y and model.num_classes) and
        F = F_uncond + w' (F_cond - F_uncond), w' = w for t in cfg_interval (inclusive), else 1.
    cfg_interval : (lo, hi)
        Tested on the t the model is given (float32 for float32 noise), both ends inclusive, as the
        published ``forward_with_cfg`` does: t = float32(0.1) is inside (0.1, 0.9).
    cfg_channels : int, optional
        Guide only the first cfg_channels channels (dim 1); the others keep the conditional output.
        None (the default) guides every channel, the standard method. The published UCGM networks
        (LightningDiT's ``forward_with_cfg``, after DiT's) guide the first 3: reproducing their
        guided results takes ``cfg_channels=3``.
    seed : int, Tensor or None
        Keys the in-kernel noise with the step index: same seed, same samples, on CPU and CUDA (an int,
        or a one-element int64 tensor, which may live on the device). None (the default) draws one
        int64 from torch's default CPU generator on every call: successive calls (batches) get
        independent noise, torch.manual_seed reproduces a run, and nothing waits for the device. With
        kappa > 0, two calls that share a seed share every step's noise: their samples are strongly
        correlated even from independent ``noise``.
    state_dtype : torch.float32 or torch.float64
        Precision of the state and of the step arithmetic.
    return_trajectory : bool
        Also return every step's x_hat, stacked (steps_run, B, ...).
    cuda_graph : bool
        Capture the whole loop (model calls included) once per model, shape, dtype, step count and
        autocast setting around the call, and replay it (the seed, noise, labels and per-step values are
        copied in before each replay). Graphs are cached per model object: pass the same module or a
        bound method of it (``model.forward`` is named by its module and function, so a new method
        object each call still replays); a lambda, functools.partial or local function made anew per
        call is a new model each time, captured again with its own memory pool. The model's parameters must stay at the
        same addresses (in-place updates are fine); a module's parameters and buffers are checked on
        every replay, and a graph whose tensors were replaced or moved (``model.half()``,
        ``load_state_dict(assign=True)``) is captured again. A submodule swapped in, or tensors
        captured through a closure, are not seen: call :func:`clear_graph_cache` then.
    y : Tensor, optional
        Class labels (B,).

    Returns
    -------
    Tensor or (Tensor, Tensor)
        The sample in ``state_dtype`` (and the trajectory).
    """
    plan = _Plan(model, noise, transport, steps, order, stochast_ratio, extrapol_ratio, time_dist_ctrl,
                 rfba_gap_steps, cfg_scale, cfg_interval, seed, state_dtype, return_trajectory, cuda_graph, y,
                 cfg_channels=cfg_channels)
    if not cuda_graph:
        return _run(plan, plan.noise, plan.sched, plan.t_model, plan.weight, plan.seed, plan.y)
    with torch.cuda.device(plan.noise.device):  # capture and replay on the noise's device (cuda:1 too)
        key = plan.graph_key()
        captured = _GRAPHS.pop(key, None)
        if captured is not None and captured.moved():
            captured = None  # model.half(), load_state_dict(assign=True), ...: dropped with its memory, captured anew
        if captured is None:
            captured = _Captured(plan)
        _GRAPHS[key] = captured
        while len(_GRAPHS) > GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
        return captured.replay(plan)
