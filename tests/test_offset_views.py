"""Contiguous views that start one element into their storage: every op must give what it gives on
a fresh copy of the same values.

Such views reach the kernels as they are (no copy), with pointers that are not 16-byte aligned, so
the CUDA kernels must take their element-by-element path instead of their vector loads (and the CPU
kernels their unaligned loops). Elementwise ops must match bit for bit; the loss, whose sums may be
ordered differently, to float rounding.
"""
import pytest
import torch

import ucgm_fast
from conftest import DEVICES, assert_same_bits, rel_err

SHAPE = (6, 4, 8, 8)  # rows divide into 4-element vectors: only the alignment sends a kernel off the vector path


def offset(values: torch.Tensor) -> torch.Tensor:
    """The same values as a contiguous view starting one element into a larger buffer."""
    buf = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
    view = buf[1:].view(values.shape)
    view.copy_(values)
    assert view.is_contiguous() and view.storage_offset() == 1
    return view


def rand(dtype, device, gen, shape=SHAPE):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def same(a, b):
    assert_same_bits([a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_transport_and_objective_ops(device, dtype):
    gen = torch.Generator().manual_seed(5)
    x, z, F, G, H = (rand(dtype, device, gen) for _ in range(5))
    t = torch.rand(SHAPE[0], generator=gen, dtype=torch.float64).to(device) * 0.9 + 0.05
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    t = t.to(ct)
    for tr in ("Linear", "EDM"):
        same(ucgm_fast.coefficients(offset(t), tr), ucgm_fast.coefficients(t.clone(), tr))
        same(ucgm_fast.interpolate(offset(x), offset(z), t, tr), ucgm_fast.interpolate(x, z, t, tr))
        same(ucgm_fast.decode(offset(x), offset(F), t, tr), ucgm_fast.decode(x, F, t, tr))
        same(ucgm_fast.enhance_target(offset(x), offset(z), offset(F), offset(G), t, tr, 0.5, num_dropped=2),
             ucgm_fast.enhance_target(x, z, F, G, t, tr, 0.5, num_dropped=2))
        same(ucgm_fast.fd_inputs(offset(x), offset(z), t, tr, 1.0), ucgm_fast.fd_inputs(x, z, t, tr, 1.0))
        same(ucgm_fast.fd_target(offset(F), offset(G), offset(H), offset(x), offset(z), t, tr, 1.0),
             ucgm_fast.fd_target(F, G, H, x, z, t, tr, 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cosine", [False, True])
def test_loss_forward_backward(device, cosine):
    gen = torch.Generator().manual_seed(6)
    F, T = rand(torch.float32, device, gen), rand(torch.float32, device, gen)
    t = torch.rand(SHAPE[0], generator=gen).to(device)
    results = []
    for make in (offset, torch.Tensor.clone):
        Fv, Tv = make(F).requires_grad_(True), make(T).requires_grad_(True)
        loss = ucgm_fast.ucgm_loss(Fv, Tv, t, huber_eps=0.5, cosine=cosine, time_weighting=True)
        loss.backward()
        results.append((loss.detach(), Fv.grad, Tv.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state", [torch.float32, torch.float64])
def test_sampler_ops(device, state):
    gen = torch.Generator().manual_seed(7)
    F, x = rand(torch.bfloat16, device, gen), rand(state, device, gen)
    xp, zp = rand(state, device, gen), rand(state, device, gen)
    kw = dict(step=3, stochast_ratio=0.4, extrapol_ratio=0.5, seed=11, return_hats=True)
    bufs_view, bufs_copy = (offset(xp), offset(zp)), (xp.clone(), zp.clone())
    out_view = ucgm_fast.sampler_step(offset(F), offset(x), 0.7, 0.4, "Linear", x_prev=bufs_view[0],
                                      z_prev=bufs_view[1], **kw)
    out_copy = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "Linear", x_prev=bufs_copy[0], z_prev=bufs_copy[1], **kw)
    same(out_view, out_copy)
    same(bufs_view, bufs_copy)  # the extrapolation buffers, updated in place
    x_next, _, z_hat = out_copy
    same(ucgm_fast.sampler_correct(offset(F), offset(x_next), offset(x), offset(z_hat), 0.7, 0.4, "Linear"),
         ucgm_fast.sampler_correct(F, x_next, x, z_hat, 0.7, 0.4, "Linear"))
