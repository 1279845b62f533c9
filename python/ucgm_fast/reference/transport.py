"""Eager reference of the transport ops: coefficients, interpolate, decode and their adjoints.

Coefficients are evaluated in float32 (float64 for float64 data) and results are returned in
the data's dtype, like the fused ops.
"""
from __future__ import annotations

import torch

from .._validate import batch_times, check_data, compute_dtype
from ..transports import get_transport

__all__ = ["coefficients", "interpolate", "decode", "interpolate_backward", "decode_backward"]


def _per_sample(t, like: torch.Tensor, op: str) -> torch.Tensor:
    """t as a (B, 1, ..., 1) tensor broadcasting against like."""
    return batch_times(op, t, like).reshape((-1,) + (1,) * (like.dim() - 1))


def coefficients(t, transport):
    """(alpha_in(t), gamma_in(t), alpha_to(t), gamma_to(t)), each shaped like t."""
    tr = get_transport(transport)
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=torch.float32)
    if not t.is_floating_point():
        raise TypeError(f"coefficients: t has dtype {t.dtype}; expected a floating dtype")
    tc = t.to(compute_dtype(t.dtype))
    return tuple(c.to(t.dtype) for c in tr.coefficients(tc))


def interpolate(x, z, t, transport):
    """x_t = alpha_in(t) z + gamma_in(t) x, target = alpha_to(t) z + gamma_to(t) x."""
    tr = get_transport(transport)
    check_data("interpolate", x=x, z=z)
    ai, gi, at, gt = tr.coefficients(_per_sample(t, x, "interpolate"))
    x_t = z * ai + x * gi
    target = z * at + x * gt
    return x_t.to(x.dtype), target.to(x.dtype)


def decode(x_t, F, t, transport):
    """x_hat = (F alpha_in - x_t alpha_to) / den, z_hat = (x_t gamma_to - F gamma_in) / den.

    den = alpha_in gamma_to - gamma_in alpha_to.
    """
    tr = get_transport(transport)
    check_data("decode", x_t=x_t, F=F)
    ai, gi, at, gt = tr.coefficients(_per_sample(t, x_t, "decode"))
    den = ai * gt - gi * at
    x_hat = (F * ai - x_t * at) / den
    z_hat = (x_t * gt - F * gi) / den
    return x_hat.to(x_t.dtype), z_hat.to(x_t.dtype)


def interpolate_backward(g_xt, g_target, t, transport):
    """g_x = gamma_in g_xt + gamma_to g_target, g_z = alpha_in g_xt + alpha_to g_target (adjoint of interpolate)."""
    tr = get_transport(transport)
    check_data("interpolate_backward", g_xt=g_xt, g_target=g_target)
    ai, gi, at, gt = tr.coefficients(_per_sample(t, g_xt, "interpolate_backward"))
    return (g_xt * gi + g_target * gt).to(g_xt.dtype), (g_xt * ai + g_target * at).to(g_xt.dtype)


def decode_backward(g_xhat, g_zhat, t, transport):
    """g_xt = (gamma_to g_zhat - alpha_to g_xhat) / den, g_F = (alpha_in g_xhat - gamma_in g_zhat) / den."""
    tr = get_transport(transport)
    check_data("decode_backward", g_xhat=g_xhat, g_zhat=g_zhat)
    ai, gi, at, gt = tr.coefficients(_per_sample(t, g_xhat, "decode_backward"))
    den = ai * gt - gi * at
    return ((g_zhat * gt - g_xhat * at) / den).to(g_xhat.dtype), ((g_xhat * ai - g_zhat * gi) / den).to(g_xhat.dtype)
