"""enhance_target / fd_inputs / fd_target / ucgm_loss: fused kernels vs the float64 eager reference."""
import zlib

import pytest
import torch

import ucgm_fast
from ucgm_fast import reference
from conftest import DTYPES, TOLERANCE, rel_err

TRANSPORTS = ucgm_fast.TRANSPORTS
# (B, feature shape): one sample, odd rows, a row that does not split into 4-element vectors,
# a large batch of small rows, a long odd row.
SHAPES = [(1, (1,)), (7, (1,)), (5, (3, 7)), (129, (2, 3)), (3, (1003,)), (4, (4, 3, 5))]

# fd_target divides f32 rounding by r_a - r_b (2 eps = 0.01 at lambda = 1): a looser floor for
# float32 than the elementwise ops (errors relative to the largest reference magnitude). Keyed by
# the OUTPUT dtype: 16-bit data is exact in float32 and the target is computed and returned in
# float32, so it gets the float32 bound (at these seeds max 4e-5 for 16-bit data, 3.3e-5 for float32
# data; the seeds matter: on other seeds single small rows reach 1e-4, mostly within check()'s
# 2x-the-peer rule; a result rounded through the 16-bit data dtype is off by 4e-4 to 4e-3).
FD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5}


def seed(*parts):
    """A generator seed from the test's parameters, stable across processes (unlike hash of str)."""
    return zlib.crc32(repr(parts).encode())


