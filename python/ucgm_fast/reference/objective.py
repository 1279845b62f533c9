"""Eager reference of the training objective (the published ``UCGMTS`` of LINs-lab/UCGM).

Two layers:

* the op references (``enhance_target``, ``fd_inputs``, ``fd_target``, ``ucgm_loss`` and the
  ``*_op`` forms the custom ops fall back to), written with per-row masks and ``torch.where``;
* :func:`training_loss`, the whole loss of one training step written step by step in the order of
  the published ``UCGMTS.training_step`` (boolean-mask updates, decode, enhance, finite
  difference, loss) -- the equivalence oracle of :meth:`ucgm_fast.UCGM.loss`. It differs from the
  published code only by design: round(p B) = 0 drops no label (the published code then drops all), the caller's x, z
  and labels are not modified in place (the in-place effect -- the finite-difference passes see
  the enhanced x, z -- is reproduced explicitly), and no CUDA RNG state is replayed (models must be
  deterministic).

Arithmetic runs in the compute dtype (float32, float64 for float64 data), so a float16/bfloat16
model's outputs are combined in float32 like the published code does under autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn

from .._validate import batch_times, compute_dtype
from ..transports import get_transport

__all__ = ["enhance_target", "fd_inputs", "fd_target", "ucgm_loss", "training_loss", "fd_times"]


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) times as (B, 1, ..., 1) broadcasting against like."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _coeffs(transport, t: torch.Tensor, like: torch.Tensor):
    return get_transport(transport).coefficients(_col(t, like))


def _decode(k, x_t, F):
    ai, gi, at, gt = k
    den = ai * gt - gi * at
    return (F * ai - x_t * at) / den, (x_t * gt - F * gi) / den


def fd_times(t: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """The finite-difference times: cat(t + eps, t - eps) for lambda = 1, t - (t - lambda t) otherwise."""
    if lam == 1.0:
        return torch.cat([t + eps, t - eps])
    return t - (t - lam * t)


# ---------------------------------------------------------------------------------------------
# Op references (the signatures of the torch.library ops)
# ---------------------------------------------------------------------------------------------

def enhance_target_op(x, z, F_w, F_wo, t, ndrop, ratio, lo, hi, transport, emit_target):
    """Reference of ``ucgm_fast::enhance_target``: per-row masks, no boolean indexing."""
    ct = compute_dtype(x.dtype)
    xc, zc, tc = x.to(ct), z.to(ct), t.to(ct)
    k = _coeffs(transport, tc, xc)
    x_t = k[0] * zc + k[1] * xc
    xw, zw = _decode(k, x_t, F_w.to(ct))
    xwo, zwo = (xc, zc) if F_wo is None else _decode(k, x_t, F_wo.to(ct))
    rows = torch.arange(x.shape[0], device=x.device)
    dropped = _col(rows >= x.shape[0] - ndrop, xc)
    in_range = _col((tc > lo) & (tc < hi), xc) & ~dropped

    def rule(v, w, wo):
        return torch.where(dropped, (v + wo) * 0.5, torch.where(in_range, v + ratio * (w - wo), (v + w) * 0.5))

    x_tar, z_tar = rule(xc, xw, xwo), rule(zc, zw, zwo)
    if emit_target:
        return k[2] * z_tar + k[3] * x_tar, x.new_empty((0,))
    return x_tar.to(x.dtype), z_tar.to(x.dtype)


def fd_inputs_op(x, z, t, lam, eps, transport):
    """Reference of ``ucgm_fast::fd_inputs``."""
    ct = compute_dtype(x.dtype)
    r = fd_times(t.to(ct), lam, eps)
    reps = 2 if lam == 1.0 else 1
    xs, zs = x.to(ct).repeat((reps,) + (1,) * (x.dim() - 1)), z.to(ct).repeat((reps,) + (1,) * (x.dim() - 1))
    ai, gi, _, _ = _coeffs(transport, r, xs)
    return (ai * zs + gi * xs).to(x.dtype), r


def _f(transport, r, F_r, x, z):
    """f(r) = (F_r alpha_in(r) - x'_r alpha_to(r)) / den(r), x'_r = alpha_in(r) z + gamma_in(r) x."""
    ai, gi, at, gt = _coeffs(transport, r, x)
    x_r = ai * z + gi * x
    return (F_r * ai - x_r * at) / (ai * gt - gi * at)


def fd_target_op(F_t, F_a, F_b, x, z, t, lam, eps, transport):
    """Reference of ``ucgm_fast::fd_target``."""
    ct = compute_dtype(x.dtype)
    F_t, F_a, F_b, x, z, t = (v.to(ct) for v in (F_t, F_a, F_b, x, z, t))
    if lam == 1.0:
        r_a, r_b, step = t + eps, t - eps, torch.full_like(t, 2 * eps)
    else:
        r_a, r_b, step = t, t - (t - lam * t), t - lam * t
    df = (_f(transport, r_a, F_a, x, z) - _f(transport, r_b, F_b, x, z)) / _col(step, x)
    ai, gi, at, gt = _coeffs(transport, t, x)
    weight = 4 / torch.sin(_col(t, x) * 1.57)
    return F_t - (ai / (ai * gt - gi * at) * weight) * torch.clamp(df, -1, 1)


def _row_mean(v):
    # mean over all but the batch dimension; (B,) data has one element per row (dim=[] would mean all)
    return (v.flatten(1) if v.dim() > 1 else v.unsqueeze(1)).mean(dim=1)


def _per_sample_loss(F, target, huber_eps, cosine):
    loss = torch.sqrt(_row_mean((F - target) ** 2) + huber_eps ** 2) - huber_eps
    if cosine:
        cos = 1 - Fn.cosine_similarity(F, target, dim=1)
        loss = loss + _row_mean(cos)
    return loss


def ucgm_loss_op(F, target, t, huber_eps, cosine, time_weighting):
    """Reference of ``ucgm_fast::ucgm_loss``: (loss, per-row sqrt(mean + h^2))."""
    ct = compute_dtype(target.dtype)
    Fc, Tc, tc = F.to(ct), target.to(ct), t.to(ct)
    loss = _per_sample_loss(Fc, Tc, huber_eps, cosine)
    if time_weighting:
        loss = loss * torch.cos(tc * 1.57)
    root = torch.sqrt(_row_mean((Fc - Tc).detach() ** 2) + huber_eps ** 2)
    return loss.mean(), root


def ucgm_loss_backward_op(grad, F, target, t, root, cosine, time_weighting, target_grad):
    """Reference of ``ucgm_fast::ucgm_loss_backward``: the analytic gradients of the loss.

    d/dF = g w_b / B ((F - T) / (n root_b) - (a T - b F) / P) with the cosine term's
    d cos/dF = a T - b F, a = 1 / (|F| |T|), b = cos / |F|^2 (P positions, n elements per row).
    """
    ct = compute_dtype(target.dtype)
    Fc, Tc, tc = F.to(ct), target.to(ct), t.to(ct)
    B, n = F.shape[0], (F[0].numel() if F.shape[0] else 1)
    w = torch.cos(tc * 1.57) if time_weighting else torch.ones_like(tc)
    g = grad.to(ct) * w / B
    gF = _col(g / (n * root.to(ct)), Fc) * (Fc - Tc)
    gT = -gF
    if cosine:
        positions = max(math.prod(F.shape[2:]), 1)
        dot, ff, tt = ((u * v).sum(1, keepdim=True) for u, v in ((Fc, Tc), (Fc, Fc), (Tc, Tc)))
        nf0, nt0 = ff.sqrt(), tt.sqrt()
        a = 1 / (nf0.clamp_min(1e-8) * nt0.clamp_min(1e-8))
        cosv = dot * a
        b = torch.where(nf0 > 1e-8, cosv / ff, torch.zeros_like(ff))
        c = torch.where(nt0 > 1e-8, cosv / tt, torch.zeros_like(tt))
        kc = _col(g / positions, Fc)
        gF = gF - kc * (a * Tc - b * Fc)
        gT = gT - kc * (a * Fc - c * Tc)
    return gF.to(F.dtype), (gT.to(target.dtype) if target_grad else target.new_empty((0,)))


# ---------------------------------------------------------------------------------------------
# Public-signature references (same arguments as ucgm_fast.enhance_target / fd_target / ...)
# ---------------------------------------------------------------------------------------------

def _times_like(t, x):
    return batch_times("reference", t, x)


def enhance_target(x, z, F_w, F_wo, t, transport, ratio, enhanced_range=(0.0, 0.75), num_dropped=0,
                   return_target=False):
    """Reference of :func:`ucgm_fast.enhance_target`."""
    lo, hi = enhanced_range
    out = enhance_target_op(x, z, F_w, F_wo, _times_like(t, x), num_dropped, float(ratio), float(lo), float(hi),
                            transport, bool(return_target))
    return out[0] if return_target else out


def fd_inputs(x, z, t, transport, consistency_ratio, fd_eps=0.005):
    """Reference of :func:`ucgm_fast.fd_inputs`."""
    return fd_inputs_op(x, z, _times_like(t, x), float(consistency_ratio), float(fd_eps), transport)


def fd_target(F_t, F_a, F_b, x, z, t, transport, consistency_ratio, fd_eps=0.005):
    """Reference of :func:`ucgm_fast.fd_target`."""
    return fd_target_op(F_t, F_a, F_b, x, z, _times_like(t, x), float(consistency_ratio), float(fd_eps), transport)


def ucgm_loss(F, target, t, huber_eps=0.0, cosine=False, time_weighting=False):
    """Reference of :func:`ucgm_fast.ucgm_loss`."""
    tw = time_weighting is True or (isinstance(time_weighting, str) and time_weighting.lower() == "cosine")
    return ucgm_loss_op(F, target, _times_like(t, target), float(huber_eps), bool(cosine), tw)[0]


# ---------------------------------------------------------------------------------------------
# The whole training loss, in the published order
# ---------------------------------------------------------------------------------------------

def training_loss(model, x, y, t, z, *, transport="Linear", consistency_ratio=0.0, enhanced_ratio=0.0,
                  enhanced_range=(0.0, 0.75), label_drop_ratio=0.1, huber_eps=0.0, cosine_loss=False,
                  time_weighting=None, fd_eps=0.005, target_model=None, null_class=None):
    """Loss of one UCGM training step for fixed t (B,) and noise z, following the published step.

    ``target_model`` is the network of the enhanced target (EMA / frozen copy / online model,
    resolved by the caller); ``null_class`` defaults to ``model.num_classes``. The enhancement
    ratio is remapped (e >= 1 -> (e - 1)/e) at lambda = 0 here, as published. With 16-bit data the
    arithmetic is float32 and the model's inputs and the enhanced (x, z) are rounded to the data's
    dtype, as :meth:`ucgm_fast.UCGM.loss` makes them (the published step has no 16-bit path).
    """
    tr = get_transport(transport)
    lam, e = float(consistency_ratio), float(enhanced_ratio)
    if e >= 1.0 and lam == 0.0:
        e = (e - 1.0) / e
    lo, hi = enhanced_range
    B = x.shape[0]
    null = model.num_classes if null_class is None else null_class
    ndrop = round(label_drop_ratio * B)  # Python round, as published; 0 drops nothing (published drops all)
    keep = B - ndrop
    c = y.clone()
    c[keep:] = null
    x, z = x.clone(), z.clone()  # the published code updates the caller's x, z in place
    ct = compute_dtype(x.dtype)
    tb = t.to(ct).reshape((B,) + (1,) * (x.dim() - 1))
    ai, gi, at, gt = tr.coefficients(tb)

    def forward(net, x_in, r, labels):
        k = tr.coefficients(r)
        den = k[0] * k[3] - k[1] * k[2]
        F_r = net(x_in, r.flatten(), labels)
        z_hat = (x_in * k[3] - F_r * k[1]) / den
        x_hat = (F_r * k[0] - x_in * k[2]) / den
        return x_hat, z_hat, F_r, den

    def enhance(tar, idx, pred_w, pred_wo):
        # Boolean-mask updates, in the published order (rows [:keep] first, then the dropped ones),
        # in the predictions' (promoted) dtype; the result is rounded to the data's dtype once,
        # as enhance_target rounds its outputs (16-bit data would otherwise mix dtypes in index_put).
        ct = torch.promote_types(pred_w.dtype, pred_wo.dtype)  # a target network may run in another dtype
        out = tar.to(ct, copy=True)
        pred_w, pred_wo = pred_w.to(ct), pred_wo.to(ct, copy=True)
        head, idx = out[:keep], idx[:keep]
        head[idx] = head[idx] + e * (pred_w[:keep][idx] - pred_wo[:keep][idx])
        head[~idx] = (head[~idx] + pred_w[:keep][~idx]) * 0.5
        out[keep:] = (out[keep:] + pred_wo[keep:]) * 0.5
        return out.to(tar.dtype)

    x_t = (z * ai + x * gi).to(x.dtype)  # the model sees data-dtype inputs, as interpolate returns
    x_wc, z_wc, F_t, den_t = forward(model, x_t, tb, c)
    x_tar, z_tar = x, z
    target = z * at + x * gt
    if lam != 0.0 or e != 0.0:
        with torch.no_grad():
            idx = (tb.flatten() < hi) & (tb.flatten() > lo)
            if e != 0.0 and lam == 0.0:
                x_woc, z_woc, _, _ = forward(target_model, x_t, tb, torch.full_like(c, null))
                x_tar = enhance(x_tar, idx, x_wc.detach(), x_woc)
                z_tar = enhance(z_tar, idx, z_wc.detach(), z_woc)
                target = z_tar * at + x_tar * gt
            if e != 0.0 and lam != 0.0:
                x_mwc, z_mwc, _, _ = forward(target_model, x_t, tb, c)
                x_tar = enhance(x_tar, idx, x_mwc, x_tar)
                z_tar = enhance(z_tar, idx, z_mwc, z_tar)
            if lam != 0.0:
                def yfunc(r):
                    x_r = (tr.coefficients(r)[0] * z_tar + tr.coefficients(r)[1] * x_tar).to(x.dtype)  # enhanced x, z
                    _, _, F_r, d_r = forward(model, x_r, r, c)
                    return (F_r * tr.coefficients(r)[0] - x_r * tr.coefficients(r)[2]) / d_r

                if lam == 1.0:
                    df = (yfunc(tb + fd_eps) - yfunc(tb - fd_eps)) / (2 * fd_eps)
                else:
                    step = tb - lam * tb
                    x_t2 = z_tar * ai + x_tar * gi
                    f_t = (F_t.detach() * ai - x_t2 * at) / den_t  # F_t at the original x_t, as published
                    df = (f_t - yfunc(tb - step)) / step
                df = torch.clamp(df, min=-1, max=1)
                weight = 4 / torch.sin(tb * 1.57)
                target = F_t.detach() - (ai / den_t * weight) * df
    loss = _per_sample_loss(F_t, target.detach(), huber_eps, cosine_loss)
    tw = time_weighting is True or (isinstance(time_weighting, str) and time_weighting.lower() == "cosine")
    if tw:
        loss = loss * torch.cos(tb * 1.57).flatten()
    return loss.mean()
