"""Eager reference of the sampler: time grid, Philox noise, one step, the order-2 correction, the loop.

Written from the published sampler (``uni_sample`` in LINs-lab/UCGM
``methods/unigen.py``) with plain PyTorch ops. :func:`sample` in float64 is the oracle the fused
sampler is tested against; :func:`philox_noise` reproduces the kernels' noise bit for bit with
integer and correctly rounded float32 tensor ops.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..transports import get_transport

__all__ = ["time_grid", "auto_stochast_ratio", "philox4x32_10", "philox_noise", "sampler_step", "sampler_correct",
           "sample"]

_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Time grid
# ---------------------------------------------------------------------------------------------

def integrates_from_one(transport) -> bool:
    """Whether sampling starts at t=1, decided as published: gamma_in(0) ~ 0 -> start at 0, alpha_in(0) ~ 0 -> 1."""
    tr = get_transport(transport)
    alpha_in, gamma_in = tr.coefficients(torch.zeros((), dtype=torch.float64))[:2]
    if float(gamma_in.abs()) < 0.005:
        return False
    if float(alpha_in.abs()) < 0.005:
        return True
    raise ValueError(f"transport: {tr.name} has neither gamma_in(0) ~ 0 nor alpha_in(0) ~ 0, so no end of [0, 1] "
                     "is pure noise and the sampler cannot tell where to start")


def time_grid(steps: int, order: int, transport, time_dist_ctrl: Sequence[float] = (1.0, 1.0, 1.0),
              rfba_gap_steps: Sequence[float] = (0.001, 0.001)) -> torch.Tensor:
    """t_0 .. t_K = 0 with t_i = flip(kumaraswamy(linspace(g0, 1 - g1)))_i, float64 on the CPU.

    Order 2 uses (steps + 1) // 2 points; with g1 == 0 one extra point is made and the last dropped;
    the Kumaraswamy map is (1 - (1 - u^a)^b)^c; the flip t -> 1 - t applies when integration starts
    at t = 1. The loop runs K = len(grid) - 1 iterations.

    Unlike the published loop, the grid stays float64 (as DESIGN.md specifies): the published code
    casts the float64 linspace to the noise's dtype (float32) before the map. Near the noise end,
    where Heun divides by gamma_in(t_0) ~ 1e-4, those float32 times move order-2 samples by up to
    ~1.5e-4 relative (order 1: ~1e-7). With g1 == 0 the published order-2 loop also corrects the
    last step, whose result it never uses; here that model call is skipped (same samples, one
    function evaluation fewer).
    """
    g0, g1 = float(rfba_gap_steps[0]), float(rfba_gap_steps[1])
    a, b, c = (float(v) for v in time_dist_ctrl)
    points = (steps + 1) // 2 if order == 2 else steps
    if g1 == 0.0:
        points += 1
    t = torch.linspace(g0, 1.0 - g1, points, dtype=torch.float64)
    if g1 == 0.0:
        t = t[:-1]
    t = (1 - (1 - t ** a) ** b) ** c
    if integrates_from_one(transport):
        t = 1 - t
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def auto_stochast_ratio(transport, t: float, t_next: float) -> float:
    """kappa = clamp((sqrt|t' - t| sqrt(2 alpha_in(t)) / alpha_in(t'))^2, 0, 1), in float64 (first step's t, t')."""
    tr = get_transport(transport)
    tc = torch.tensor(t, dtype=torch.float64)
    tn = torch.tensor(t_next, dtype=torch.float64)
    k = torch.sqrt((tn - tc).abs()) * torch.sqrt(2 * tr.coefficients(tc)[0]) / tr.coefficients(tn)[0]
    return float(torch.clamp(k ** (1 / 0.5), min=0, max=1))


# ---------------------------------------------------------------------------------------------
# Noise: Philox4x32-10 + Box-Muller, exactly as csrc/ucgm/philox.h
# ---------------------------------------------------------------------------------------------

def _mulhilo(a: torch.Tensor, m: int):
    # 32x32 -> 64-bit product from 16-bit halves, so no int64 intermediate overflows.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    m_lo, m_hi = m & 0xFFFF, m >> 16
    ll, lh, hl, hh = a_lo * m_lo, a_lo * m_hi, a_hi * m_lo, a_hi * m_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(counter, key):
    """Philox4x32-10 (Random123): counter is 4 int64 tensors (or ints) of 32-bit words, key 2 ints."""
    c = [torch.as_tensor(v, dtype=torch.int64) for v in counter]
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
        hi0, lo0 = _mulhilo(c[0], 0xD2511F53)
        hi1, lo1 = _mulhilo(c[2], 0xCD9E8D57)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# Correctly rounded float32 arithmetic: each op in float64, then rounded once to float32 (exact for
# +, -, *, / and sqrt since 53 >= 2 * 24 + 2). PyTorch's own float32 CPU sqrt is not always
# correctly rounded, and the kernels' noise is defined by correctly rounded ops.
def _rn(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32)


def _mul(a, b):
    return _rn(torch.as_tensor(a).double() * torch.as_tensor(b).double())


def _add(a, b):
    return _rn(torch.as_tensor(a).double() + torch.as_tensor(b).double())


def _div(a, b):
    return _rn(torch.as_tensor(a).double() / torch.as_tensor(b).double())


def _noise_log(u: torch.Tensor) -> torch.Tensor:
    b = u.view(torch.int32).to(torch.int64) & _MASK32
    e = (b >> 23) - 127
    m = ((b & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)
    big = m > _f32(1.41421356)
    m = torch.where(big, _mul(m, 0.5), m)
    e = torch.where(big, e + 1, e)
    f = _add(m, -1.0)
    s = _div(f, _add(2.0, f))
    s2 = _mul(s, s)
    p = _add(0.142857143, _mul(s2, _f32(0.111111111)))
    p = _add(_f32(0.2), _mul(s2, p))
    p = _add(_f32(0.333333343), _mul(s2, p))
    s_2 = _mul(s, 2.0)
    lnm = _add(s_2, _mul(s_2, _mul(s2, p)))
    return _add(_mul(e.to(torch.float32), _f32(0.693147181)), lnm)


def _noise_sincos(k: torch.Tensor):
    q = (k + (1 << 21)) >> 22
    r = k - (q << 22)
    a = _mul(r.to(torch.float32), _f32(3.74507028e-7))
    a2 = _mul(a, a)
    ps = _add(_f32(-1.98412698e-4), _mul(a2, _f32(2.75573192e-6)))
    ps = _add(_f32(8.33333377e-3), _mul(a2, ps))
    ps = _add(_f32(-0.166666672), _mul(a2, ps))
    sn = _add(a, _mul(_mul(a, a2), ps))
    pc = _add(_f32(-1.38888889e-3), _mul(a2, _f32(2.48015873e-5)))
    pc = _add(_f32(4.16666679e-2), _mul(a2, pc))
    pc = _add(_f32(-0.5), _mul(a2, pc))
    cs = _add(1.0, _mul(a2, pc))
    q = q & 3
    s = torch.where(q == 0, sn, torch.where(q == 1, cs, torch.where(q == 2, -sn, -cs)))
    c = torch.where(q == 0, cs, torch.where(q == 1, -sn, torch.where(q == 2, -cs, sn)))
    return s, c


def _box_muller(w_r: torch.Tensor, w_a: torch.Tensor):
    u = _mul(((w_r >> 8) + 1).to(torch.float32), 2.0 ** -24)
    rad = _rn(torch.sqrt(_mul(-2.0, _noise_log(u)).double()))
    s, c = _noise_sincos(w_a >> 8)
    return _mul(rad, c), _mul(rad, s)


def philox_noise(numel: int, seed: int = 0, step: int = 0, raw: bool = False) -> torch.Tensor:
    """The noise of stream (seed, step): numel float32 normals, or raw uint32 words as int64 (CPU).

    Element i is lane i % 4 of philox4x32_10({j, j >> 32, seed >> 32, 0}, {seed, step}), j = i // 4;
    lanes (0, 1) and (2, 3) are Box-Muller pairs.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    j = torch.arange((numel + 3) // 4, dtype=torch.int64)
    w = philox4x32_10([j & _MASK32, j >> 32, torch.full_like(j, seed >> 32), torch.zeros_like(j)],
                      [seed & _MASK32, step])
    if raw:
        return torch.stack(w, dim=1).reshape(-1)[:numel]
    n0, n1 = _box_muller(w[0], w[1])
    n2, n3 = _box_muller(w[2], w[3])
    return torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)[:numel]


