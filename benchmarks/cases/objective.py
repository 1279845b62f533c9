"""Objective ops: enhance_target, fd_target and ucgm_loss (forward + backward), and the whole objective.

The work of a training step outside the model calls. enhance_target reads x, z and the model
outputs and writes (x_tar, z_tar); fd_target reads F_t, F_a, F_b, x, z and writes the target in
the compute dtype; ucgm_loss is timed forward then backward (grad with respect to F).

``objective/<lambda>``: all of it at once, forward then backward: ``UCGM.loss`` vs the
published-style ``reference.training_loss`` (boolean-mask enhancement, two finite-difference
passes) and torch.compile of it, with a one-multiply model (F = a x_t, kept out of the compiled
graph like a network's calls) so the row times the objective, not a network. t and z are given;
the labels' last 10% are dropped.
"""
from __future__ import annotations

from functools import partial

import torch

import ucgm_fast
from ucgm_fast import enhance_target, fd_target, ucgm_loss  # a missing op is an error (see discover)
from ucgm_fast import reference
from harness.case import Case, Plan, Workload, to_float64

GROUP = "objective"
LABEL_DROP = 0.1
ENHANCED_RANGE = (0.0, 0.75)

# variant -> (F_wo given (lambda = 0) or not (lambda > 0), enhancement ratio)
ENHANCE = {"lambda=0": (True, 0.5), "lambda=1": (False, 2.0)}
FD = {"lambda=1": 1.0, "lambda=0.5": 0.5}
LOSS = {"huber=0": (0.0, False, False), "huber=5,cosine,tw": (5.0, True, True)}
# The objectives of the objective and end-to-end rows: flow matching, and the few-step recipe (the example).
OBJECTIVES = {
    "lambda=0": dict(consistency_ratio=0.0, enhanced_ratio=0.0, huber_eps=0.0, time_weighting=None,
                     target_ema_decay=0.999),
    "lambda=1,enhanced": dict(consistency_ratio=1.0, enhanced_ratio=2.0, huber_eps=5.0,
                              time_weighting="cosine", target_ema_decay=1.0),
}
QUICK = {"enhance_target": "lambda=0", "fd_target": "lambda=1", "ucgm_loss": "huber=0",
         "objective": "lambda=1,enhanced"}
NUM_CLASSES = 1000
SIXTEEN_BIT_FD_TOL = 0.1  # objective rows with 16-bit data at lambda != 0: see _objective_workload


def reference_kw(variant: str) -> dict:
    """Keyword arguments shared by ``UCGM`` and ``reference.training_loss`` for an OBJECTIVES variant."""
    o = OBJECTIVES[variant]
    return dict(transport="Linear", consistency_ratio=o["consistency_ratio"], enhanced_ratio=o["enhanced_ratio"],
                label_drop_ratio=LABEL_DROP, huber_eps=o["huber_eps"], time_weighting=o["time_weighting"])


def make_ucgm(variant: str) -> ucgm_fast.UCGM:
    """The ``UCGM`` of an OBJECTIVES variant: :func:`reference_kw` plus its target EMA decay."""
    return ucgm_fast.UCGM(**reference_kw(variant), target_ema_decay=OBJECTIVES[variant]["target_ema_decay"])


def _data(plan: Plan, salt, shape, dtype, count):
    gen = plan.generator(*salt)
    return [plan.randn(shape, dtype, gen) for _ in range(count)], plan.times(shape[0], gen)


def _enhance_workload(plan, variant, transport, shape, dtype) -> Workload:
    with_wo, ratio = ENHANCE[variant]
    (x, z, F_w, F_wo), t = _data(plan, ("enhance", variant, transport, shape, str(dtype)), shape, dtype, 4)
    args = (x, z, F_w, F_wo if with_wo else None, t, transport, ratio, ENHANCED_RANGE,
            round(LABEL_DROP * shape[0]))
    reads = 4 if with_wo else 3
    return Workload(args=args, eager=reference.enhance_target, fused=enhance_target,
                    oracle=lambda: reference.enhance_target(*to_float64(args)),
                    nbytes=(reads + 2) * x.numel() * x.element_size())


def _fd_workload(plan, variant, transport, shape, dtype) -> Workload:
    lam = FD[variant]
    (F_t, F_a, F_b, x, z), t = _data(plan, ("fd", variant, transport, shape, str(dtype)), shape, dtype, 5)
    if lam == 1.0:
        # The two passes of a model are close (t +- eps): the tangent is then mostly inside the clamp
        # and the float32 cancellation of the difference is exercised. Independent outputs would
        # saturate the clamp almost everywhere.
        F_a, F_b = ((F_t.double() + s * 0.004 * v.double()).to(dtype) for s, v in ((1, F_a), (-1, F_b)))
    args = (F_t, F_a, F_b, x, z, t, transport, lam)
    out_size = 8 if dtype == torch.float64 else 4  # the target is written in the compute dtype
    return Workload(args=args, eager=reference.fd_target, fused=fd_target,
                    oracle=lambda: reference.fd_target(*to_float64(args)),
                    nbytes=5 * x.numel() * x.element_size() + x.numel() * out_size)


