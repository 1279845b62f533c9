"""sampler_step / sampler_correct / sampler_noise: fused kernels vs the float64 eager reference,
Philox known answers, noise statistics, opcheck, torch.compile and bad input."""
import math
import zlib

import pytest
import torch

import ucgm_fast
from ucgm_fast.reference import sampler as reference
from conftest import DEVICES, rel_err

TRANSPORTS = ucgm_fast.TRANSPORTS
MODEL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.float64]
# Awkward element counts: a single element, odd sizes around the 4-element Philox quad and the
# CPU noise block (512), and a large odd one.
SHAPES = [(1,), (7,), (3, 5), (2, 129), (3, 11, 13), (1, 70001)]
# Random123 kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output (4 words).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def tensors(shape, state, model, device, gen, noncontig=False):
    """(F, x, x_prev, z_prev); F in the model dtype, possibly a strided view."""
    def r(dt):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dt)
    if noncontig:
        big = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=torch.float64).to(device, model)
        F = big[..., ::2]
        assert shape[-1] == 1 or not F.is_contiguous()
    else:
        F = r(model)
    return F, r(state), r(state), r(state)


def times(transport):
    # A (t, t') pair inside the grid, from the noise end towards the data end.
    return (0.83, 0.61) if reference.integrates_from_one(transport) else (0.17, 0.39)


# ---------------------------------------------------------------------------------------------
# Philox
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    assert tuple(ucgm_fast._kernels._C.philox4x32_10(*ctr, *key)) == expected
    words = reference.philox4x32_10([torch.tensor([c]) for c in ctr], key)
    assert tuple(int(w) for w in words) == expected


def test_stream_layout_matches_kat():
    # seed 0, step 0, quad 0 is the all-zero counter and key.
    w = ucgm_fast.sampler_noise(8, seed=0, step=0, raw=True).long() & 0xFFFFFFFF
    assert tuple(w[:4].tolist()) == PHILOX_KAT[0][2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 5, 2 ** 40 + 3, -1, 2 ** 64 - 2])
def test_noise_matches_reference_bitwise(device, seed):
    for n, step in ((1, 0), (7, 3), (1029, 1), (100003, 12)):
        noise = ucgm_fast.sampler_noise(n, seed=seed, step=step, device=device).cpu()
        ref = reference.philox_noise(n, seed if seed >= 0 else seed + 2 ** 64, step)
        assert torch.equal(noise.view(torch.int32), ref.view(torch.int32))
        raw = ucgm_fast.sampler_noise(n, seed=seed, step=step, device=device, raw=True).cpu().long() & 0xFFFFFFFF
        assert torch.equal(raw, reference.philox_noise(n, seed if seed >= 0 else seed + 2 ** 64, step, raw=True))


def test_box_muller_accuracy():
    """The libm-free transform agrees with float64 Box-Muller on the same words (a few float32 ulps)."""
    n = 1 << 16
    w = reference.philox_noise(n, 9, 4, raw=True).reshape(-1, 4)
    ours = ucgm_fast.sampler_noise(n, seed=9, step=4).double().reshape(-1, 4)
    for r, a, lanes in ((0, 1, (0, 1)), (2, 3, (2, 3))):
        u = ((w[:, r] >> 8) + 1).double() / 2 ** 24
        th = 2 * math.pi * (w[:, a] >> 8).double() / 2 ** 24
        rad = torch.sqrt(-2 * torch.log(u))
        assert (ours[:, lanes[0]] - rad * torch.cos(th)).abs().max() < 4e-6
        assert (ours[:, lanes[1]] - rad * torch.sin(th)).abs().max() < 4e-6


def test_noise_statistics():
    n = 1 << 20
    a = ucgm_fast.sampler_noise(n, seed=11, step=0).double()
    b = ucgm_fast.sampler_noise(n, seed=11, step=1).double()
    c = ucgm_fast.sampler_noise(n, seed=12, step=0).double()
    se = 1 / math.sqrt(n)
    for x in (a, b, c):
        assert abs(float(x.mean())) < 5 * se
        assert abs(float(x.var()) - 1) < 5 * math.sqrt(2) * se
        assert abs(float((x ** 3).mean())) < 5 * math.sqrt(15) * se          # skewness
        assert abs(float((x ** 4).mean()) - 3) < 5 * math.sqrt(96) * se      # kurtosis
        # Normal CDF at a few points (Kolmogorov-style, on a grid).
        for q, p in ((-1.0, 0.158655), (0.0, 0.5), (1.5, 0.933193)):
            assert abs(float((x < q).double().mean()) - p) < 5 * 0.5 * se
    # Independence: neighbours within a quad, across quads, across steps and seeds.
    for lag in (1, 2, 3, 4, 5):
        assert abs(float((a[lag:] * a[:-lag]).mean())) < 5 * se
    assert abs(float((a * b).mean())) < 5 * se and abs(float((a * c).mean())) < 5 * se
    assert abs(float((a[0::2] ** 2 * a[1::2] ** 2).mean()) - 1) < 5 * math.sqrt(8) * math.sqrt(2) * se
    assert not torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Fused step and correction vs the float64 reference
