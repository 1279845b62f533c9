"""End to end: a DiT training step and whole sampling runs, published-style loop vs ucgm_fast.

Columns of these rows (they differ from the op rows: no torch.compile of a reference function):

* ``train_step/<model>,<lambda>,model=eager``: eager = the published-style step, fused =
  ucgm_fast's step, both with the model eager.
* ``train_step/<model>,<lambda>,model=compiled``: the pair that matters to users who compile
  their model: the same two steps, both with the model under torch.compile (one compiled module
  serves both; the learning rate is 0, see below).
* ``sample/<model>,steps=N`` (batch 1 and 64, in the shape): eager = the published sampling loop
  (float64 state, Python-scalar coefficients), fused = ``ucgm_fast.sample`` (float32 state); on
  CUDA the ``cuda_graph`` peer replays the whole loop as one CUDA graph.

The published-style step is :func:`ucgm_fast.reference.training_loss` (the published
``training_step`` order: boolean-mask enhancement, two separate finite-difference passes) then
per-parameter ``nan_to_num``, ``torch.optim.AdamW`` with its defaults and a per-parameter EMA loop.
ucgm_fast's step is what ``ucgm-train`` runs: ``UCGM.loss`` (fused kernels, the two passes as one
batch of 2B), ``FlatGrads`` (backward into one buffer, nan/inf zeroing in one kernel), fused AdamW,
``UCGM.update_target`` and the multi-tensor EMA. t and z are given (their draws are excluded from
both), the learning rate is 0 (the optimizer does the same work at any rate) so every repeat sees
the same weights. Each step's checked (first) call returns its loss and its whole gradient as one
flat vector, after the nan/inf zeroing it applies (``FlatGrads.clip_(None, True)`` zeroes and does
not clip, like the published per-parameter ``nan_to_num``), against the reference loss and its
gradient, zeroed alike: in float64 (a float64 copy of the model) on CPU; on CUDA in float32
without autocast, since float64 activations of DiT-XL/2 at batch 64 would not fit beside the row.
Timed calls return the loss only. On CUDA both steps run under bf16 autocast, as in training, so
they are only checked loosely there (a row note says so).

Sampling rows are checked against the published loop run as a reference: on CPU with a float64
copy of the model, float64 noise and state; on CUDA (a float64 DiT-XL/2 at batch 64 x 30 steps
would cost minutes of device time) with the float32 model without autocast and float64 state. The
peers run the model under the training autocast (bf16 on CUDA). Every loop is handed the noise
drawn beforehand (the Philox stream ucgm_fast draws inside its kernel), which spares the eager peer
drawing noise: a comparison tilted against the fused sampler. kappa = 1 at 2 steps (the few-step
setting), 0 at 30 steps.

Every row takes its peers' samples in turn (``timing.time_in_turn``): a call lasts up to seconds,
and timed one peer after the other, a 2-core machine's drift showed up as a 10% "difference"
between sampling loops whose profiles are identical.
"""
from __future__ import annotations

import contextlib
import copy
from functools import partial

import torch

import ucgm_fast
from ucgm_fast import reference, sampler_noise  # a missing op is an error (see discover)
from ucgm_fast.models import get_model
from ucgm_fast.optim import EMA, FlatGrads, make_optimizer
from cases.objective import NUM_CLASSES, OBJECTIVES, make_ucgm, reference_kw
from harness.case import Case, Plan, Workload
from harness.timing import Budget

GROUP = "end_to_end"
SEED = 7
EMA_DECAY = 0.9999
# (model, data shape) per device. CPU sizes keep a row to seconds on 2 cores.
TRAIN = {"cpu": (("DiT-S/2", (8, 4, 16, 16)),),
         "cuda": (("DiT-B/2", (256, 4, 32, 32)), ("DiT-XL/2", (64, 4, 32, 32)))}
SAMPLE = {"cpu": ("DiT-S/2", (4, 8, 8)), "cuda": ("DiT-XL/2", (4, 32, 32))}
SAMPLE_RUNS = ((2, 1), (30, 1), (2, 64), (30, 64))  # (steps, batch)
SMALLEST = {"depth": 2, "hidden_size": 64, "num_heads": 2}
# A step or a sampling run lasts up to seconds: a few repeats after one warm-up call.
BUDGET = Budget(warmup_s=0.0, sample_s=0.0, total_s=5.0, min_repeats=3, max_repeats=5)
SMOKE = Budget(warmup_s=0.0, sample_s=0.0, total_s=0.0, min_repeats=2, max_repeats=2)


