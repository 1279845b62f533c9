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
the same weights and each row's loss is checked against the float64 reference loss. On CUDA both
steps run under bf16 autocast, as in training, so their loss is only checked loosely against the
float64 one.

Sampling rows are checked against the published loop itself (float64 state, the same model): the
eager peer is handed noise drawn beforehand (the Philox stream ucgm_fast draws inside its kernel),
which spares it drawing noise: a comparison tilted against the fused sampler. kappa = 1 at 2 steps
(the few-step setting), 0 at 30 steps.

Every row takes its peers' samples in turn (``timing.time_in_turn``): a call lasts up to seconds,
and timed one peer after the other, a 2-core machine's drift showed up as a 10% "difference"
between sampling loops whose profiles are identical.
"""
from __future__ import annotations

import copy
from functools import partial

import torch

import ucgm_fast
from ucgm_fast import reference, sampler_noise  # ImportError (group skipped) before the objective and sampler land
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


class PublishedStep:
    """The published training step: reference loss, per-parameter nan_to_num, AdamW, per-parameter EMA."""

    def __init__(self, model, net, kw):
        self.net, self.kw = net, kw
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
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.mul_(EMA_DECAY).add_(p.detach(), alpha=1.0 - EMA_DECAY)
        return loss.detach()


class FusedStep:
    """ucgm_fast's training step, as ``ucgm-train`` runs it."""

    def __init__(self, model, net, ucgm):
        self.model, self.net, self.ucgm = model, net, ucgm
        self.params = list(model.parameters())
        self.opt = make_optimizer(self.params, lr=0.0)
        self.grads = FlatGrads(self.params)
        self.ema = EMA(copy.deepcopy(model).requires_grad_(False), model)

    def __call__(self, x, y, t, z):
        with _autocast(x.device):
            loss = self.ucgm.loss(self.net, x, y, t=t, z=z)
        self.grads.zero_()
        loss.backward()
        self.grads.clip_(None, True)
        self.opt.step()
        self.ucgm.update_target(self.model)
        self.ema.update(EMA_DECAY)
        return loss.detach()


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
    # With lr = 0 the weights never move, so both steps share one model (and one compiled module);
    # each owns its optimizer state, EMA and target network.
    net = torch.compile(model, dynamic=False) if compiled else model
    published = PublishedStep(model, net, kw)
    fused = FusedStep(model, net, ucgm)

    def oracle():
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            return reference.training_loss(m64, x.double(), y, t.double(), z.double(), target_model=m64,
                                           null_class=NUM_CLASSES, **kw)

    # The step is bound by the model (bf16 autocast on CUDA): only a gross error is flagged there.
    tol = 0.1 if plan.device.type == "cuda" else 1e-3
    # The steps share the parameters: the published zero_grad(set_to_none=True) detaches the fused
    # step's gradient views, which it would then re-attach (a copy per parameter) inside its timed
    # call, unlike in ucgm-train. Re-attached untimed before each of its samples instead.
    return Workload(args=(x, y, t, z), eager=published, fused=fused, oracle=oracle, tolerance=tol, grad=True,
                    budget=SMOKE if smallest else BUDGET, compile_peer=False, in_turn=True,
                    prepare={"fused": fused.grads.attach})


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


def _sample_workload(plan: Plan, name: str, shape: tuple, steps: int) -> Workload:
    gen = plan.generator("sample", name, shape, steps)
    model = _UnderAutocast(live_model(name, shape[1:], plan.device, plan.smallest).eval().requires_grad_(False))
    noise = plan.randn(shape, torch.float32, gen)
    y = torch.randint(0, NUM_CLASSES, (shape[0],), generator=gen, device=plan.device)
    kappa = 1.0 if steps <= 2 else 0.0
    pre_noise = [sampler_noise(shape, seed=SEED, step=i, device=plan.device).double()
                 for i in range(steps)]
    args = (model, noise, y, steps, kappa, pre_noise)
    peers = {"cuda_graph": partial(_fused_sample, cuda_graph=True)} if plan.device.type == "cuda" else {}
    # bf16 model outputs move with the last bits of the state (float64 published, float32 fused).
    tol = 2e-2 if plan.device.type == "cuda" else 1e-4
    return Workload(args=args, eager=_published_sample, fused=_fused_sample, peers=peers,
                    oracle=lambda: _published_sample(*args), tolerance=tol, budget=SMOKE if plan.smallest else BUDGET,
                    compile_peer=False, in_turn=True)


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