# ---------------------------------------------------------------------------------------------

def step_tolerance(state, model):
    # The kernels compute in float64; what is left is the rounding of the stored state. A 16/32-bit
    # model output is exact in float64, so with a float64 state the bound is float64's whatever the
    # model dtype (a float32 bound there let float32 arithmetic for float64 state pass).
    return 1e-12 if state == torch.float64 else 4e-7


# Every transport with the two common dtype pairs; every other (state, model) pair on two transports.
STEP_CASES = [(tr, st, md) for tr in TRANSPORTS for st, md in ((torch.float64, torch.float64),
                                                                (torch.float32, torch.bfloat16))]
STEP_CASES += [(tr, st, md) for tr in ("Linear", "EDM") for st in STATE_DTYPES for md in MODEL_DTYPES
               if (st, md) not in ((torch.float64, torch.float64), (torch.float32, torch.bfloat16))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transport,state,model", STEP_CASES)
def test_step_matches_reference(device, transport, state, model):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((transport, str(state), str(model))).encode()))
    t, t1 = times(transport)
    for shape in SHAPES:
        for noncontig in (False, True):
            for step, kappa, e in ((0, 0.0, 0.0), (1, 0.4, 0.5), (2, 0.0, 0.5), (5, 1.0, 0.3), (3, 0.25, 0.0)):
                if (noncontig or shape == SHAPES[-1]) and step not in (2, 5):
                    continue  # for runtime: strided views and the large size with two settings
                F, x, xp, zp = tensors(shape, state, model, device, gen, noncontig)
                bufs = dict(x_prev=xp.clone(), z_prev=zp.clone()) if e else {}
                out = ucgm_fast.sampler_step(F, x, t, t1, transport, step=step, stochast_ratio=kappa,
                                             extrapol_ratio=e, seed=77, return_hats=True, **bufs)
                rbufs = dict(x_prev=xp.double(), z_prev=zp.double()) if e else {}
                # The noise itself is checked bit for bit against the reference Philox above.
                noise = ucgm_fast.sampler_noise(shape, seed=77, step=step, device=device)
                ref = reference.sampler_step(F.double(), x.double(), t, t1, transport, step=step,
                                             stochast_ratio=kappa, extrapol_ratio=e, noise=noise,
                                             return_hats=True, **rbufs)
                for o in out:
                    assert o.dtype == state and o.shape == x.shape and o.device == x.device
                outs, refs = list(out), list(ref)
                if e:
                    outs += [bufs["x_prev"], bufs["z_prev"]]
                    refs += [rbufs["x_prev"], rbufs["z_prev"]]
                    assert torch.equal(bufs["x_prev"], out[1])  # the buffers hold the raw estimates
                # One comparison over all outputs (all O(1)): keeps this matrix fast.
                err = rel_err(torch.cat([o.flatten() for o in outs]), torch.cat([r.flatten() for r in refs]))
                assert err <= step_tolerance(state, model), (shape, step, kappa, e, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("state", STATE_DTYPES)
@pytest.mark.parametrize("model", [torch.float64, torch.bfloat16])
def test_correct_matches_reference(device, transport, state, model):
    gen = torch.Generator().manual_seed(3)
    t, t1 = times(transport)
    for shape in SHAPES[:-1]:
        for noncontig in (False, True):
            F, x, xn, zh = tensors(shape, state, model, device, gen, noncontig)
            out = ucgm_fast.sampler_correct(F, xn, x, zh, t, t1, transport)
            ref = reference.sampler_correct(F.double(), xn.double(), x.double(), zh.double(), t, t1, transport)
            assert out.dtype == state and out.shape == x.shape
            assert rel_err(out, ref) <= step_tolerance(state, model)


def test_step_formula_by_hand():
    """Linear at t=0.8 -> 0.6, straight from DESIGN.md, independent of the reference module."""
    x = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    F = torch.tensor([[1.1, 0.4, -0.7]], dtype=torch.float64)
    x_hat = x - 0.8 * F            # (F t - x) / (-1)
    z_hat = x + 0.2 * F            # (-x - F (1 - t)) / (-1)
    xp, zp = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    xe, ze = x_hat + 0.5 * (x_hat - xp), z_hat + 0.5 * (z_hat - zp)
    noise = ucgm_fast.sampler_noise((1, 3), seed=4, step=2).double()
    expect = 0.4 * xe + 0.6 * (math.sqrt(0.7) * ze + math.sqrt(0.3) * noise)
    bx, bz = xp.clone(), zp.clone()
    out, xh, zh = ucgm_fast.sampler_step(F, x, 0.8, 0.6, "Linear", step=2, stochast_ratio=0.3, extrapol_ratio=0.5,
                                         seed=4, x_prev=bx, z_prev=bz, return_hats=True)
    assert torch.allclose(out, expect, rtol=1e-12, atol=1e-12)
    assert torch.allclose(xh, x_hat) and torch.allclose(zh, ze)
    assert torch.allclose(bx, x_hat) and torch.allclose(bz, z_hat)
    # Steps 0 and 1 only record; no buffers, no extrapolation.
    bx, bz = xp.clone(), zp.clone()
    out = ucgm_fast.sampler_step(F, x, 0.8, 0.6, "Linear", step=1, extrapol_ratio=0.5, x_prev=bx, z_prev=bz)
    assert torch.allclose(out, 0.4 * x_hat + 0.6 * z_hat) and torch.allclose(bx, x_hat)
    # The Heun correction.
    z_pri = out + 0.4 * F
    corr = ucgm_fast.sampler_correct(F, out, x, z_hat, 0.8, 0.6, "Linear")
    assert torch.allclose(corr, x * 0.4 / 0.2 + (0.6 - 0.4 * 0.8 / 0.2) * (z_hat + z_pri) / 2)


def test_noise_only_with_positive_kappa():
    x = torch.randn(4, 9)
    F = torch.randn(4, 9)
    a = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "TrigFlow", step=3, stochast_ratio=0.0, seed=1)
    b = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "TrigFlow", step=3, stochast_ratio=0.0, seed=2)
    c = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "TrigFlow", step=3, stochast_ratio=0.5, seed=1)
    d = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "TrigFlow", step=3, stochast_ratio=0.5, seed=1)
    e = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "TrigFlow", step=4, stochast_ratio=0.5, seed=1)
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, c) and not torch.equal(c, e)