def randn(shape, dtype, device, gen, noncontig=False):
    if noncontig:  # a strided view of a buffer twice as wide in the last dimension
        big = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=torch.float64)
        out = big.to(device, dtype)[..., ::2]
        assert shape[-1] == 1 or not out.is_contiguous()
        return out
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def times(batch, device, gen):
    return (torch.rand(batch, generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(device)


def check(out, oracle, peer, bound, inputs=()):
    """Fused vs float64 oracle: within bound, or 2x the same-dtype reference's own error.

    Errors are relative to the largest of the oracle and the inputs (conftest.rel_err), so a row
    whose terms cancel is judged on the scale of the computation.
    """
    err = rel_err(out, oracle, *inputs)
    limit = max(bound, 2 * rel_err(peer, oracle, *inputs))
    assert err <= limit, f"error {err:.3g} > {limit:.3g}"


def dtype_pairs():
    """(data dtype, model dtype): equal, and float32 data with a 16-bit model (autocast)."""
    return [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]


def pair_id(p):
    return f"{str(p[0])[6:]}-{str(p[1])[6:]}"


# ---------------------------------------------------------------------------------------------
# enhance_target
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pair", dtype_pairs(), ids=pair_id)
def test_enhance_target_matches_reference(device, pair, transport):
    dd, dm = pair
    gen = torch.Generator().manual_seed(seed(transport, str(pair)))
    tol = max(TOLERANCE[dd], TOLERANCE[dm])
    for batch, feat in SHAPES:
        shape = (batch,) + feat
        for noncontig in (False, True):
            x, z = randn(shape, dd, device, gen, noncontig), randn(shape, dd, device, gen)
            F_w, F_wo = randn(shape, dm, device, gen, noncontig), randn(shape, dm, device, gen)
            t = times(batch, device, gen)
            for ndrop in sorted({0, 1, batch // 2, batch}):
                for wo in (F_wo, None):
                    for emit in (False, True):
                        args = dict(transport=transport, ratio=1.7, enhanced_range=(0.2, 0.7), num_dropped=ndrop,
                                    return_target=emit)
                        out = ucgm_fast.enhance_target(x, z, F_w, wo, t.float() if dd != torch.float64 else t,
                                                       **args)
                        oracle = reference.enhance_target(x.double(), z.double(), F_w.double(),
                                                          None if wo is None else wo.double(), t, **args)
                        peer = reference.enhance_target(x, z, F_w, wo, t.to(torch.float32 if dd != torch.float64
                                                                            else dd), **args)
                        if emit:
                            # The target comes back in float32 for 16-bit data too (inputs exact in
                            # float32): the float32 bound, not the data dtype's (measured <= 3.3e-7).
                            out, oracle, peer = (out,), (oracle,), (peer,)
                            want = torch.float64 if dd == torch.float64 else torch.float32
                        else:
                            want = dd
                        for o, r, p in zip(out, oracle, peer):
                            assert o.dtype == want and o.shape == shape and o.device == x.device
                            check(o, r, p, TOLERANCE[want] if emit else tol, (x, z))


def test_enhance_target_rules_by_hand():
    """The three-way rule from DESIGN.md, checked on rows picked by hand (Linear, t in/out of range)."""
    x, z = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    F_w, F_wo = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 0.5, 0.4], dtype=torch.float64)  # rows 0 in range, 1 out, 2 and 3 dropped
    x_tar, z_tar = ucgm_fast.enhance_target(x, z, F_w, F_wo, t, "Linear", 2.0, (0.25, 0.75), num_dropped=2)
    tt = t[:, None]
    x_t = tt * z + (1 - tt) * x
    # Linear: den = -1, x_hat = x_t - t F, z_hat = x_t + (1 - t) F
    xw, zw = x_t - tt * F_w, x_t + (1 - tt) * F_w
    xwo, zwo = x_t - tt * F_wo, x_t + (1 - tt) * F_wo
    for got, v, w, wo in ((x_tar, x, xw, xwo), (z_tar, z, zw, zwo)):
        assert torch.allclose(got[0], v[0] + 2.0 * (w[0] - wo[0]))
        assert torch.allclose(got[1], (v[1] + w[1]) / 2)
        assert torch.allclose(got[2:], (v[2:] + wo[2:]) / 2)
    # lambda > 0 form: the "without" prediction is the target itself, so dropped rows keep x.
    x_tar, _ = ucgm_fast.enhance_target(x, z, F_w, None, t, "Linear", 2.0, (0.25, 0.75), num_dropped=2)
    assert torch.allclose(x_tar[0], x[0] + 2.0 * (xw[0] - x[0])) and torch.allclose(x_tar[2:], x[2:])
    # The range is strict on both ends.
    t_edge = torch.tensor([0.25, 0.75, 0.5, 0.5], dtype=torch.float64)
    x_tar, _ = ucgm_fast.enhance_target(x, z, F_w, F_wo, t_edge, "Linear", 2.0, (0.25, 0.75))
    xw, xwo = (t_edge[:, None] * z + (1 - t_edge[:, None]) * x - t_edge[:, None] * F for F in (F_w, F_wo))
    assert torch.allclose(x_tar[:2], (x[:2] + xw[:2]) / 2)
    assert torch.allclose(x_tar[2:], x[2:] + 2.0 * (xw[2:] - xwo[2:]))


# ---------------------------------------------------------------------------------------------
# fd_inputs / fd_target
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_fd_inputs_matches_reference(device, lam, dtype, transport):
    gen = torch.Generator().manual_seed(seed(transport, str(dtype), lam))
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    for batch, feat in SHAPES:
        for noncontig in (False, True):
            shape = (batch,) + feat
            x, z = randn(shape, dtype, device, gen, noncontig), randn(shape, dtype, device, gen)
            t = times(batch, device, gen).to(ct)
            inputs, r = ucgm_fast.fd_inputs(x, z, t, transport, lam, 0.005)
            k = 2 if lam == 1.0 else 1
            assert inputs.shape == (k * batch,) + feat and inputs.dtype == dtype and r.shape == (k * batch,)
            ref_inputs, ref_r = reference.fd_inputs(x, z, t, transport, lam, 0.005)
            assert torch.equal(r, ref_r)  # the same float expressions in the compute dtype
            assert torch.equal(r[:batch], t + 0.005 if k == 2 else t - (t - lam * t))
            # Oracle at the kernel's own times: r_b = t - (t - lam t) rounds in the compute dtype.
            ai, gi, _, _ = reference.coefficients(r.double(), transport)
            col = (-1,) + (1,) * len(feat)
            xs, zs = x.double().repeat((k,) + (1,) * len(feat)), z.double().repeat((k,) + (1,) * len(feat))
            check(inputs, ai.reshape(col) * zs + gi.reshape(col) * xs, ref_inputs, TOLERANCE[dtype], (x, z))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pair", dtype_pairs(), ids=pair_id)
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_fd_target_matches_reference(device, lam, pair, transport):
    dd, dm = pair
    gen = torch.Generator().manual_seed(seed(transport, str(pair), lam))
    ct = torch.float64 if dd == torch.float64 else torch.float32
    for batch, feat in SHAPES:
        for noncontig in (False, True):
            shape = (batch,) + feat
            x, z = randn(shape, dd, device, gen, noncontig), randn(shape, dd, device, gen)
            F_t = randn(shape, dm, device, gen, noncontig)
            # F_a, F_b close to a smooth function of t so the tangent is O(1), some rows clamped
            F_a = (F_t.double() + 0.004 * randn(shape, torch.float64, device, gen)).to(dm)
            F_b = (F_t.double() - 0.004 * randn(shape, torch.float64, device, gen)).to(dm)
            t = times(batch, device, gen).to(ct)
            out = ucgm_fast.fd_target(F_t, F_a, F_b, x, z, t, transport, lam, 0.005)
            assert out.dtype == ct and out.shape == shape
            oracle = reference.fd_target(*(v.double() for v in (F_t, F_a, F_b, x, z, t)), transport, lam, 0.005)
            peer = reference.fd_target(F_t, F_a, F_b, x, z, t, transport, lam, 0.005)
            check(out, oracle, peer, FD_TOLERANCE[ct], (F_t,))


def test_fd_target_formula_by_hand():
    """Linear, lambda = 1: f(r) = x'_r - r F_r, target = F_t + (t * 4/sin(1.57 t)) clamp(df, -1, 1)."""
    gen = torch.Generator().manual_seed(0)
    x, z, F_t, F_a, F_b = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(5))
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    eps = 0.01
    out = ucgm_fast.fd_target(F_t, F_a, F_b, x, z, t, "Linear", 1.0, eps)
    tt = t[:, None]

    def f(r, F):
        return (r * z + (1 - r) * x) - r * F

    df = (f(tt + eps, F_a) - f(tt - eps, F_b)) / (2 * eps)
    assert torch.allclose(out, F_t + tt * 4 / torch.sin(1.57 * tt) * df.clamp(-1, 1))
    # NaN tangents stay NaN (torch.clamp semantics), they are not clamped to +-1.
    F_nan = F_a.clone()
    F_nan[0, 0] = float("nan")
    assert torch.isnan(ucgm_fast.fd_target(F_t, F_nan, F_b, x, z, t, "Linear", 1.0, eps)[0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lambda_just_below_one_is_not_the_central_difference(device, dtype):
    # 1 - 1e-9 rounds to 1 in float32: deciding "central" there ran two passes into the one pass
    # allocated (a heap overflow) and took the wrong difference. It is decided on the double.
    gen = torch.Generator().manual_seed(8)
    x, z, F_t, F_a, F_b = (randn((5, 3, 4), dtype, device, gen, False) for _ in range(5))
    t = times(5, device, gen)
    lam = 1 - 1e-9
    inputs, r = ucgm_fast.fd_inputs(x, z, t, "Linear", lam)
    want_inputs, want_r = reference.fd_inputs(x, z, t, "Linear", lam)
    assert inputs.shape == x.shape and r.shape == (5,) and torch.equal(r, want_r)
    tol = TOLERANCE[dtype]  # CUDA contracts multiply-adds: not bit-equal to the eager reference there
    assert rel_err(inputs, want_inputs) <= tol
    out = ucgm_fast.fd_target(F_t, F_a, F_b, x, z, t, "Linear", lam)
    assert rel_err(out, reference.fd_target(F_t, F_a, F_b, x, z, t, "Linear", lam)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# ucgm_loss
# ---------------------------------------------------------------------------------------------

LOSS_SHAPES = [(1, (3,)), (7, (4, 3, 5)), (5, (2, 33)), (3, (4, 16, 16)), (2, (3, 1200))]


def loss_pairs():
    """(F dtype, target dtype)."""
    return [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("pair", loss_pairs(), ids=pair_id)
@pytest.mark.parametrize("cosine", [False, True])
def test_ucgm_loss_matches_reference(device, pair, cosine):
    fd, td = pair
    gen = torch.Generator().manual_seed(seed(str(pair), cosine))
    ct = torch.float64 if td == torch.float64 else torch.float32
    for batch, feat in LOSS_SHAPES:  # every feature shape has a channel dimension (cosine needs one)
        shape = (batch,) + feat
        for noncontig in (False, True):
            for h, tw in ((0.0, False), (5.0, True), (0.3, False)):
                F = randn(shape, fd, device, gen, noncontig).requires_grad_()
                T = (F.detach().double() * 0.7 + 0.5 * randn(shape, torch.float64, device, gen)).to(td)
                T = T.requires_grad_()
                t = times(batch, device, gen).to(ct)
                loss = ucgm_fast.ucgm_loss(F, T, t, h, cosine, tw)
                assert loss.shape == () and loss.dtype == ct
                gF, gT = torch.autograd.grad(loss, (F, T))
                assert gF.dtype == fd and gT.dtype == td
                F64, T64 = F.detach().double().requires_grad_(), T.detach().double().requires_grad_()
                ref = reference.ucgm_loss(F64, T64, t.double(), h, cosine, tw)
                rF, rT = torch.autograd.grad(ref, (F64, T64))
                Fp, Tp = F.detach().requires_grad_(), T.detach().requires_grad_()
                peer = reference.ucgm_loss(Fp, Tp, t, h, cosine, tw)
                pF, pT = torch.autograd.grad(peer, (Fp, Tp))
                tol = 1e-10 if ct == torch.float64 else 2e-5
                check(loss.detach().reshape(1), ref.detach().reshape(1), peer.detach().reshape(1), tol)
                low = max(TOLERANCE[fd], TOLERANCE[td])
                check(gF, rF, pF, tol if fd not in (torch.float16, torch.bfloat16) else low)
                check(gT, rT, pT, tol if td not in (torch.float16, torch.bfloat16) else low)


@pytest.mark.parametrize("shape, cosine", [((4, 0), False), ((4, 3, 0), True), ((4, 0, 5), True), ((0, 3), False)])
def test_ucgm_loss_of_empty_rows_is_nan(device, shape, cosine):
    # A mean over no elements: NaN as in the reference; the kernels read one element per row
    # (a segfault before), so such calls take the reference.
    F = torch.randn(shape, device=device, requires_grad=True)
    loss = ucgm_fast.ucgm_loss(F, torch.randn(shape, device=device), 0.5, cosine=cosine)
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, F)
    assert g.shape == F.shape


def test_ucgm_loss_higher_order_and_transforms():
    # create_graph: the second derivative is autograd's of the reference loss (the fused backward is
    # not differentiable again); torch.func and forward mode take the reference.
    gen = torch.Generator().manual_seed(9)
    F = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    T = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda a: ucgm_fast.ucgm_loss(a, T, t, 0.1, True, True), (F,))
    F0 = F.detach()
    for transform in (torch.func.grad, lambda f: (lambda a: torch.func.jvp(f, (a,), (torch.ones_like(a),))[1])):
        got = transform(lambda a: ucgm_fast.ucgm_loss(a, T, t, 0.1, True))(F0)
        want = transform(lambda a: reference.ucgm_loss(a, T, t, 0.1, True))(F0)
        assert torch.allclose(got, want) and want.abs().max() > 0
    # 1-D data: one element per row, in the reference too (a mean over dim=[] averaged everything)
    a, b = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    assert float(ucgm_fast.ucgm_loss(a, b, 0.5)) == float(reference.ucgm_loss(a, b, 0.5)) == 1.0


def test_ucgm_loss_formula_by_hand():
    """Straight from DESIGN.md, independent of the reference module."""
    gen = torch.Generator().manual_seed(5)
    F, T = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64), torch.randn(2, 3, 4, generator=gen,
                                                                                  dtype=torch.float64)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    h = 2.0
    per = torch.sqrt(((F - T) ** 2).mean(dim=(1, 2)) + h * h) - h
    cos = (F * T).sum(1) / (F.norm(dim=1) * T.norm(dim=1))
    per = per + (1 - cos).mean(dim=1)
    want = (per * torch.cos(1.57 * t)).mean()
    assert torch.allclose(ucgm_fast.ucgm_loss(F, T, t, h, True, "cosine"), want)
    want = (torch.sqrt(((F - T) ** 2).mean(dim=(1, 2)))).mean()
    assert torch.allclose(ucgm_fast.ucgm_loss(F, T, t, 0.0, False, None), want)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("h", [0.0, 1.5])
def test_ucgm_loss_gradcheck(device, cosine, h):
    gen = torch.Generator().manual_seed(6)
    F = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    T = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = (torch.rand(3, generator=gen, dtype=torch.float64) * 0.9).to(device)
    assert torch.autograd.gradcheck(lambda a, b: ucgm_fast.ucgm_loss(a, b, t, h, cosine, True), (F, T))
    assert torch.autograd.gradcheck(lambda a: ucgm_fast.ucgm_loss(a, T.detach(), t, h, cosine, False), (F,))


# ---------------------------------------------------------------------------------------------
# torch.library contracts, torch.compile, bad input
# ---------------------------------------------------------------------------------------------

def test_opcheck(device):
    gen = torch.Generator().manual_seed(7)
    x, z, F1, F2, F3 = (torch.randn(4, 3, 2, 5, generator=gen).to(device) for _ in range(5))
    t = (torch.rand(4, generator=gen) * 0.8 + 0.1).to(device)
    ops = torch.ops.ucgm_fast
    for emit in (False, True):
        torch.library.opcheck(ops.enhance_target, (x, z, F1, F2, t, 1, 1.5, 0.1, 0.7, 2, emit))
        torch.library.opcheck(ops.enhance_target, (x[..., ::2], z[..., ::2], F1[..., ::2], None, t[:1].expand(4), 0, 2.0,
                                                   0.0, 0.75, 4, emit))
    torch.library.opcheck(ops.enhance_target, (x, z, F1.bfloat16(), F2.bfloat16(), t, 2, 0.5, 0.0, 0.75, 0, False))
    for lam in (1.0, 0.3):
        torch.library.opcheck(ops.fd_inputs, (x, z, t, lam, 0.005, 5))
        torch.library.opcheck(ops.fd_target, (F1, F2, F3, x, z, t, lam, 0.005, 3))
        torch.library.opcheck(ops.fd_target, (F1[..., ::2], F2[..., ::2], F3[..., ::2], x[..., ::2], z[..., ::2],
                                              t, lam, 0.005, 1))
    for cosine in (False, True):
        torch.library.opcheck(ops.ucgm_loss, (F1, x, t, 0.5, cosine, True))
        torch.library.opcheck(ops.ucgm_loss, (F1.clone().requires_grad_(), x.clone().requires_grad_(), t, 0.0,
                                              cosine, False))
        torch.library.opcheck(ops.ucgm_loss, (F1.bfloat16().requires_grad_(), x, t, 5.0, cosine, True))
        root = ops.ucgm_loss(F1, x, t, 0.5, cosine, True)[1]
        torch.library.opcheck(ops.ucgm_loss_backward, (torch.tensor(1.5, device=device), F1, x, t, root, cosine,
                                                       True, True))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(x, z, F, F_w, t):
        x_tar, z_tar = ucgm_fast.enhance_target(x, z, F_w, None, t, "TrigFlow", 1.5, (0.0, 0.75), 2)
        inputs, r = ucgm_fast.fd_inputs(x_tar, z_tar, t, "TrigFlow", 1.0)
        F2 = torch.tanh(inputs) * r[:, None, None]  # a stand-in model
        target = ucgm_fast.fd_target(F.detach(), F2[:8], F2[8:], x_tar, z_tar, t, "TrigFlow", 1.0)
        target0 = ucgm_fast.enhance_target(x, z, F.detach(), F_w, t, "TrigFlow", 0.5, (0.0, 0.75), 2,
                                           return_target=True)
        return ucgm_fast.ucgm_loss(F, target, t, 5.0, True, "cosine") + ucgm_fast.ucgm_loss(F, target0, t)

    gen = torch.Generator().manual_seed(8)
    x, z, F_w = (torch.randn(8, 4, 6, generator=gen).to(device) for _ in range(3))
    F = torch.randn(8, 4, 6, generator=gen).to(device).requires_grad_()
    t = (torch.rand(8, generator=gen) * 0.8 + 0.1).to(device)
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x, z, F, F_w, t)
    (g_c,) = torch.autograd.grad(loss_c, F)
    loss_e = step(x, z, F, F_w, t)
    (g_e,) = torch.autograd.grad(loss_e, F)
    assert torch.allclose(loss_c, loss_e, rtol=1e-6) and torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-8)


