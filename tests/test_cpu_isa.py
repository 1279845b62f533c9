"""The CPU kernels' instruction-set builds (csrc/cpu/isa.h) compute the same numbers.

The rest of the suite runs whichever build this CPU selects (AVX2 where it can); here every op
runs under each build on the same inputs and the results are compared bit for bit (the loss's
per-row sums, whose order follows the vector width, to the last few bits).
"""
import pytest
import torch

import ucgm_fast
from ucgm_fast import _C
from conftest import assert_same_bits, cpu_setting

ISAS = ucgm_fast.build_info()["cpu_isas"]
pytestmark = pytest.mark.skipif(len(ISAS) < 2, reason="only one CPU instruction-set build here")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def cpu_isa(name):
    return cpu_setting(_C.set_cpu_isa, name)


def under_each_isa(fn):
    """fn() evaluated under every build; the outputs as a list per build."""
    outs = []
    for isa in ISAS:
        with cpu_isa(isa):
            out = fn()
        outs.append([o.detach().clone() for o in (out if isinstance(out, (tuple, list)) else (out,))])
    return outs


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def times(b, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, generator=g, dtype=torch.float64) * 0.96 + 0.02


def test_set_cpu_isa_selects_and_rejects():
    for isa in ISAS:
        with cpu_isa(isa):
            assert ucgm_fast.build_info()["cpu_isa"] == isa
    with pytest.raises(ValueError, match="not built or not supported"):
        _C.set_cpu_isa("avx512")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transport", ucgm_fast.TRANSPORTS)
def test_transport_ops(transport, dtype):
    # 3 x 5 x 67: rows split inside vectors, a tail every row; 40000 elements use both threads.
    for shape in ((3, 5, 67), (8, 5000)):
        x, z = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
        t = times(shape[0], 3)
        assert_same_bits(under_each_isa(lambda: ucgm_fast.interpolate(x, z, t, transport)))
        assert_same_bits(under_each_isa(lambda: ucgm_fast.decode(x, z, t, transport)))
    tt = times(1001, 4).to(dtype)
    assert_same_bits(under_each_isa(lambda: ucgm_fast.coefficients(tt, transport)))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("model_dtype", (None, torch.bfloat16, torch.float16))
def test_objective_ops(dtype, model_dtype):
    if model_dtype is not None and dtype == torch.float64:
        pytest.skip("16-bit model outputs go with float32 data")
    mdt = model_dtype or dtype
    B, shape = 9, (9, 3, 7, 11)
    x, z = randn(*shape, dtype=dtype, seed=5), randn(*shape, dtype=dtype, seed=6)
    F_w, F_wo, F_t = (randn(*shape, dtype=mdt, seed=s) for s in (7, 8, 9))
    t = times(B, 10).to(dtype)
    for ratio, dropped in ((0.5, 0), (2.0, 3)):
        assert_same_bits(under_each_isa(lambda: ucgm_fast.enhance_target(
            x, z, F_w, F_wo, t, "Linear", ratio, (0.1, 0.7), num_dropped=dropped, return_target=True)))
    for lam in (1.0, 0.5):
        assert_same_bits(under_each_isa(lambda: ucgm_fast.fd_inputs(x, z, t, "TrigFlow", lam)))
        assert_same_bits(under_each_isa(lambda: ucgm_fast.fd_target(F_t, F_w, F_wo, x, z, t, "TrigFlow", lam)))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("cosine", (False, True))
def test_loss_forward_backward(dtype, cosine):
    F = randn(6, 4, 9, 13, dtype=dtype, seed=11).requires_grad_()
    target = randn(6, 4, 9, 13, dtype=dtype, seed=12)
    t = times(6, 13).to(dtype)

    def run():
        F.grad = None
        loss = ucgm_fast.ucgm_loss(F, target, t, huber_eps=0.05, cosine=cosine, time_weighting=True)
        loss.backward()
        return loss, F.grad

    outs = under_each_isa(run)
    tol = 1e-6 if dtype == torch.float32 else 1e-13  # relative to the largest value
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * a.abs().max().item())


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_sampler_ops(dtype):
    x = randn(4, 3, 37, dtype=dtype, seed=14)
    F = randn(4, 3, 37, dtype=torch.bfloat16, seed=15)
    prev = [randn(4, 3, 37, dtype=dtype, seed=s) for s in (16, 17)]

    def step():
        xp, zp = (p.clone() for p in prev)
        out = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "Linear", step=3, stochast_ratio=0.3, extrapol_ratio=0.5,
                                     seed=123, x_prev=xp, z_prev=zp, return_hats=True)
        return (*out, xp, zp)

    outs = under_each_isa(step)
    assert_same_bits(outs)
    x_next, _, z_hat = outs[0][:3]
    assert_same_bits(under_each_isa(lambda: ucgm_fast.sampler_correct(F, x_next, x, z_hat, 0.7, 0.4, "Linear")))
    assert_same_bits(under_each_isa(lambda: ucgm_fast.sampler_noise((5, 1001), seed=7, step=2)))
