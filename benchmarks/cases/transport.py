"""Transport ops: coefficients, interpolate and decode for each transport.

interpolate and decode read two data tensors and write two, so their floor is 4 passes over
memory; coefficients reads t and writes four tensors like it (5 passes). For Linear and ReLinear
the reference returns t itself as one coefficient (alpha_in = t, gamma_in = t), so it and
torch.compile of it write only three: their rows carry a note (:data:`ALIASED`).
"""
from __future__ import annotations

import math
from functools import partial

import torch

import ucgm_fast
from ucgm_fast import reference
from harness.case import Case, Plan, Workload, to_float64

GROUP = "transport"
QUICK_TRANSPORTS = ("Linear", "EDM")  # the cheapest and the most arithmetic-heavy transport
PAIR_OPS = ("interpolate", "decode")
# Transports whose reference coefficients(t) returns t itself (an alias, no pass) as the named coefficient.
ALIASED = {"Linear": "alpha_in", "ReLinear": "gamma_in"}


def _pair_workload(plan: Plan, op: str, transport: str, shape: tuple, dtype: torch.dtype) -> Workload:
    gen = plan.generator(op, transport, shape, str(dtype))
    a, b = plan.randn(shape, dtype, gen), plan.randn(shape, dtype, gen)
    t = plan.times(shape[0], gen)
    args = (a, b, t, transport)
    ref = getattr(reference, op)
    return Workload(args=args, eager=ref, fused=getattr(ucgm_fast, op), oracle=lambda: ref(*to_float64(args)),
                    nbytes=4 * a.numel() * a.element_size() + t.numel() * t.element_size())


def _coefficients_workload(plan: Plan, transport: str, shape: tuple, dtype: torch.dtype) -> Workload:
    gen = plan.generator("coefficients", transport, shape, str(dtype))
    n = 1
    for s in shape:
        n *= s
    t = plan.times(n, gen).to(dtype).reshape(shape)
    args = (t, transport)
    notes = []
    if transport in ALIASED:
        # GB/s is the fused op's (4 new tensors); eager / compile times are of 4 passes, not 5, so
        # the compile peer's "bandwidth" computed from these bytes would read above a copy's.
        notes.append(f"eager and torch.compile return t itself as {ALIASED[transport]} and write 3 tensors "
                     "(4 passes); the fused op writes 4 new ones (5 passes, the bytes GB/s counts)")
    return Workload(args=args, eager=reference.coefficients, fused=ucgm_fast.coefficients,
                    oracle=lambda: reference.coefficients(*to_float64(args)), nbytes=5 * t.numel() * t.element_size(),
                    notes=notes)


def _rows(plan: Plan):
    """(size, shape, dtype) of the data rows: the quick set keeps bfloat16 at the large size only."""
    for size, shape in plan.data_shapes():
        for dtype in plan.dtypes:
            if plan.quick and dtype != torch.float32 and size != "large":
                continue
            yield size, shape, dtype


def cases(plan: Plan):
    transports = QUICK_TRANSPORTS if plan.quick else ucgm_fast.TRANSPORTS
    rows = list(_rows(plan))
    for op in PAIR_OPS:
        for transport in transports:
            for size, shape, dtype in rows:
                yield Case(GROUP, op, transport, shape, dtype, size,
                           partial(_pair_workload, plan, op, transport, shape, dtype))
    # t is one time per sample: (B,) at training sizes. A flat t of as many elements as the data
    # measures the kernel itself: at training sizes (1M, 2M) against torch.compile's launch, at the
    # large size its memory traffic.
    seen = set()
    for transport in transports:
        for size, shape, dtype in rows:
            if plan.quick and dtype != torch.float32:
                continue  # an elementwise map of t: bfloat16 adds compile time, not information
            flat = (math.prod(shape),)
            for t_shape in (flat,) if size == "large" else ((shape[0],), flat):
                if (transport, t_shape, dtype) in seen:
                    continue
                seen.add((transport, t_shape, dtype))
                yield Case(GROUP, "coefficients", transport, t_shape, dtype, size,
                           partial(_coefficients_workload, plan, transport, t_shape, dtype))