def test_custom_transport_uses_reference():
    lin = ucgm_fast.Transport(alpha_in=lambda t: t, gamma_in=lambda t: 1 - t,
                              alpha_to=lambda t: torch.ones_like(t), gamma_to=lambda t: -torch.ones_like(t))
    gen = torch.Generator().manual_seed(9)
    x, z, F1, F2, F3 = (torch.randn(4, 6, generator=gen) for _ in range(5))
    t = torch.rand(4, generator=gen) * 0.8 + 0.1
    for tr_args in ((F1, F2), (F1, None)):
        a = ucgm_fast.enhance_target(x, z, *tr_args, t, lin, 1.5, (0.1, 0.8), 1)
        b = ucgm_fast.enhance_target(x, z, *tr_args, t, "Linear", 1.5, (0.1, 0.8), 1)
        assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, b))
    assert torch.allclose(ucgm_fast.fd_target(F1, F2, F3, x, z, t, lin, 1.0),
                          ucgm_fast.fd_target(F1, F2, F3, x, z, t, "Linear", 1.0), atol=1e-4)


class TestBadInput:
    x = torch.randn(4, 3, 5)
    t = torch.rand(4)

    def test_enhance_target(self):
        x, t = self.x, self.t
        with pytest.raises(ValueError, match="F_w has shape"):
            ucgm_fast.enhance_target(x, x, x[:, :2], None, t, "Linear", 1.0)
        with pytest.raises(TypeError, match="F_w has dtype torch.float64"):
            ucgm_fast.enhance_target(x, x, x.double(), None, t, "Linear", 1.0)
        with pytest.raises(TypeError, match="F_wo has dtype"):
            ucgm_fast.enhance_target(x, x, x.bfloat16(), x.half(), t, "Linear", 1.0)
        with pytest.raises(ValueError, match="enhanced_range must be increasing"):
            ucgm_fast.enhance_target(x, x, x, None, t, "Linear", 1.0, (0.8, 0.2))
        with pytest.raises(ValueError, match="enhanced_range must be increasing"):
            ucgm_fast.enhance_target(x, x, x, None, t, "Linear", 1.0, (0.0, 1.5))
        with pytest.raises(ValueError, match="num_dropped must be an int in"):
            ucgm_fast.enhance_target(x, x, x, None, t, "Linear", 1.0, num_dropped=5)
        with pytest.raises(TypeError, match="ratio must be a finite number"):
            ucgm_fast.enhance_target(x, x, x, None, t, "Linear", float("nan"))
        with pytest.raises(ValueError, match="t has shape"):
            ucgm_fast.enhance_target(x, x, x, None, torch.rand(3), "Linear", 1.0)

    def test_fd(self):
        x, t = self.x, self.t
        with pytest.raises(ValueError, match="consistency_ratio must be in"):
            ucgm_fast.fd_target(x, x, x, x, x, t, "Linear", 0.0)
        with pytest.raises(ValueError, match="consistency_ratio must be in"):
            ucgm_fast.fd_inputs(x, x, t, "Linear", 1.5)
        with pytest.raises(ValueError, match="fd_eps must be > 0"):
            ucgm_fast.fd_target(x, x, x, x, x, t, "Linear", 1.0, 0.0)
        with pytest.raises(ValueError, match="F_b has shape"):
            ucgm_fast.fd_target(x, x, x[:2], x, x, t, "Linear", 1.0)
        with pytest.raises(TypeError, match="must share a dtype"):
            ucgm_fast.fd_target(x.half(), x.half(), x.bfloat16(), x, x, t, "Linear", 1.0)

    def test_loss(self):
        x, t = self.x, self.t
        with pytest.raises(ValueError, match="target has shape"):
            ucgm_fast.ucgm_loss(x, x[:, :2], t)
        with pytest.raises(TypeError, match="target has dtype torch.float64 but F has dtype torch.float32"):
            ucgm_fast.ucgm_loss(x, x.double(), t)
        with pytest.raises(ValueError, match="huber_eps must be >= 0"):
            ucgm_fast.ucgm_loss(x, x, t, -1.0)
        with pytest.raises(ValueError, match="time_weighting must be None, False, True or 'cosine'"):
            ucgm_fast.ucgm_loss(x, x, t, 0.0, False, "linear")
        with pytest.raises(ValueError, match="needs F with a channel dimension"):
            ucgm_fast.ucgm_loss(x[:, 0, 0], x[:, 0, 0], t, 0.0, True)
        with pytest.raises(TypeError, match="F has dtype torch.int64"):
            ucgm_fast.ucgm_loss(x.long(), x.long(), t)