def test_tensor_scalars_and_custom_transport():
    x = torch.randn(3, 5, dtype=torch.float64)
    F = torch.randn(3, 5, dtype=torch.float64)
    a = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "Linear", step=1, stochast_ratio=0.3, seed=3)
    f64 = torch.float64
    b = ucgm_fast.sampler_step(F, x, torch.tensor(0.7, dtype=f64), torch.tensor([0.4], dtype=f64), "Linear", step=1,
                               stochast_ratio=torch.tensor(0.3, dtype=f64), seed=torch.tensor([3]))
    lin = ucgm_fast.Transport(alpha_in=lambda t: t, gamma_in=lambda t: 1 - t, alpha_to=lambda t: 1.0,
                              gamma_to=lambda t: -1.0)
    c = ucgm_fast.sampler_step(F, x, 0.7, 0.4, lin, step=1, stochast_ratio=0.3, seed=3)
    assert torch.equal(a, b) and torch.allclose(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_number_arguments_take_the_same_schedule_and_seed_as_tensors(device):
    # Plain numbers travel as one packed host buffer (one transfer), tensors one by one: the same
    # step, noise included, for seeds across the int64 range and past it (2^63.. wraps to negative).
    x = torch.randn(5, 7, dtype=torch.float64, device=device)
    F = torch.randn(5, 7, dtype=torch.float32, device=device)
    f64 = torch.float64
    for seed in (0, 3, -1, -2 ** 63, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 2):
        as_int = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "EDM", step=5, stochast_ratio=0.3, extrapol_ratio=0.0,
                                        seed=seed, return_hats=True)
        wrapped = seed - 2 ** 64 if seed >= 2 ** 63 else seed
        as_tensors = ucgm_fast.sampler_step(F, x, torch.tensor(0.7, dtype=f64), torch.tensor(0.4, dtype=f64), "EDM",
                                            step=5, stochast_ratio=torch.tensor(0.3, dtype=f64),
                                            seed=torch.tensor([wrapped]), return_hats=True)
        assert all(torch.equal(a, b) for a, b in zip(as_int, as_tensors)), seed
    # extrapol_ratio reaches its place too (with buffers: the step's last two rows)
    bufs = [torch.randn_like(x) for _ in range(2)]
    bufs += [b.clone() for b in bufs]
    a = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "EDM", step=5, extrapol_ratio=0.4, x_prev=bufs[0], z_prev=bufs[1])
    b = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "EDM", step=5, extrapol_ratio=torch.tensor(0.4, dtype=f64),
                               x_prev=bufs[2], z_prev=bufs[3])
    assert torch.equal(a, b)
    other = ucgm_fast.sampler_step(F, x, 0.7, 0.4, "EDM", step=5, stochast_ratio=0.3, seed=4)
    assert not torch.equal(other, ucgm_fast.sampler_step(F, x, 0.7, 0.4, "EDM", step=5, stochast_ratio=0.3, seed=3))
    # t, t' and kappa each reach their place in the row
    for kw in (dict(t=0.6), dict(t_next=0.5), dict(stochast_ratio=0.2)):
        args = dict(t=0.7, t_next=0.4, stochast_ratio=0.3) | kw
        a = ucgm_fast.sampler_step(F, x, args["t"], args["t_next"], "EDM", step=5,
                                   stochast_ratio=args["stochast_ratio"], seed=3)
        b = ucgm_fast.sampler_step(F, x, torch.tensor(args["t"], dtype=f64), torch.tensor(args["t_next"], dtype=f64),
                                   "EDM", step=5, stochast_ratio=torch.tensor(args["stochast_ratio"], dtype=f64),
                                   seed=3)
        assert torch.equal(a, b), kw


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_step_with_number_arguments_traces_with_make_fx(mode):
    # The packed schedule buffer is for plain eager calls: under a dispatch mode a real tensor made
    # from host memory would sit among fake ones.
    from torch.fx.experimental.proxy_tensor import make_fx

    F, x = torch.randn(5, 7), torch.randn(5, 7, dtype=torch.float64)

    def step(F, x):
        return ucgm_fast.sampler_step(F, x, 0.7, 0.4, "EDM", step=2, stochast_ratio=0.3, seed=3)

    assert torch.equal(make_fx(step, tracing_mode=mode)(F, x)(F, x), step(F, x))


