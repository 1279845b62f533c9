"""Optional peers of the order-1 sampler step: a Numba ``parallel=True`` CPU kernel and a CuPy
ElementwiseKernel on CUDA, each one pass over memory like the fused kernel.

x_hat = (F alpha_in - x alpha_to) / den,  z_hat = (x gamma_to - F gamma_in) / den,
x_next = gamma_in(t') x_hat + alpha_in(t') (sqrt(1 - kappa) z_hat + sqrt(kappa) noise)

They take the noise as a tensor (they have no Philox of their own) and the coefficients as
scalars, evaluated once per (transport, t) on the host. ``peers_for(device)`` returns those whose
package imports here; nothing is returned (and nothing imported) otherwise.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

import ucgm_fast


@lru_cache(maxsize=None)
def _scalars(transport: str, t: float, t_next: float) -> tuple:
    ai, gi, at, gt = (float(c) for c in ucgm_fast.reference.coefficients(torch.tensor(t, dtype=torch.float64), transport))
    ai1, gi1, _, _ = (float(c) for c in ucgm_fast.reference.coefficients(torch.tensor(t_next, dtype=torch.float64),
                                                                         transport))
    return ai, gi, at, gt, ai1, gi1


def _numba_peer():
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(parallel=True, fastmath=False, cache=False)
    def step_kernel(F, x, noise, out, ai, gi, at, gt, ai1, gi1, ka, kb):  # pragma: no cover (JIT-compiled)
        inv_den = 1.0 / (ai * gt - gi * at)
        for i in numba.prange(x.size):
            x_hat = (F[i] * ai - x[i] * at) * inv_den
            z_hat = (x[i] * gt - F[i] * gi) * inv_den
            out[i] = gi1 * x_hat + ai1 * (ka * z_hat + kb * noise[i])

    def numba_step(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise):
        if e != 0 or x.device.type != "cpu":
            raise ValueError("the Numba peer covers the order-1 CPU step without extrapolation")
        ai, gi, at, gt, ai1, gi1 = _scalars(transport, float(t), float(t_next))
        out = torch.empty_like(x)
        step_kernel(F.reshape(-1).numpy(), x.reshape(-1).numpy(), noise.reshape(-1).numpy(), out.view(-1).numpy(),
                    ai, gi, at, gt, ai1, gi1, math.sqrt(1 - kappa), math.sqrt(kappa))
        return out

    return numba_step


def _cupy_peer():
    try:
        import cupy
    except ImportError:
        return None
    kernel = cupy.ElementwiseKernel(
        "T F, T x, N noise, float64 ai, float64 gi, float64 at, float64 gt, float64 ai1, float64 gi1, "
        "float64 ka, float64 kb", "T out",
        "const T inv_den = (T)(1.0 / (ai * gt - gi * at));"
        "const T x_hat = (F * (T)ai - x * (T)at) * inv_den;"
        "const T z_hat = (x * (T)gt - F * (T)gi) * inv_den;"
        "out = (T)gi1 * x_hat + (T)ai1 * ((T)ka * z_hat + (T)kb * (T)noise);",
        "ucgm_bench_sampler_step")

    def cupy_step(F, x, t, t_next, transport, step, kappa, e, x_prev, z_prev, noise):
        if e != 0 or not x.is_cuda:
            raise ValueError("the CuPy peer covers the order-1 CUDA step without extrapolation")
        ai, gi, at, gt, ai1, gi1 = _scalars(transport, float(t), float(t_next))
        out = torch.empty_like(x)
        # On torch's current stream, so CUDA events around the call time the kernel.
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            kernel(cupy.from_dlpack(F.detach()), cupy.from_dlpack(x.detach()), cupy.from_dlpack(noise),
                   ai, gi, at, gt, ai1, gi1, math.sqrt(1 - kappa), math.sqrt(kappa), cupy.from_dlpack(out))
        return out

    return cupy_step


@lru_cache(maxsize=None)
def peers_for(device_type: str) -> dict:
    """{name: fn} of the peers available for ``device_type`` ("cpu" or "cuda")."""
    make = {"cpu": ("numba", _numba_peer), "cuda": ("cupy", _cupy_peer)}.get(device_type)
    if make is None:
        return {}
    fn = make[1]()
    return {} if fn is None else {make[0]: fn}