# ---------------------------------------------------------------------------------------------
# One step and the order-2 correction
# ---------------------------------------------------------------------------------------------

def _coeffs(tr, t, dtype):
    return tr.coefficients(torch.as_tensor(t, dtype=dtype))


def sampler_step(F, x, t, t_next, transport, *, step: int = 0, stochast_ratio=0.0, extrapol_ratio=0.0,
                 seed: int = 0, x_prev: Optional[torch.Tensor] = None, z_prev: Optional[torch.Tensor] = None,
                 return_hats: bool = False, noise: Optional[torch.Tensor] = None):
    """x_next = gamma_in(t') x_hat + alpha_in(t') (sqrt(1 - kappa) z_hat + sqrt(kappa) noise).

    Computed in float64 and returned in x's dtype, like the kernel. (x_hat, z_hat) are decoded from
    (x, F) at t; with buffers x_prev / z_prev given, steps >= 2 extrapolate
    x_hat += e (x_hat - x_prev) (z likewise) and the buffers receive the raw estimates (in place).
    noise defaults to :func:`philox_noise` of (seed, step).
    Returns x_next, or (x_next, raw x_hat, z_hat used) with return_hats.
    """
    tr = get_transport(transport)
    f64 = torch.float64
    ai, gi, at, gt = _coeffs(tr, t, f64)
    ai1, gi1, _, _ = _coeffs(tr, t_next, f64)
    xc, Fc = x.to(f64), F.to(f64)
    den = ai * gt - gi * at
    x_hat = (Fc * ai - xc * at) / den
    z_hat = (xc * gt - Fc * gi) / den
    raw = x_hat
    if x_prev is not None:
        xh_raw, zh_raw = x_hat, z_hat
        if step >= 2:
            e = torch.as_tensor(extrapol_ratio, dtype=f64)
            x_hat = x_hat + e * (x_hat - x_prev.to(f64))
            z_hat = z_hat + e * (z_hat - z_prev.to(f64))
        x_prev.copy_(xh_raw.reshape(x_prev.shape))
        z_prev.copy_(zh_raw.reshape(z_prev.shape))
    kappa = torch.as_tensor(stochast_ratio, dtype=f64)
    if noise is None:
        noise = philox_noise(x.numel(), seed, step).reshape(x.shape).to(x.device)
    x_next = gi1 * x_hat + ai1 * (z_hat * torch.sqrt(1 - kappa) + noise.to(x.device, f64) * torch.sqrt(kappa))
    if return_hats:
        return x_next.to(x.dtype), raw.to(x.dtype), z_hat.to(x.dtype)
    return x_next.to(x.dtype)