def _value_and_grad(loss_fn, F, target, t, huber_eps, cosine, time_weighting):
    """(loss, dloss/dF): one forward and one backward, as in a training step."""
    loss = loss_fn(F, target, t, huber_eps, cosine, time_weighting)
    (grad,) = torch.autograd.grad(loss, F)
    return loss.detach(), grad


def _around_value_and_grad(loss_fn):
    return partial(_value_and_grad, loss_fn)


def _loss_workload(plan, variant, transport, shape, dtype) -> Workload:
    h, cosine, tw = LOSS[variant]
    (F, target), t = _data(plan, ("loss", variant, shape, str(dtype)), shape, dtype, 2)
    F.requires_grad_(True)
    args = (F, target, t, h, cosine, tw)

    def oracle():
        F64 = F.detach().double().requires_grad_(True)
        return _value_and_grad(reference.ucgm_loss, F64, target.double(), t.double(), h, cosine, tw)

    # Forward reads F and target; backward reads them again and writes dF.
    return Workload(args=args, eager=reference.ucgm_loss, fused=ucgm_loss, oracle=oracle,
                    nbytes=5 * F.numel() * F.element_size(), grad=True, around=_around_value_and_grad)


class ScaleModel(torch.nn.Module):
    """F = a x_t: the cheapest model the objective accepts (one multiply per call, one parameter)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.a = torch.nn.Parameter(torch.tensor(0.9))

    # Opaque to torch.compile, as a network is: the compile peer compiles the objective around the
    # model calls, and cannot fuse the model's one multiply into them.
    @torch.compiler.disable
    def forward(self, x, t, y):
        return x * self.a


def _objective_value_and_grad(loss_fn, model, x, y, t, z):
    loss = loss_fn(model, x, y, t, z)
    (grad,) = torch.autograd.grad(loss, model.a)
    return loss.detach(), grad


def _objective_workload(plan, variant, transport, shape, dtype) -> Workload:
    (x, z), t = _data(plan, ("objective", variant, shape, str(dtype)), shape, dtype, 2)
    y = torch.randint(0, NUM_CLASSES, (shape[0],), generator=plan.generator("labels", shape), device=plan.device)
    model = ScaleModel(NUM_CLASSES).to(plan.device)
    kw = reference_kw(variant)
    ucgm = make_ucgm(variant)

    def published(m, x, y, t, z):
        return reference.training_loss(m, x, y, t, z, target_model=m, null_class=NUM_CLASSES, **kw)

    def oracle():
        m64 = ScaleModel(NUM_CLASSES).double().to(plan.device)
        return _objective_value_and_grad(published, m64, *to_float64((x,)), y, *to_float64((t, z)))

    tolerance, notes = None, []
    if dtype in (torch.float16, torch.bfloat16) and kw["consistency_ratio"] != 0.0:
        # The finite-difference passes see x_r = alpha_in(r) z + gamma_in(r) x rounded to the data's
        # 16-bit dtype. fd_target decodes their outputs with the exact x_r (its folded form, which
        # keeps float32 targets accurate), the published step with the rounded one; divided by
        # 2 eps = 0.01, that rounding is the error of both (bfloat16 rounds by up to 2^-9 of |x_r|:
        # up to ~0.2 |x_r| in the tangent, before the clamp). Which choice errs less depends on the
        # model and the batch: with this one-multiply model (F = a x_r) the published one does at
        # 256x4x32x32 bfloat16 (0.4e-2 against 1.8e-2 on a CPU), not in float16 (5e-2 both) or at
        # 32x4x4x4; with a network, UCGM.loss does (tests/test_objective_ucgm.py::test_16bit_data).
        tolerance = SIXTEEN_BIT_FD_TOL
        notes.append(f"16-bit data: the finite difference divides the data's rounding by 2 eps, bound "
                     f"{SIXTEEN_BIT_FD_TOL}")
    return Workload(args=(model, x, y, t, z), eager=published, fused=lambda m, *a: ucgm.loss(m, *a), oracle=oracle,
                    grad=True, around=lambda f: partial(_objective_value_and_grad, f), tolerance=tolerance,
                    notes=notes)


BUILDERS = {"enhance_target": (ENHANCE, _enhance_workload), "fd_target": (FD, _fd_workload),
            "ucgm_loss": (LOSS, _loss_workload), "objective": (OBJECTIVES, _objective_workload)}


def cases(plan: Plan):
    transports = ("Linear",) if plan.quick or plan.smallest else ("Linear", "EDM")
    for op, (variants, build) in BUILDERS.items():
        for variant in variants:
            if plan.quick and variant != QUICK[op]:
                continue
            for transport in (transports if op in ("enhance_target", "fd_target") else ("Linear",)):
                label = variant if op == "ucgm_loss" else f"{transport},{variant}"
                for size, shape in plan.data_shapes():
                    if op == "objective" and size == "smallest":
                        shape = (10,) + shape[1:]  # round(0.1 * B) must drop a label
                    elif op == "objective" and plan.quick and size != "train":
                        continue  # its goal is at the training size; the large row costs a long compile
                    for dtype in plan.dtypes:
                        if plan.quick and dtype != torch.float32:
                            continue
                        yield Case(GROUP, op, label, shape, dtype, size,
                                   partial(build, plan, variant, transport, shape, dtype))
