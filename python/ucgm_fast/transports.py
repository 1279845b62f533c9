"""Transports: the four coefficient functions ``alpha_in, gamma_in, alpha_to, gamma_to`` of t.

    x_t    = alpha_in(t) * z + gamma_in(t) * x
    target = alpha_to(t) * z + gamma_to(t) * x

The built-in transports run through the compiled kernels (their formulas live once, in
``csrc/ucgm/transport.h``; the PyTorch versions here are the eager reference). A
:class:`Transport` built from Python callables runs through :mod:`ucgm_fast.reference`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

__all__ = ["TRANSPORTS", "Transport", "get_transport"]

#: Names of the built-in transports, in the order of the kernels' transport ids.
TRANSPORTS = ("Linear", "ReLinear", "TrigFlow", "TrigLinear", "EDM", "Random")

# Published constant (not pi/2), kept so released checkpoints keep working.
_C = 1.57

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Transport:
    """x_t = alpha_in(t) z + gamma_in(t) x, target = alpha_to(t) z + gamma_to(t) x.

    Parameters
    ----------
    alpha_in, gamma_in, alpha_to, gamma_to : callable
        Functions of a floating tensor ``t`` returning a tensor of the same shape.
    name : str, optional
        Label used in messages; built-in transports carry their published name.

    Notes
    -----
    The decode step divides by ``alpha_in * gamma_to - gamma_in * alpha_to``, which must not
    vanish on the times used. User-defined transports run through the eager reference.
    """

    alpha_in: Fn
    gamma_in: Fn
    alpha_to: Fn
    gamma_to: Fn
    name: str = "custom"
    # The kernels' transport id: built-in transports only. Not an init field, so a transport derived
    # with dataclasses.replace (other functions) runs the reference instead of the built-in kernels.
    id: Optional[int] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for key in ("alpha_in", "gamma_in", "alpha_to", "gamma_to"):
            if not callable(getattr(self, key)):
                raise TypeError(f"Transport: {key} must be callable, got {type(getattr(self, key)).__name__}")

    def coefficients(self, t: torch.Tensor):
        """(alpha_in(t), gamma_in(t), alpha_to(t), gamma_to(t)), each shaped like ``t``."""
        return tuple(_as_tensor(f(t), t) for f in (self.alpha_in, self.gamma_in, self.alpha_to, self.gamma_to))

    @property
    def noise_time(self) -> float:
        """The end of [0, 1] where gamma_in ~ 0 (pure noise): sampling starts there."""
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        g = self.coefficients(ends)[1].abs()
        return 1.0 if float(g[1]) <= float(g[0]) else 0.0


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    # A callable may return a Python number (constant coefficient); give it t's shape.
    if isinstance(value, torch.Tensor):
        return value.expand_as(like) if value.shape != like.shape else value
    return torch.full_like(like, float(value))


def _edm_s(t):
    return torch.exp(4 * (2.68 * t - 1.59))


def _edm_r(t):
    return 1 / torch.sqrt(_edm_s(t) ** 2 + 0.25)


_BUILTIN = {
    "Linear": dict(alpha_in=lambda t: t, gamma_in=lambda t: 1 - t,
                   alpha_to=lambda t: torch.ones_like(t), gamma_to=lambda t: -torch.ones_like(t)),
    "ReLinear": dict(alpha_in=lambda t: 1 - t, gamma_in=lambda t: t,
                     alpha_to=lambda t: -torch.ones_like(t), gamma_to=lambda t: torch.ones_like(t)),
    "TrigFlow": dict(alpha_in=lambda t: torch.sin(_C * t), gamma_in=lambda t: torch.cos(_C * t),
                     alpha_to=lambda t: torch.cos(_C * t), gamma_to=lambda t: -torch.sin(_C * t)),
    "TrigLinear": dict(alpha_in=lambda t: torch.sin(_C * t), gamma_in=lambda t: torch.cos(_C * t),
                       alpha_to=lambda t: torch.ones_like(t), gamma_to=lambda t: -torch.ones_like(t)),
    "EDM": dict(alpha_in=lambda t: _edm_s(t) * _edm_r(t), gamma_in=_edm_r,
                alpha_to=lambda t: -0.5 * _edm_r(t), gamma_to=lambda t: 2 * _edm_s(t) * _edm_r(t)),
    "Random": dict(alpha_in=lambda t: torch.sin(_C * t), gamma_in=lambda t: 1 - t,
                   alpha_to=lambda t: torch.ones_like(t), gamma_to=lambda t: -1 - torch.exp(-5 * t)),
}
def _builtin(i: int, name: str) -> Transport:
    tr = Transport(name=name, **_BUILTIN[name])
    object.__setattr__(tr, "id", i)  # frozen dataclass
    return tr


BUILTIN_TRANSPORTS = {name: _builtin(i, name) for i, name in enumerate(TRANSPORTS)}
assert math.isclose(_C, 1.57) and tuple(BUILTIN_TRANSPORTS) == TRANSPORTS


def get_transport(transport: Union[str, Transport]) -> Transport:
    """The :class:`Transport` for a built-in name (case-insensitive) or a Transport instance."""
    if isinstance(transport, Transport):
        return transport
    if isinstance(transport, str):
        for name, tr in BUILTIN_TRANSPORTS.items():
            if name.lower() == transport.lower():
                return tr
        raise ValueError(f"transport: unknown transport {transport!r}; valid names are {', '.join(TRANSPORTS)} "
                         "(or pass a ucgm_fast.Transport)")
    raise TypeError(f"transport: expected a name from {TRANSPORTS} or a ucgm_fast.Transport, "
                    f"got {type(transport).__name__}")