def test_empty_state():
    x = torch.empty(0, 3)
    out = ucgm_fast.sampler_step(x, x, 0.5, 0.2, "EDM", stochast_ratio=0.5, return_hats=True)
    assert all(o.shape == (0, 3) for o in out)
    assert ucgm_fast.sampler_correct(x, x, x, x, 0.5, 0.2, "EDM").shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(8)
    F, x, xp, zp = tensors((3, 2, 5), torch.float32, torch.bfloat16, device, gen)
    sched = torch.tensor([0.7, 0.5, 0.3, 0.4], dtype=torch.float64, device=device)
    seed = torch.tensor([5], device=device)
    op = torch.ops.ucgm_fast.sampler_step
    torch.library.opcheck(op, (F, x, xp, zp, sched, seed, 3, 2, 2, True))
    torch.library.opcheck(op, (F, x, xp, zp, sched, seed, 0, 4, 1, False))
    e = x.new_empty((0,))
    torch.library.opcheck(op, (F.float(), x, e, e.clone(), sched, seed, 1, 0, 0, False))
    torch.library.opcheck(torch.ops.ucgm_fast.sampler_correct, (F, x, xp, zp, sched, 5))
    torch.library.opcheck(torch.ops.ucgm_fast.philox_noise, (seed, 3, 37, False))
    torch.library.opcheck(torch.ops.ucgm_fast.philox_noise, (seed, 3, 37, True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def two_steps(F, x, xp, zp):
        x1, xh, zh = ucgm_fast.sampler_step(F, x, 0.9, 0.6, "Linear", step=2, stochast_ratio=0.5,
                                            extrapol_ratio=0.5, seed=3, x_prev=xp, z_prev=zp, return_hats=True)
        return ucgm_fast.sampler_correct(F * 0.5, x1, x, zh, 0.9, 0.6, "Linear") + 0 * xh

    gen = torch.Generator().manual_seed(9)
    F, x, xp, zp = tensors((4, 3, 6), torch.float32, torch.float32, device, gen)
    bufs_c, bufs_e = (xp.clone(), zp.clone()), (xp.clone(), zp.clone())
    out_c = torch.compile(two_steps, fullgraph=True)(F, x, *bufs_c)
    out_e = two_steps(F, x, *bufs_e)
    assert torch.allclose(out_c, out_e, rtol=1e-6, atol=1e-6)
    assert torch.equal(bufs_c[0], bufs_e[0]) and torch.equal(bufs_c[1], bufs_e[1])  # mutation kept


# ---------------------------------------------------------------------------------------------
# CUDA vs CPU (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("state", STATE_DTYPES)
def test_cuda_step_matches_cpu(state):
    gen = torch.Generator().manual_seed(10)
    F, x, xp, zp = tensors((5, 1031), state, torch.bfloat16, "cpu", gen)
    outs = []
    for dev in ("cpu", "cuda"):
        b = dict(x_prev=xp.clone().to(dev), z_prev=zp.clone().to(dev))
        outs.append(ucgm_fast.sampler_step(F.to(dev), x.to(dev), 0.8, 0.5, "EDM", step=4, stochast_ratio=0.6,
                                           extrapol_ratio=0.4, seed=123, return_hats=True, **b))
    for a, b in zip(*outs):
        # float64 arithmetic on both sides; libm differences in the coefficients stay below 1e-15.
        assert rel_err(b, a) < (1e-13 if state == torch.float64 else 2e-7)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_input():
    x = torch.randn(2, 3)
    F = torch.randn(2, 3)
    with pytest.raises(TypeError, match="the sampler state must be float32 or float64"):
        ucgm_fast.sampler_step(F, x.half(), 0.5, 0.2, "Linear")
    with pytest.raises(ValueError, match="F has shape"):
        ucgm_fast.sampler_step(torch.randn(2, 4), x, 0.5, 0.2, "Linear")
    with pytest.raises(ValueError, match="stochast_ratio must be in"):
        ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Linear", stochast_ratio=1.5)
    with pytest.raises(ValueError, match="extrapol_ratio must be in"):
        ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Linear", extrapol_ratio=-0.1)
    with pytest.raises(ValueError, match="needs the buffers x_prev and z_prev"):
        ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Linear", extrapol_ratio=0.5)
    with pytest.raises(ValueError, match="z_prev must be a tensor shaped, typed and placed like x"):
        ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Linear", extrapol_ratio=0.5, x_prev=torch.zeros(2, 3),
                               z_prev=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="step must be an int in"):
        ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Linear", step=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Linear", seed=1.5)
    with pytest.raises(ValueError, match="unknown transport 'Nope'"):
        ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Nope")
    with pytest.raises(ValueError, match="z_hat must be a tensor shaped, typed and placed like x"):
        ucgm_fast.sampler_correct(F, x, x, x[:1], 0.5, 0.2, "Linear")
    # Buffers updated in place may not share memory with each other, x or F (results depended on
    # which kernel path ran: element-wise read-then-write is not the reference's read-all-first).
    buf, big = torch.zeros(2, 3), torch.zeros(12)
    for xp, zp, what in ((buf, buf, "each other"), (big[:6].view(2, 3), big[3:9].view(2, 3), "each other"),
                         (torch.zeros(2, 3), x, "x"), (F, torch.zeros(2, 3), "F")):
        with pytest.raises(ValueError, match=f"share memory with {what}"):
            ucgm_fast.sampler_step(F, x, 0.5, 0.2, "Linear", step=2, extrapol_ratio=0.5, x_prev=xp, z_prev=zp)
    halves = ucgm_fast.sampler_step(F.requires_grad_(), x, 0.5, 0.2, "Linear", step=2, extrapol_ratio=0.5,
                                    x_prev=big[:6].view(2, 3), z_prev=big[6:].view(2, 3))
    assert not halves.requires_grad  # not differentiable, and it says so