def sampler_correct(F, x_next, x, z_hat, t, t_next, transport):
    """x gamma_in(t')/gamma_in(t) + (alpha_in(t') - gamma_in(t') alpha_in(t)/gamma_in(t)) (z_hat + z_pri)/2.

    z_pri = (x_next gamma_to(t') - F gamma_in(t')) / den(t'); float64 arithmetic, x's dtype out.
    """
    tr = get_transport(transport)
    f64 = torch.float64
    ai, gi, _, _ = _coeffs(tr, t, f64)
    ai1, gi1, at1, gt1 = _coeffs(tr, t_next, f64)
    z_pri = (x_next.to(f64) * gt1 - F.to(f64) * gi1) / (ai1 * gt1 - gi1 * at1)
    out = x.to(f64) * gi1 / gi + (ai1 - gi1 * ai / gi) * (0.5 * z_hat.to(f64) + 0.5 * z_pri)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, noise, transport="Linear", steps=35, order=1, stochast_ratio=0.0, extrapol_ratio=0.0,
           time_dist_ctrl=(1.0, 1.0, 1.0), rfba_gap_steps=(0.001, 0.001), seed=0, state_dtype=torch.float64,
           return_trajectory=False, y=None, draw_noise=None):
    """The published sampling loop (uni_sample), state in state_dtype, model fed noise.dtype.

    Noise comes from :func:`philox_noise` of (seed, step index) instead of torch.randn, so the fused
    sampler can be compared at kappa > 0 too; ``draw_noise(x, step)`` replaces it (e.g. with
    ``torch.randn_like(x)`` as published, or with noise drawn beforehand). No classifier-free guidance (the model's own business
    in the published code). Returns the last raw x_hat (and all of them, stacked).
    """
    tr = get_transport(transport)
    grid = time_grid(steps, order, tr, time_dist_ctrl, rfba_gap_steps).to(state_dtype)
    kappa = stochast_ratio
    x_hats, z_hats, outs = [], [], []
    x_cur = noise.to(state_dtype)
    kw = {} if y is None else {"y": y}
    n_iter = len(grid) - 1

    def model_call(x, t):
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float64 if noise.dtype == torch.float64
                        else torch.float32, device=x.device)
        return model(x.to(noise.dtype), tt, **kw)

    for i in range(n_iter):
        t_cur, t_next = grid[i], grid[i + 1]
        ai, gi, at, gt = tr.coefficients(t_cur)
        F = model_call(x_cur, t_cur).to(state_dtype)
        den = ai * gt - gi * at
        x_hat = (F * ai - x_cur * at) / den
        z_hat = (x_cur * gt - F * gi) / den
        outs.append(x_hat)
        if extrapol_ratio > 0:
            z_hats.append(z_hat)
            x_hats.append(x_hat)
            if i > 1:
                z_hat = z_hat + extrapol_ratio * (z_hat - z_hats[-2])
                x_hat = x_hat + extrapol_ratio * (x_hat - x_hats[-2])
                z_hats.pop(0), x_hats.pop(0)
        if isinstance(kappa, str):
            kappa = auto_stochast_ratio(tr, float(t_cur), float(t_next))
        ai1, gi1, _, _ = tr.coefficients(t_next)
        if draw_noise is None:
            eps = philox_noise(x_cur.numel(), seed, i).reshape(x_cur.shape).to(x_cur.device, state_dtype)
        else:
            eps = draw_noise(x_cur, i)
        x_next = gi1 * x_hat + ai1 * (z_hat * ((1 - kappa) ** 0.5) + eps * (kappa ** 0.5))
        if order == 2 and i < n_iter - 1:
            F_pri = model_call(x_next, t_next).to(state_dtype)
            ai1, gi1, at1, gt1 = tr.coefficients(t_next)
            z_pri = (x_next * gt1 - F_pri * gi1) / (ai1 * gt1 - gi1 * at1)
            x_next = x_cur * gi1 / gi + (ai1 - gi1 * ai / gi) * (0.5 * z_hat + 0.5 * z_pri)
        x_cur = x_next
    return (outs[-1], torch.stack(outs)) if return_trajectory else outs[-1]
