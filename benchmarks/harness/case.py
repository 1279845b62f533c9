"""What a benchmark case is, the sizes it runs at, and how case modules are found.

A case module (``benchmarks/cases/<group>.py``) imports the ops it measures at the top and
defines ``cases(plan) -> iterable of Case``; each Case builds its :class:`Workload` lazily, so
only one row's tensors are alive at a time. A group that needs a missing third-party package is
skipped with the reason shown; a missing ucgm_fast op or harness module is an error (see
:func:`discover`).
"""
from __future__ import annotations

import importlib
import pkgutil
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}


@dataclass
class Workload:
    """One row's inputs and the functions that compute it.

    Every peer is called as ``peer(*args)`` and returns a tensor or a tuple of tensors in the
    same order. ``oracle()`` returns the float64 reference outputs the peers are checked against.
    """

    args: tuple
    eager: Callable[..., Any]                   # the eager PyTorch reference (ucgm_fast.reference)
    fused: Callable[..., Any]                   # ucgm_fast's fused op
    oracle: Optional[Callable[[], Any]] = None  # float64 reference outputs; None: not checked
    compiled: Optional[Callable[..., Any]] = None  # function handed to torch.compile (default: eager)
    nbytes: Optional[int] = None                # fewest bytes one call must move (for GB/s)
    peers: dict = field(default_factory=dict)   # optional extra peers {name: fn}, e.g. Numba, CuPy
    grad: bool = False                          # run with autograd on (forward+backward rows)
    around: Optional[Callable] = None           # around(f) -> the timed callable built from a peer's f,
    #                                             e.g. forward then autograd.grad: torch.compile then
    #                                             compiles the forward (AOTAutograd its backward)
    tolerance: Optional[float] = None           # max_rel_err bound; default: per dtype, see accuracy.py
    budget: Optional[Any] = None                # timing.Budget overriding the run's (rows of seconds per call)
    compile_peer: bool = True                   # False: no torch.compile column (the row compiles what it needs)
    in_turn: bool = False                       # peers' samples in turn on CUDA too (timing.time_in_turn): long calls
    reset: Optional[Callable[[], None]] = None  # restores state the peers update in place, before each
    #                                             peer's first (checked) call
    prepare: dict = field(default_factory=dict)  # {peer: fn} run before each of its samples taken in
    #                                              turn, untimed: undoes what the other peers did to it
    notes: list = field(default_factory=list)   # lines the harness appends to the row's notes: what a
    #                                             reader must know to read its numbers (e.g. the oracle)


@dataclass
class Case:
    """One row of the report: an op at one variant, shape and dtype."""

    group: str                          # case module name, e.g. "transport"
    op: str                             # public op name, e.g. "decode"
    variant: str                        # e.g. the transport, "order=2", or ""
    shape: tuple                        # the data shape
    dtype: torch.dtype
    size: str                           # "train", "large" or "smallest"
    build: Callable[[], Workload]

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def key(self) -> str:
        """Row id used by ``--match``: op/variant/shape/dtype."""
        return f"{self.op}/{self.variant}/{self.shape_str}/{self.dtype_name}"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Plan:
    """What to run: device, quick or full set, and the sizes that go with them."""

    device: torch.device
    quick: bool = False
    smallest: bool = False
    seed: int = 0
    compile: bool = True     # False (--no-compile): no row compiles anything

    # Training sizes: a batch of 256 latents of a 256px image (4x32x32) and of DiT's
    # 32-channel 16x16 latents. Large: where a pass is bound by memory bandwidth.
    TRAIN_SHAPES = ((256, 4, 32, 32), (256, 32, 16, 16))
    LARGE_SHAPE = {"cpu": (256, 4, 64, 64), "cuda": (256, 4, 256, 256)}  # 4M / 64M elements
    SMALLEST_SHAPE = (3, 2, 5)

    @property
    def dtypes(self) -> tuple:
        return (torch.float32,) if self.smallest else (torch.float32, torch.bfloat16)

    def data_shapes(self) -> list[tuple[str, tuple]]:
        """(size label, shape) of the data tensors: training sizes then the large size."""
        if self.smallest:
            return [("smallest", self.SMALLEST_SHAPE)]
        train = self.TRAIN_SHAPES[:1] if self.quick else self.TRAIN_SHAPES
        large = self.LARGE_SHAPE.get(self.device.type, self.LARGE_SHAPE["cuda"])
        return [("train", s) for s in train] + [("large", large)]

    def generator(self, *salt) -> torch.Generator:
        """A generator on the plan's device seeded per row, so every row's inputs are reproducible."""
        seed = (self.seed * 1000003 + zlib.crc32(repr(salt).encode())) % 2**31
        return torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
        """Standard normal data on the plan's device (never zeros: zeros can hide bugs and run faster)."""
        return torch.randn(shape, generator=gen, dtype=torch.float32, device=self.device).to(dtype)

    def times(self, batch: int, gen: torch.Generator, lo: float = 0.02, hi: float = 0.98) -> torch.Tensor:
        """Per-sample float32 times uniform in [lo, hi] (away from the ends where a transport degenerates)."""
        return torch.rand(batch, generator=gen, dtype=torch.float32, device=self.device) * (hi - lo) + lo


def to_float64(args: tuple) -> tuple:
    """args with every floating tensor as a float64 copy (the oracle's inputs).

    Always a copy: ``.double()`` of a float64 tensor is that tensor, so an oracle that writes in
    place (the sampler's extrapolation buffers) would otherwise change the peers' inputs.
    """
    return tuple(a.to(torch.float64, copy=True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


# Modules of this project: an ImportError naming one of them is a bug (a renamed op, a broken
# build, a typo), never a reason to skip a group quietly.
OWN_MODULES = ("ucgm_fast", "harness", "cases")


def _own_module(name: Optional[str]) -> bool:
    """Whether an ImportError's ``name`` is one of :data:`OWN_MODULES` (or has none: nothing to blame)."""
    return name is None or any(name == m or name.startswith(m + ".") for m in OWN_MODULES)


def discover(package: str = "cases") -> tuple[dict, dict]:
    """Imports every module of ``package``; returns ({group: module}, {group: why it was skipped}).

    A group is skipped (with the reason) only when it needs a third-party package that is not
    installed. Every op the groups measure exists in ucgm_fast, so an ImportError of ucgm_fast
    itself, of the harness or of a case module (or one that names no module) propagates: it used
    to drop the whole group while the run still exited 0. Any other error in a case module is a
    bug and propagates too.
    """
    pkg = importlib.import_module(package)
    groups, skipped = {}, {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except ImportError as exc:
            if _own_module(exc.name) or exc.name.split(".")[0] == package.split(".")[0]:
                raise
            skipped[info.name] = f"needs {exc.name}: {type(exc).__name__}: {exc}"
            continue
        if not callable(getattr(module, "cases", None)):
            raise TypeError(f"benchmark case module {package}.{info.name} must define cases(plan)")
        groups[info.name] = module
    return groups, skipped


def collect(groups: dict, plan: Plan, ops: Iterable[str] | None = None) -> list[Case]:
    """All cases of the groups, filtered by ``ops`` (op or group names; None keeps all)."""
    wanted = set(ops) if ops else None
    rows = []
    for name, module in groups.items():
        for case in module.cases(plan):
            if wanted is None or case.op in wanted or case.group in wanted:
                rows.append(case)
    return rows
