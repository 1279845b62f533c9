"""Sampler ops: one sampler step (order 1: deterministic, stochastic, extrapolating) and order 2.

The eager reference draws nothing itself: it is handed the same Philox noise the fused kernel
generates inside (``ucgm_fast.sampler_noise``), so every peer computes the same numbers. In the
stochastic variant (kappa > 0) the eager and compiled peers are thereby spared drawing the noise
while the fused kernel draws it: a comparison tilted against the fused op. In the others
(kappa = 0, as in deterministic multi-step sampling) the fused kernel draws no noise and the
reference still reads the noise tensor it multiplies by sqrt(kappa) = 0, as the published step
draws noise whatever kappa is. The state is float32 or float64 (the published loop's).
"""
from __future__ import annotations

from functools import partial

import torch

# A missing op is an error, not a skipped group (see harness/case.py discover).
from ucgm_fast import sampler_correct, sampler_noise, sampler_step
from ucgm_fast import reference
from harness.case import Case, Plan, Workload, to_float64
from ._sampler_peers import peers_for

GROUP = "sampler"
SEED = 1234
T, T_NEXT = 0.7, 0.4           # one step of a Linear / EDM grid, away from the ends
EXTRAPOLATION = 0.2
# variant -> (extrapolation buffers, order, kappa)
VARIANTS = {"order=1": (False, 1, 0.0), "order=1,stochastic": (False, 1, 0.5), "order=1,extrapolate": (True, 1, 0.0),
            "order=2": (False, 2, 0.0)}
STATE_DTYPES = (torch.float32, torch.float64)


def eager_step(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise):
    return reference.sampler.sampler_step(F, x, t, t_next, transport, step=step, stochast_ratio=kappa,
                                          extrapol_ratio=e, x_prev=x_prev, z_prev=z_prev, noise=noise)


def fused_step(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise):
    return sampler_step(F, x, t, t_next, transport, step=step, stochast_ratio=kappa, extrapol_ratio=e, seed=SEED,
                        x_prev=x_prev, z_prev=z_prev)


# With extrapolation buffers the step also writes x_prev and z_prev (in place, the reference as the
# kernel): those wrappers return them after x_next, so the check covers every tensor the row's
# bytes count. No clone: on CPU a peer's output is checked right after its first call (after reset);
# on CUDA after its timed calls too, which rewrite the buffers with the same raw estimates.
def eager_step_buffered(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise):
    return eager_step(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise), x_prev, z_prev


def fused_step_buffered(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise):
    return fused_step(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise), x_prev, z_prev


# Order 2 returns (corrected state, the step's raw x_hat): the x_hat a sampling loop reports is
# written by the step, and counted in the row's bytes, so it is checked too.
def eager_order2(F, F_next, x, t, t_next, transport, noise):
    x_next, x_hat, z_hat = reference.sampler.sampler_step(F, x, t, t_next, transport, stochast_ratio=0.0,
                                                          noise=noise, return_hats=True)
    return reference.sampler.sampler_correct(F_next, x_next, x, z_hat, t, t_next, transport), x_hat


def fused_order2(F, F_next, x, t, t_next, transport, noise):
    x_next, x_hat, z_hat = sampler_step(F, x, t, t_next, transport, stochast_ratio=0.0, seed=SEED, return_hats=True)
    return sampler_correct(F_next, x_next, x, z_hat, t, t_next, transport), x_hat


def _workload(plan: Plan, variant: str, transport: str, shape: tuple, dtype: torch.dtype) -> Workload:
    buffers, order, kappa = VARIANTS[variant]
    gen = plan.generator("sampler", variant, transport, shape, str(dtype))
    F, x = plan.randn(shape, dtype, gen), plan.randn(shape, dtype, gen)
    step = 2 if buffers else 0
    noise = sampler_noise(shape, seed=SEED, step=step, device=plan.device)
    n, size = x.numel(), x.element_size()
    if order == 2:
        args = (F, plan.randn(shape, dtype, gen), x, T, T_NEXT, transport, noise)
        # step: read F, x; write x_next, x_hat, z_hat. correct: read F', x_next, x, z_hat; write 1.
        return Workload(args=args, eager=eager_order2, fused=fused_order2,
                        oracle=lambda: eager_order2(*to_float64(args)), nbytes=10 * n * size)
    x_prev = z_prev = start = reset = None
    if buffers:
        # The previous step's raw estimates: those of other model outputs at another state, so that
        # x_hat - x_prev is not zero. The step overwrites the buffers with its own estimates, so
        # each peer's checked first call starts from these again (reset); later calls extrapolate
        # by zero, at the same cost.
        _, x_hat, z_hat = sampler_step(plan.randn(shape, dtype, gen), plan.randn(shape, dtype, gen), T, T_NEXT,
                                       transport, stochast_ratio=kappa, seed=SEED, return_hats=True)
        start = (x_hat, z_hat)
        x_prev, z_prev = x_hat.clone(), z_hat.clone()

        def reset():
            x_prev.copy_(start[0])
            z_prev.copy_(start[1])
    args = (F, x, T, T_NEXT, transport, step, kappa, EXTRAPOLATION if buffers else 0.0, x_prev, z_prev, noise)

    def oracle():
        a = list(to_float64(args))
        if not buffers:
            return eager_step(*a)
        # Its own float64 buffers, copied from the starting ones: the reference writes the step's
        # raw estimates into them in place, as the kernel does, and must not change ``start``
        # (.double() of a float64 tensor is the tensor itself: every reset then restored the
        # oracle's output, and both peers missed it by 0.2 at float64).
        a[8], a[9] = (v.to(torch.float64, copy=True) for v in start)
        return eager_step_buffered(*a)

    # read F, x, write x_next (the fused kernel makes its noise); extrapolation: read and write both buffers.
    # Numba (CPU) / CuPy (CUDA) peers, where installed: the plain order-1 step only.
    peers = {} if buffers else peers_for(plan.device.type)
    return Workload(args=args, eager=eager_step_buffered if buffers else eager_step,
                    fused=fused_step_buffered if buffers else fused_step, oracle=oracle,
                    nbytes=(7 if buffers else 3) * n * size, peers=dict(peers), reset=reset)


def cases(plan: Plan):
    transports = ("Linear",) if plan.quick or plan.smallest else ("Linear", "EDM")
    dtypes = (torch.float32,) if plan.smallest else STATE_DTYPES
    for variant in VARIANTS:
        if plan.quick and variant != "order=1":
            continue
        for transport in transports:
            for size, shape in plan.data_shapes():
                for dtype in dtypes:
                    if plan.quick and dtype != torch.float64 and size != "large":
                        continue
                    yield Case(GROUP, "sampler_step", f"{transport},{variant}", shape, dtype, size,
                               partial(_workload, plan, variant, transport, shape, dtype))
