"""Argument checks shared by every public op: clear errors that name the argument."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic type of the kernels: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_data(op: str, **tensors: torch.Tensor) -> torch.Tensor:
    """Checks that the data tensors share shape (B, ...), floating dtype and device; returns the first."""
    first_name, first = None, None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
        if x.dim() == 0:
            raise ValueError(f"{op}: {name} must have a batch dimension (shape (B, ...)), got a 0-d tensor")
        if first is None:
            first_name, first = name, x
            continue
        if x.device != first.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {first_name} is on {first.device}")
        if x.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {x.dtype} but {first_name} has dtype {first.dtype}; "
                            "convert them to one floating dtype")
        if x.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(x.shape)} but {first_name} has shape "
                             f"{tuple(first.shape)}; they must match")
    return first


def is_real_number(v) -> bool:
    """A real number that is not a bool (float and int tested first: the numbers.Real ABC check
    costs about a microsecond, and a step's setup makes several)."""
    return type(v) is float or type(v) is int or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def batch_times(op: str, t, like: torch.Tensor, name: str = "t") -> torch.Tensor:
    """One time per sample as a (B,) tensor of the compute dtype on like's device (maybe stride 0).

    Accepts a Python number, a 0-d tensor, or a tensor shaped (B,) or (B, 1, ..., 1).
    """
    batch = like.shape[0]
    dtype = compute_dtype(like.dtype)
    if isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == 1 and t.shape[0] == batch \
            and t.device == like.device:
        return t  # the common case, checked first: these ops are launch-bound at training sizes
    if is_real_number(t):
        return torch.full((1,), float(t), dtype=dtype, device=like.device).expand(batch)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a float or a floating tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected a floating dtype")
    if t.device != like.device:
        if t.dim() == 0 and t.device.type == "cpu":
            t = t.to(like.device, non_blocking=True)
        else:
            raise ValueError(f"{op}: {name} is on {t.device} but the data is on {like.device}")
    if t.dim() == 0:
        return t.to(dtype).reshape(1).expand(batch)
    if t.shape[0] != batch or any(s != 1 for s in t.shape[1:]) or t.dim() > like.dim():
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected a float, a 0-d tensor, (B,) or "
                         f"(B, 1, ..., 1) with B = {batch} (the data's batch size)")
    return t.reshape(batch).to(dtype)


def check_raw(op: str, like: torch.Tensor, same=(), shaped=(), rows=()) -> None:
    """What keeps a raw ``torch.ops.ucgm_fast.<op>`` call inside its tensors' memory.

    The public functions check their arguments (with friendlier messages) and run the kernels
    directly; these checks run where the registered op itself is called (torch.compile'd code,
    torch.ops by hand), which hands the kernels raw pointers. ``same``: tensors (None skipped)
    with like's shape and dtype; ``shaped``: like's shape, any kernel dtype; ``rows``: floating
    (B,) tensors, B = like.shape[0]. All on like's device.
    """
    if like.dtype not in FLOAT_DTYPES:
        raise TypeError(f"ucgm_fast::{op}: {like.dtype} data; the kernels read {FLOAT_DTYPES}")
    for kind, group in (("same", same), ("shaped", shaped), ("rows", rows)):
        for v in group:
            if v is None:
                continue
            if v.device != like.device:
                raise ValueError(f"ucgm_fast::{op}: a tensor on {v.device}, the data on {like.device}")
            if v.dtype not in FLOAT_DTYPES or (kind == "same" and v.dtype != like.dtype):
                raise TypeError(f"ucgm_fast::{op}: a {v.dtype} tensor beside {like.dtype} data")
            if kind == "rows":
                if v.dim() != 1 or v.shape[0] != like.shape[0]:
                    raise ValueError(f"ucgm_fast::{op}: per-row tensor of shape {tuple(v.shape)}; expected "
                                     f"({like.shape[0]},)")
            elif v.shape != like.shape:
                raise ValueError(f"ucgm_fast::{op}: tensor of shape {tuple(v.shape)} beside data of shape "
                                 f"{tuple(like.shape)}")