def live_model(name: str, shape: tuple, device, smallest: bool) -> torch.nn.Module:
    """A DiT whose zero-initialised layers (adaLN, output) are drawn too, so F depends on x, t and y."""
    model = get_model(name, input_size=shape[-1], in_channels=shape[0], num_classes=NUM_CLASSES,
                      **(SMALLEST if smallest else {}))
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device)


def _autocast(device):
    # As in training: bf16 autocast on CUDA, float32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# The dtype column of these rows is the data's (float32); on CUDA the model runs under bf16 autocast.
AUTOCAST_NOTE = "the model runs under bf16 autocast (the dtype column is the data's)"


class CheckNext:
    """A one-shot flag: the next step call (of either step) is the checked one.

    ``Workload.reset`` arms it right before each peer's first, checked call; that call returns its
    gradient too and disarms it, so timed calls make no extra copy.
    """

    def __init__(self):
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def take(self) -> bool:
        """Whether this call is the checked one (and disarm)."""
        armed, self.armed = self.armed, False
        return armed


def flat_grad(params) -> torch.Tensor:
    """Every parameter's gradient in one flat vector (a missing one as zeros), in parameter order."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                      for p in params])


def _zero_nonfinite(g: torch.Tensor) -> torch.Tensor:
    # What both steps do to their gradients: the published per-parameter nan_to_num, FlatGrads.clip_(None, True).
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


class PublishedStep:
    """The published training step: reference loss, per-parameter nan_to_num, AdamW, per-parameter EMA."""

    def __init__(self, model, net, kw, check=None):
        self.net, self.kw, self.check = net, kw, check or CheckNext()
        self.params = list(model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=0.0, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.params]
        self.target = copy.deepcopy(model).requires_grad_(False)  # frozen / EMA target network
        # Run like the model, as UCGM runs its target copy: compiled when the model is.
        self.target_net = torch.compile(self.target) if net is not model else self.target

    def __call__(self, x, y, t, z):
        device = x.device
        with _autocast(device):
            loss = reference.training_loss(self.net, x, y, t, z, target_model=self.target_net,
                                           null_class=NUM_CLASSES, **self.kw)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        grad = flat_grad(self.params) if self.check.take() else None
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.mul_(EMA_DECAY).add_(p.detach(), alpha=1.0 - EMA_DECAY)
        return loss.detach() if grad is None else (loss.detach(), grad)


class FusedStep:
    """ucgm_fast's training step, as ``ucgm-train`` runs it."""

    def __init__(self, model, net, ucgm, check=None):
        self.model, self.net, self.ucgm, self.check = model, net, ucgm, check or CheckNext()
        self.params = list(model.parameters())
        self.opt = make_optimizer(self.params, lr=0.0)
        self.grads = FlatGrads(self.params)
        self.ema = EMA(copy.deepcopy(model).requires_grad_(False), model)

    def __call__(self, x, y, t, z):
        with _autocast(x.device):
            loss = self.ucgm.loss(self.net, x, y, t=t, z=z)
        self.grads.zero_()
        loss.backward()
        self.grads.clip_(None, True)  # max_norm None: nan/inf -> 0 only, no clipping
        grad = flat_grad(self.params) if self.check.take() else None
        self.opt.step()
        self.ucgm.update_target(self.model)
        self.ema.update(EMA_DECAY)
        return loss.detach() if grad is None else (loss.detach(), grad)