def test_objective_op_outputs_are_constants():
    # Targets and finite-difference inputs feed no-grad passes and the loss as constants: with inputs
    # that require grad (t included) the outputs say so by not requiring grad, rather than claiming a
    # gradient that backward would then drop.
    x, z = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    t = torch.rand(3, requires_grad=True)
    outs = [*ucgm_fast.fd_inputs(x, z, t, "EDM", 1.0), *ucgm_fast.enhance_target(x, z, z, None, t, "EDM", 1.5),
            ucgm_fast.enhance_target(x, z, z, x, t, "EDM", 1.5, return_target=True),
            ucgm_fast.fd_target(z, z, x, x, z, t, "EDM", 0.5)]
    assert not any(o.requires_grad for o in outs)


@pytest.mark.parametrize("compiled_path", [False, True], ids=["eager", "op"])
def test_backward_through_times_and_targets_made_under_inference_mode(compiled_path):
    with torch.inference_mode():
        t, target = torch.rand(3), torch.randn(3, 4)
    w = torch.ones(1, requires_grad=True)
    x = torch.randn(3, 4)
    if compiled_path:  # through the dispatcher, as torch.compile'd code runs the ops
        losses = [torch.ops.ucgm_fast.ucgm_loss(x * w, target, t, 0.5, False, True)[0],
                  torch.ops.ucgm_fast.decode(x * w, x, t, ucgm_fast.TRANSPORTS.index("EDM"))[0].sum()]
    else:
        losses = [ucgm_fast.ucgm_loss(x * w, target, t, 0.5, time_weighting=True),
                  ucgm_fast.decode(x * w, x, t, "EDM")[0].sum()]
    for loss, ref in zip(losses, [reference.ucgm_loss(x * w, target, t, 0.5, time_weighting=True),
                                  reference.decode(x * w, x, t, "EDM")[0].sum()]):
        g, = torch.autograd.grad(loss, w)
        g_ref, = torch.autograd.grad(ref, w)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_numpy_scalars_are_numbers():
    import numpy as np
    x = torch.randn(4, 3)
    out = ucgm_fast.enhance_target(x, x, x, None, 0.5, "Linear", np.float32(1.5), num_dropped=np.int64(1))
    ref = ucgm_fast.enhance_target(x, x, x, None, 0.5, "Linear", 1.5, num_dropped=1)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert torch.equal(ucgm_fast.coefficients(np.float64(0.25), "EDM")[0], ucgm_fast.coefficients(0.25, "EDM")[0])
