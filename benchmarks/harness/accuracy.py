"""Accuracy of every row: max relative error of each peer against the float64 reference."""
from __future__ import annotations

from typing import Any, Optional

import torch

# Bound on the fused op's max_rel_err against float64, as in tests/conftest.py, or 2x the eager
# reference's own error in the same dtype where that is larger: low precision, and ill-conditioned
# float32 math such as the finite-difference target (a difference divided by 2 eps = 0.01).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
WIDEN_CAP = 100


def tensors(out: Any) -> list[torch.Tensor]:
    """The output tensors of a peer, flattened in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    raise TypeError(f"a benchmark peer returned {type(out).__name__}; expected tensors")


def max_rel_err(out: Any, ref: Any) -> float:
    """max over outputs of max|out - ref| / max|ref|, in float64 on the output's device.

    inf when the output or the reference has a NaN or an inf: a broken reference must fail the
    row, not pass it (Python's max() drops a NaN).
    """
    outs, refs = tensors(out), tensors(ref)
    if len(outs) != len(refs):
        raise ValueError(f"peer returned {len(outs)} tensors but the reference {len(refs)}")
    worst = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise ValueError(f"peer output shape {tuple(o.shape)} != reference shape {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        o, r = o.detach().double(), r.detach().to(o.device).double()
        if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
            return float("inf")
        scale = r.abs().max().clamp_min(1e-30)
        worst = max(worst, float((o - r).abs().max() / scale))
    return worst


def bound(dtype: torch.dtype, eager_err: Optional[float], override: Optional[float] = None) -> float:
    """The max_rel_err a fused op may have: the dtype's (see TOLERANCE) or the row's own ``override``,
    or twice the eager reference's own error where that is larger.

    The widening applies to a row's own bound too: on CUDA the end-to-end rows run the model under
    bf16 autocast and are checked against a float32 oracle, where the eager peer's own error (the
    same bf16 model) is the measure of what bf16 costs; on CPU their eager error is far below it.
    """
    b = TOLERANCE.get(dtype, 1e-2) if override is None else override
    if eager_err is not None and eager_err < float("inf"):  # a non-finite eager output widens nothing
        # At most WIDEN_CAP times: the widest rows measured need 18x (float32 fd_target). An eager
        # error far beyond that means the oracle computed something else, and the peers that agree
        # with each other must fail, not pass (a float64 oracle that wrote into the peers' inputs
        # gave both 0.2 and passed before this cap).
        b = max(b, min(2 * eager_err, WIDEN_CAP * b))
    return b