@contextlib.contextmanager
def _no_tf32():
    """Float32 means float32 in the CUDA oracles: cuDNN convolutions (the DiT's patch embedding)
    default to TF32, as may matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def train_reference(model, x, y, t, z, kw, dtype) -> tuple:
    """(loss, flat gradient) of the reference loss with ``model`` copied to ``dtype``, no autocast.

    The gradient's non-finite entries are zeroed, as both steps zero theirs (neither clips). The
    copy's own parameters get the gradient (torch.autograd.grad): ``model`` is left untouched.
    """
    ref = copy.deepcopy(model).to(dtype).requires_grad_(True)
    params = list(ref.parameters())
    cast = lambda v: v.to(dtype)
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False), _no_tf32():
        loss = reference.training_loss(ref, cast(x), y, cast(t), cast(z), target_model=ref,
                                       null_class=NUM_CLASSES, **kw)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return loss.detach(), _zero_nonfinite(flat)


# max_rel_err bounds of the training-step rows (loss and gradient, each relative to its own max).
# CPU, float32 steps vs the float64 reference: measured loss <= 7e-7, gradient <= 8.2e-6 (both
# steps, both objectives, smallest and CPU sizes; the gradient of the lambda = 1 objective is the
# worst). The bound leaves 12x for other BLAS builds, thread counts and the compiled model.
TRAIN_TOL_CPU = 1e-4
# CUDA: bf16 autocast moves the loss and the gradient by ~1e-2 of their max; only a gross error
# (a missing term, a skipped backward) is flagged.
TRAIN_TOL_CUDA = 0.1


def _train_workload(plan: Plan, name: str, shape: tuple, variant: str, compiled: bool) -> Workload:
    smallest = plan.smallest
    gen = plan.generator("train_step", name, shape, variant)
    B = shape[0]
    x = plan.randn(shape, torch.float32, gen)
    z = plan.randn(shape, torch.float32, gen)
    t = plan.times(B, gen)
    y = torch.randint(0, NUM_CLASSES, (B,), generator=gen, device=plan.device)
    model = live_model(name, shape[1:], plan.device, smallest)
    kw = reference_kw(variant)
    ucgm = make_ucgm(variant)
    cuda = plan.device.type == "cuda"
    # The reference first, while only the model is alive: its activations (kept for the backward)
    # are then the only other large allocation. float64 on CPU; float32 on CUDA (float64 DiT-XL/2
    # activations at batch 64 would not fit beside the row, and bf16 autocast dominates the error).
    notes = []
    if cuda:  # the sampling rows' captured graphs (and the DiT-XL/2s they hold) are not needed here
        ucgm_fast.clear_graph_cache()
        torch.cuda.empty_cache()
    try:
        ref = train_reference(model, x, y, t, z, kw, torch.float32 if cuda else torch.float64)
    except torch.cuda.OutOfMemoryError:  # the row is still worth timing: reported, not checked
        ref = None
        notes.append("not checked: the float32 reference step ran out of device memory")
    if ref is None:  # outside the except: its traceback no longer holds the reference's tensors
        torch.cuda.empty_cache()
    # With lr = 0 the weights never move, so both steps share one model (and one compiled module);
    # each owns its optimizer state, EMA and target network.
    net = torch.compile(model, dynamic=False) if compiled else model
    check = CheckNext()
    published = PublishedStep(model, net, kw, check)
    fused = FusedStep(model, net, ucgm, check)
    if ref is not None:
        notes.append(f"checked: loss and gradient (nan/inf zeroed as the steps do) vs the reference loss's in "
                     f"{'float32 without autocast' if cuda else 'float64'}")
    if cuda:
        notes.append(AUTOCAST_NOTE + f"; loss and gradient bound {TRAIN_TOL_CUDA} of their max "
                     "(or 2x the published step's own error)")
    # The steps share the parameters: the published zero_grad(set_to_none=True) detaches the fused
    # step's gradient views, which it would then re-attach (a copy per parameter) inside its timed
    # call, unlike in ucgm-train. Re-attached untimed before each of its samples instead, and
    # before each peer's checked call: there, a fused step run after the published one would
    # otherwise add its gradient to the published step's (twice the gradient, the loss unchanged).
    def reset():
        fused.grads.attach()
        check.arm()

    return Workload(args=(x, y, t, z), eager=published, fused=fused, oracle=None if ref is None else lambda: ref,
                    tolerance=TRAIN_TOL_CUDA if cuda else TRAIN_TOL_CPU, grad=True,
                    budget=SMOKE if smallest else BUDGET, compile_peer=False, in_turn=True,
                    prepare={"fused": fused.grads.attach}, reset=reset, notes=notes)


class _UnderAutocast(torch.nn.Module):
    """The model run under the training autocast (bf16 on CUDA, none on CPU), as users sample.

    In float32 a DiT-XL/2 call at batch 1 is bound by its matmuls (about 15 ms on an H100), which
    hides what the loop around it costs; in bf16 it is bound by kernel launches, as in DESIGN.md's
    anchor (31.8 ms eager, 7.7 ms replayed as a CUDA graph, 2 steps).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def forward(self, x, t, y=None):
        with _autocast(x.device):
            return self.model(x, t, y)


def _published_sample(model, noise, y, steps, kappa, pre_noise):
    return reference.sampler.sample(model, noise, transport="Linear", steps=steps, stochast_ratio=kappa,
                                    rfba_gap_steps=(0.001, 0.3), state_dtype=torch.float64, y=y,
                                    draw_noise=lambda x, i: pre_noise[i])