# After the error, dynamo compiles the frames below the failed one on their own, and so meets the
# kernel's pybind entry point, which it runs eagerly with this warning.
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_compiled_step_refuses_one_buffer_for_both_estimates():
    # Storage overlap is not traceable, but the same tensor passed twice is: refused under torch.compile too.
    x, F, buf = torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3)
    step = torch.compile(lambda F, x, a, b: ucgm_fast.sampler_step(F, x, 0.7, 0.4, "Linear", step=3,
                                                                   extrapol_ratio=0.1, x_prev=a, z_prev=b))
    with pytest.raises(ValueError, match="must not share memory with each other"):
        step(F, x, buf, buf)
    assert step(F, x, buf, torch.zeros(2, 3)).shape == x.shape


def test_step_refuses_torch_func_transforms():
    F, x = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    step = lambda F, x: ucgm_fast.sampler_step(F, x, 0.7, 0.4, "Linear", stochast_ratio=0.5)
    with pytest.raises(RuntimeError, match=r"sampler_step does not run under torch.func transforms.*noise"):
        torch.vmap(step)(F, x)
    with pytest.raises(RuntimeError, match=r"sampler_step does not run under torch.func transforms"):
        torch.func.grad(lambda x: step(F, x).sum())(x)
    # the batched call itself is what vmap would have meant
    assert step(F, x).shape == x.shape