def _fused_sample(model, noise, y, steps, kappa, pre_noise, cuda_graph=False):
    return ucgm_fast.sample(model, noise, transport="Linear", steps=steps, stochast_ratio=kappa,
                            rfba_gap_steps=(0.001, 0.3), seed=SEED, y=y, cuda_graph=cuda_graph)


def sample_reference(model, noise, y, steps, kappa, pre_noise):
    """The published loop as the sampling rows' oracle: ``model`` without autocast, float64 state.

    On CPU the model is a float64 copy fed float64 noise; on CUDA the float32 model itself (a
    float64 DiT-XL/2 at batch 64 x 30 steps costs minutes of device time). Same pre-drawn noise.
    """
    if noise.device.type == "cpu":
        model, noise = copy.deepcopy(model).double(), noise.double()
    with _no_tf32():
        return _published_sample(model, noise, y, steps, kappa, pre_noise)


# max_rel_err bound of the sampling rows. CPU: float32 loops vs the float64 reference, measured at
# most 3.1e-7 (the fused loop at 30 steps; smallest and --quick rows), so 30x of margin; CUDA: the
# peers run the model under bf16 autocast, whose effect over 30 steps is not measured here: the
# row's bound widens to 2x the eager peer's own error (the same bf16 model) where that is larger.
SAMPLE_TOL_CPU = 1e-5
SAMPLE_TOL_CUDA = 2e-2


def _sample_workload(plan: Plan, name: str, shape: tuple, steps: int) -> Workload:
    gen = plan.generator("sample", name, shape, steps)
    inner = live_model(name, shape[1:], plan.device, plan.smallest).eval().requires_grad_(False)
    model = _UnderAutocast(inner)
    noise = plan.randn(shape, torch.float32, gen)
    y = torch.randint(0, NUM_CLASSES, (shape[0],), generator=gen, device=plan.device)
    kappa = 1.0 if steps <= 2 else 0.0
    pre_noise = [sampler_noise(shape, seed=SEED, step=i, device=plan.device).double()
                 for i in range(steps)]
    args = (model, noise, y, steps, kappa, pre_noise)
    cuda = plan.device.type == "cuda"
    peers = {"cuda_graph": partial(_fused_sample, cuda_graph=True)} if cuda else {}
    if cuda:
        notes = ["oracle: the published loop with the float32 model without autocast, float64 state",
                 AUTOCAST_NOTE + f" (bound {SAMPLE_TOL_CUDA}, or 2x the published loop's own error)"]
    else:
        notes = ["oracle: the published loop with a float64 copy of the model, float64 noise and state"]
    return Workload(args=args, eager=_published_sample, fused=_fused_sample, peers=peers,
                    oracle=lambda: sample_reference(inner, noise, y, steps, kappa, pre_noise),
                    tolerance=SAMPLE_TOL_CUDA if cuda else SAMPLE_TOL_CPU,
                    budget=SMOKE if plan.smallest else BUDGET, compile_peer=False, in_turn=True, notes=notes)


def cases(plan: Plan):
    dev = plan.device.type
    # Sampling first: a device lease can end within the training rows, whose compiles take minutes.
    name, item = SAMPLE.get(dev, SAMPLE["cuda"])
    for steps, batch in SAMPLE_RUNS:
        if plan.smallest:
            batch, item = min(batch, 2), (4, 8, 8)
        elif plan.quick and dev == "cpu" and batch > 1:
            continue
        yield Case(GROUP, "sample", f"{name},steps={steps}", (batch,) + item, torch.float32, "train",
                   partial(_sample_workload, plan, name, (batch,) + item, steps))
    for name, shape in TRAIN.get(dev, TRAIN["cuda"])[: 1 if plan.quick or plan.smallest else None]:
        if plan.smallest:
            shape = (10, 4, 8, 8)  # round(0.1 * 10) = 1 label dropped
        for variant in OBJECTIVES:
            for compiled in (False, True):
                # Compiling a DiT takes minutes: --quick compiles only for the lambda = 1 row that the
                # objective's speed goal is about, and not at all on CPU.
                if compiled and (not plan.compile or plan.quick and (dev == "cpu" or variant == "lambda=0")):
                    continue
                yield Case(GROUP, "train_step", f"{name},{variant},model={'compiled' if compiled else 'eager'}",
                           shape, torch.float32, "train", partial(_train_workload, plan, name, shape, variant,
                                                                  compiled))
