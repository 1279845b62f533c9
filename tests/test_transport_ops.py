"""coefficients / interpolate / decode: fused kernels vs the float64 eager reference."""
import itertools
import zlib

import pytest
import torch

import ucgm_fast
from ucgm_fast import _C, reference
from conftest import DTYPES, assert_close_to_oracle, cpu_setting, rel_err, set_num_threads

TRANSPORTS = ucgm_fast.TRANSPORTS
# (B, feature shape): awkward sizes, a single sample, a large odd row.
SHAPES = [(1, (1,)), (7, (1,)), (3, (7,)), (129, (2, 3)), (2, (129,)), (3, (1000003,))]
T_FORMS = ["float", "0d", "B", "B111", "f64", "expanded"]


def make_t(form, batch, device, gen, ndim=2):
    t = torch.rand(batch, generator=gen, dtype=torch.float64).clamp(0.02, 0.98).to(device)
    if form == "float":
        return 0.37
    if form == "0d":
        return t[0].float()
    if form == "B":
        return t.float()
    if form == "B111":
        return t.float().reshape((batch,) + (1,) * (ndim - 1))
    if form == "f64":
        return t
    return t[:1].float().expand(batch)


def data(batch, feat, dtype, device, gen, noncontig=False):
    """Random (x, z) of shape (batch, *feat); noncontig gives strided views of larger buffers."""
    shape = (batch,) + feat
    if noncontig:
        big = torch.randn((batch,) + feat[:-1] + (2 * feat[-1],), generator=gen, dtype=torch.float64)
        x = big.to(device, dtype)[..., ::2]
        z = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(device, dtype).permute(
            *reversed(range(len(shape))))
        assert feat[-1] == 1 or not (x.is_contiguous() or z.is_contiguous())
        return x, z
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    z = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return x, z


def as64(t):
    return t.double() if isinstance(t, torch.Tensor) else t


def per_sample_times(t, batch, device):
    """t in every accepted form as a float64 (B,) vector, written out here: the oracle must not share
    the ops' own normalisation of t (a bug there would reach both)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=device).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def check_op(op, a, b, t, transport, dtype):
    out = getattr(ucgm_fast, op)(a, b, t, transport)
    t64 = per_sample_times(t, a.shape[0], a.device)
    oracle = getattr(reference, op)(a.double(), b.double(), t64, transport)
    peer = getattr(reference, op)(a, b, t, transport)
    for o in out:
        assert o.shape == a.shape and o.device == a.device
    assert_close_to_oracle(out, oracle, peer, dtype, (a, b))
    if dtype in (torch.float16, torch.bfloat16):
        assert_float32_arithmetic(op, out, oracle, a, b, t64, transport)


def assert_float32_arithmetic(op, out, oracle, a, b, t64, transport):
    """16-bit data: each element is the float64 result up to float32 arithmetic and one rounding to
    the data dtype. Per element: |out - exact| <= half a 16-bit spacing of |exact| (with slack for
    the float32 result it rounds) + 16 float32 eps (coefficients to a few ulps, two products, a sum) of the magnitudes the two terms mix
    (|m_a a| + |m_b b|, from the oracle with one input zeroed) + half the smallest subnormal. Arithmetic
    in 16 bits, or t rounded to 16 bits, breaks it wherever the terms cancel; the bound relative to
    the largest value (assert_close_to_oracle) cannot see that."""
    a64, b64 = a.double(), b.double()
    ref = getattr(reference, op)
    parts = (ref(a64, torch.zeros_like(b64), t64, transport), ref(torch.zeros_like(a64), b64, t64, transport))
    info, f32 = torch.finfo(a.dtype), torch.finfo(torch.float32)
    for k, (o, exact) in enumerate(zip(out, oracle)):
        mag = parts[0][k].abs() + parts[1][k].abs()
        bound = (info.eps / 2 * (1 + 2 ** -6)) * exact.abs() + 16 * f32.eps * mag + info.smallest_normal * info.eps / 2
        excess = ((o.double() - exact).abs() - bound).max()
        assert excess <= 0, f"{op} output {k}: an element is {float(excess):.3g} past float32-arithmetic rounding"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["interpolate", "decode"])
def test_ops_match_reference(device, op, dtype, transport):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{op}{dtype}{transport}".encode()))
    for batch, feat in SHAPES:
        forms = ["B"] if batch * feat[-1] > 10**5 else T_FORMS
        for noncontig in (False, True):
            x, z = data(batch, feat, dtype, device, gen, noncontig)
            for form in forms:
                check_op(op, x, z, make_t(form, batch, device, gen, x.dim()), transport, dtype)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_coefficients_match_reference(device, dtype, transport):
    t = torch.linspace(0.01, 0.99, 1001, dtype=torch.float64).to(device)
    for tt in (t.to(dtype), t.to(dtype).reshape(7, 11, 13), t.to(dtype)[::3]):
        out = ucgm_fast.coefficients(tt, transport)
        oracle = reference.coefficients(tt.double(), transport)
        peer = reference.coefficients(tt, transport)
        for o in out:
            assert o.shape == tt.shape and o.dtype == dtype
        assert_close_to_oracle(out, oracle, peer, dtype)
    scalar = ucgm_fast.coefficients(0.25, transport)
    exact = reference.coefficients(torch.tensor(0.25, dtype=torch.float64), transport)
    for c, e in zip(scalar, exact, strict=True):
        assert c.dim() == 0 and c.dtype == torch.float32
        assert abs(float(c) - float(e)) <= 4e-7 * max(1.0, abs(float(e)))


def _ulp_err(out, peer):
    """Elementwise |out - peer| in units of peer's float32 spacing; 0 where equal (infinities) or both NaN."""
    spacing = torch.finfo(torch.float32).eps * peer.abs().clamp_min(torch.finfo(torch.float32).tiny)
    err = (out.double() - peer.double()).abs() / spacing.double()
    return torch.where((out == peer) | (out.isnan() & peer.isnan()), torch.zeros_like(err), err)


@pytest.mark.parametrize("transport", [tr for tr in TRANSPORTS if tr not in ("Linear", "ReLinear")])
def test_coefficients_vectorized_math_matches_float32_libm(transport):
    """The CPU's per-element sin / cos / exp polynomials (csrc/cpu/vec_math.h) over their whole
    domain |t| <= 4, and the libm fallback for blocks with larger or NaN times, agree with
    PyTorch's float32 evaluation of the same formulas to a few units in the last place."""
    t = torch.linspace(-4, 4, (1 << 20) + 3, dtype=torch.float32)
    for out, peer in zip(ucgm_fast.coefficients(t, transport), reference.coefficients(t, transport)):
        assert _ulp_err(out, peer).max() <= 4, transport
    # Out-of-domain times scattered through blocks of in-domain ones: those blocks take libm.
    t = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    t[::977] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6, -50.0, 4.5])
    for out, peer in zip(ucgm_fast.coefficients(t, transport), reference.coefficients(t, transport)):
        assert (out.isnan() == peer.isnan()).all()
        assert _ulp_err(out, peer).max() <= 4, transport


def test_coefficients_formulas():
    """Spot values straight from DESIGN.md, independent of the reference module."""
    t = torch.tensor([0.3], dtype=torch.float64)
    c = 1.57
    ai, gi, at, gt = ucgm_fast.coefficients(t, "TrigFlow")
    assert torch.allclose(ai, torch.sin(c * t)) and torch.allclose(gt, -torch.sin(c * t))
    s = torch.exp(4 * (2.68 * t - 1.59))
    ai, gi, at, gt = ucgm_fast.coefficients(t, "EDM")
    r = 1 / torch.sqrt(s * s + 0.25)
    assert torch.allclose(torch.stack([ai, gi, at, gt]), torch.stack([s * r, r, -0.5 * r, 2 * s * r]))
    ai, gi, at, gt = ucgm_fast.coefficients(t, "Random")
    assert torch.allclose(gt, -1 - torch.exp(-5 * t)) and torch.allclose(gi, 1 - t)
    assert [float(v) for v in ucgm_fast.coefficients(t, "ReLinear")] == [0.7, 0.3, -1.0, 1.0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decode_inverts_interpolate(device, transport):
    x, z = data(5, (3, 4), torch.float64, device, torch.Generator().manual_seed(0))
    t = torch.rand(5, dtype=torch.float64, device=device) * 0.9 + 0.05
    x_t, target = ucgm_fast.interpolate(x, z, t, transport)
    x_hat, z_hat = ucgm_fast.decode(x_t, target, t, transport)
    assert rel_err(x_hat, x) < 1e-10 and rel_err(z_hat, z) < 1e-10


def all_16bit_values(dtype, device):
    """Every float16 / bfloat16 bit pattern (NaNs, infinities, subnormals, both zeros) as a tensor."""
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)


def same_bits(a, b):
    """a and b hold the same values bit for bit, except that any NaN matches any NaN."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_conversions_round_trip(device, dtype):
    """At t = 0 (Linear) x_t = 1 x + 0 z: every 16-bit value survives widening and narrowing exactly
    (zeros come out +0, as x + 0 does)."""
    x = all_16bit_values(dtype, device)
    x_t, target = ucgm_fast.interpolate(x, torch.zeros_like(x), 0.0, "Linear")
    assert same_bits(x_t, x + 0.0) and same_bits(target, 0.0 - x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_conversions_round_like_torch(dtype):
    """CPU: float32 results narrow to 16 bits exactly as torch's .to(dtype) does (nearest even, overflow
    to inf, subnormals, NaN), over every input bit pattern, at several times."""
    x = all_16bit_values(dtype, "cpu")
    z = x.roll(12345)
    for t in (0.3, 0.5, 0.999):
        tt = torch.tensor(t, dtype=torch.float32)
        x_t, target = ucgm_fast.interpolate(x, z, t, "Linear")
        assert same_bits(x_t, ((1 - tt) * x.float() + tt * z.float()).to(dtype))
        assert same_bits(target, (z.float() - x.float()).to(dtype))


@pytest.mark.parametrize("op", ["interpolate", "decode"])
@pytest.mark.parametrize("transport", ["Linear", "EDM", "Random"])
def test_gradcheck(device, op, transport):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.rand(4, generator=gen, dtype=torch.float64).to(device) * 0.9 + 0.05
    fn = lambda u, v: getattr(ucgm_fast, op)(u, v, t, transport)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))
    assert torch.autograd.gradgradcheck(fn, (a, b))


def test_gradients_match_reference(device):
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(6, 4, 3, generator=gen).to(device).requires_grad_()
    F = torch.randn(6, 4, 3, generator=gen).to(device).requires_grad_()
    t = torch.rand(6, generator=gen).to(device)
    w = torch.randn(6, 4, 3, generator=gen).to(device)
    grads = []
    for impl in (ucgm_fast, reference):
        x_hat, z_hat = impl.decode(x_t, F, t, "TrigFlow")
        grads.append(torch.autograd.grad((x_hat * w).sum() + z_hat.square().sum(), (x_t, F)))
    for g, r in zip(*grads):
        assert rel_err(g, r) < 1e-5
    # Only one output used (the other's gradient is None): Linear z_hat = x_t + (1 - t) F.
    g = torch.autograd.grad(ucgm_fast.decode(x_t, F, t, "Linear")[1].sum(), F)[0]
    assert torch.allclose(g, (1 - t).reshape(-1, 1, 1).expand_as(g))


def test_opcheck(device):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 2, 5, generator=gen).to(device)
    b = torch.randn(3, 2, 5, generator=gen).to(device)
    t = torch.rand(3, generator=gen).to(device)
    for name in ("interpolate", "interpolate_backward", "decode", "decode_backward"):
        op = getattr(torch.ops.ucgm_fast, name)
        torch.library.opcheck(op, (a, b, t, 4))
        torch.library.opcheck(op, (a.clone().requires_grad_(), b.clone().requires_grad_(), t, 0))
        torch.library.opcheck(op, (a[:, :, ::2], b[:, :, ::2], t[:1].expand(3), 2))
    torch.library.opcheck(torch.ops.ucgm_fast.coefficients, (t, 4))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(x, z, t, F):
        x_t, target = ucgm_fast.interpolate(x, z, t, "TrigFlow")
        x_hat, z_hat = ucgm_fast.decode(x_t, F * target, t, "TrigFlow")
        return (x_hat - x).square().mean() + z_hat.abs().mean()

    gen = torch.Generator().manual_seed(4)
    x, z = (torch.randn(8, 4, 6, generator=gen).to(device) for _ in range(2))
    F = torch.randn(8, 4, 6, generator=gen).to(device).requires_grad_()
    t = torch.rand(8, generator=gen).to(device)
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x, z, t, F)
    (g_c,) = torch.autograd.grad(loss_c, F)
    loss_e = step(x, z, t, F)
    (g_e,) = torch.autograd.grad(loss_e, F)
    assert torch.allclose(loss_c, loss_e, rtol=1e-5) and torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-7)


def test_empty_batch(device):
    x = torch.empty(0, 3, 4, device=device)
    for op in (ucgm_fast.interpolate, ucgm_fast.decode):
        a, b = op(x, x, torch.empty(0, device=device), "EDM")
        assert a.shape == x.shape and b.shape == x.shape
        a, b = op(x, x, 0.5, "EDM")
        assert a.shape == x.shape
    assert ucgm_fast.coefficients(torch.empty(0, device=device), "Linear")[0].shape == (0,)


def test_custom_transport_uses_reference(device):
    lin = ucgm_fast.Transport(alpha_in=lambda t: t, gamma_in=lambda t: 1 - t,
                              alpha_to=lambda t: torch.ones_like(t), gamma_to=lambda t: -1.0)
    x, z = data(4, (5,), torch.float32, device, torch.Generator().manual_seed(5))
    t = torch.rand(4, device=device)
    for op in ("interpolate", "decode"):
        ours = getattr(ucgm_fast, op)(x, z, t, lin)
        builtin = getattr(ucgm_fast, op)(x, z, t, "Linear")
        for a, b in zip(ours, builtin):
            assert torch.allclose(a, b, atol=1e-6)
    assert lin.noise_time == 1.0 and ucgm_fast.get_transport("ReLinear").noise_time == 0.0


@pytest.mark.parametrize("archs, cc, runs", [
    ("80-real,90", (7, 5), False), ("80-real,90", (8, 0), True), ("80-real,90", (8, 6), True),
    ("80-real,90", (9, 0), True), ("80-real,90", (12, 0), True), ("80-real", (9, 0), False), ("75", (8, 6), True),
    ("90a", (9, 0), True), ("90a", (10, 0), False), ("86-real", (8, 0), False), ("", (8, 0), False),
    ("native", (8, 0), True)])
def test_which_gpus_a_build_runs_on(archs, cc, runs):
    # The ops fall back to the reference on a GPU the build has no code for (a default build on a
    # T4, 7.5) instead of failing with "no kernel image"; build_info() says so.
    from ucgm_fast._kernels import archs_run_on
    assert archs_run_on(archs, *cc) is runs


def test_build_info():
    info = ucgm_fast.build_info()
    for key in ("cpu", "cuda", "cuda_version", "cuda_architectures", "openmp"):
        assert key in info
    assert info["cpu"] is True


class TestBadInput:
    x = torch.randn(4, 3)

    def test_unknown_transport(self):
        with pytest.raises(ValueError, match="valid names are Linear, ReLinear"):
            ucgm_fast.decode(self.x, self.x, 0.5, "Cosine")
        with pytest.raises(TypeError, match="transport"):
            ucgm_fast.interpolate(self.x, self.x, 0.5, 3)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="F has shape"):
            ucgm_fast.decode(self.x, torch.randn(4, 2), 0.5, "Linear")

    def test_t_batch(self):
        with pytest.raises(ValueError, match="t has shape .* B = 4"):
            ucgm_fast.interpolate(self.x, self.x, torch.rand(3), "Linear")
        with pytest.raises(ValueError, match="t has shape"):
            ucgm_fast.interpolate(self.x, self.x, torch.rand(4, 2), "Linear")

    def test_dtypes(self):
        with pytest.raises(TypeError, match="x has dtype torch.int64"):
            ucgm_fast.interpolate(self.x.long(), self.x.long(), 0.5, "Linear")
        with pytest.raises(TypeError, match="z has dtype torch.complex64"):
            ucgm_fast.interpolate(self.x, self.x.to(torch.complex64), 0.5, "Linear")
        with pytest.raises(TypeError, match="F has dtype torch.float64 but x_t has dtype torch.float32"):
            ucgm_fast.decode(self.x, self.x.double(), 0.5, "Linear")
        with pytest.raises(TypeError, match="t has dtype"):
            ucgm_fast.decode(self.x, self.x, torch.ones(4, dtype=torch.long), "Linear")
        with pytest.raises(TypeError, match="t has dtype"):
            ucgm_fast.coefficients(torch.ones(4, dtype=torch.long), "Linear")

    def test_not_tensor_or_no_batch(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            ucgm_fast.interpolate([1.0], self.x, 0.5, "Linear")
        with pytest.raises(ValueError, match="batch dimension"):
            ucgm_fast.interpolate(torch.tensor(1.0), torch.tensor(1.0), 0.5, "Linear")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_devices(self):
        with pytest.raises(ValueError, match="is on cuda"):
            ucgm_fast.decode(self.x, self.x.cuda(), 0.5, "Linear")
        with pytest.raises(ValueError, match="t is on"):
            ucgm_fast.decode(self.x.cuda(), self.x.cuda(), torch.rand(4), "Linear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_run_on_the_current_stream():
    from ucgm_fast import _kernels
    side = torch.cuda.Stream()
    x, F = torch.randn(64, 4, 32, 32, device="cuda"), torch.randn(64, 4, 32, 32, device="cuda")
    t = torch.rand(64, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        assert _kernels._raw_stream(x.get_device()) == side.cuda_stream
        out = ucgm_fast.decode(x, F, t, "EDM")
        expect = reference.decode(x, F, t, "EDM")
    side.synchronize()
    for o, e in zip(out, expect):
        assert rel_err(o, e, x, F) < 2e-6


def test_vmap_takes_the_reference():
    # Under torch.func transforms the tensors are wrappers without storage, and the ops have no
    # batching rule: the calls take the eager reference (never raw pointers).
    x, z, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.rand(3, 5)
    out = torch.func.vmap(lambda a, b, c: ucgm_fast.interpolate(a, b, c, "Linear")[0])(x, z, t)
    loop = torch.stack([ucgm_fast.interpolate(x[i], z[i], t[i], "Linear")[0] for i in range(3)])
    assert rel_err(out, loop) < 1e-6


def test_forward_mode_and_t_derivatives_are_exact():
    # No forward-mode formula and no derivative in t in the kernels: such calls take the reference,
    # instead of silently giving zero tangents or no t gradient.
    gen = torch.Generator().manual_seed(3)
    x, F, v = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.rand(3, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    for op, ref in ((ucgm_fast.decode, reference.decode), (ucgm_fast.interpolate, reference.interpolate)):
        got = torch.func.jvp(lambda a: op(a, F, t, "EDM"), (x,), (v,))[1]
        want = torch.func.jvp(lambda a: ref(a, F, t, "EDM"), (x,), (v,))[1]
        assert all(torch.allclose(g, w) for g, w in zip(got, want)) and want[0].abs().max() > 0
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(op(fwAD.make_dual(x, v), F, t, "EDM")[0]).tangent
        assert torch.allclose(tangent, want[0])
        tg = t.clone().requires_grad_()
        (gt,) = torch.autograd.grad(op(x, F, tg, "EDM")[0].sum(), tg)
        tr = t.clone().requires_grad_()
        (rt,) = torch.autograd.grad(ref(x, F, tr, "EDM")[0].sum(), tr)
        assert torch.allclose(gt, rt)
    w = t.clone().requires_grad_()
    (gw,) = torch.autograd.grad(sum(c.sum() for c in ucgm_fast.coefficients(w, "TrigFlow")), w)
    wr = t.clone().requires_grad_()
    (rw,) = torch.autograd.grad(sum(c.sum() for c in reference.coefficients(wr, "TrigFlow")), wr)
    assert torch.allclose(gw, rw)


@pytest.mark.parametrize("transport", ["TrigFlow", "EDM", "Random"])
def test_coefficients_of_a_time_do_not_depend_on_its_neighbours(transport):
    # The CPU kernel takes vectorized math for times in its domain and libm for others: each result
    # must follow from its own time alone, so that out-of-domain times elsewhere, or where the threads'
    # slices start, change no bit.
    t = torch.rand(70001, generator=torch.Generator().manual_seed(3))
    clean = ucgm_fast.coefficients(t, transport)
    spoiled = t.clone()
    spoiled[::997] = torch.tensor([float("nan"), 5.0, -7.5, 1e6])[torch.arange(len(spoiled[::997])) % 4]
    out = ucgm_fast.coefficients(spoiled, transport)
    keep = torch.ones_like(t, dtype=torch.bool)
    keep[::997] = False
    for a, b in zip(out, clean):
        assert torch.equal(a[keep], b[keep])
    alone = [ucgm_fast.coefficients(spoiled[i:i + 1], transport) for i in range(0, 70001, 997 * 7)]
    for k, i in enumerate(range(0, 70001, 997 * 7)):
        for a, b in zip(out, alone[k]):
            assert torch.equal(a[i:i + 1], b) or (a[i].isnan() and b[0].isnan())
    with cpu_setting(set_num_threads, 3):
        for a, b in zip(ucgm_fast.coefficients(spoiled, transport), out):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


STREAM_MIN = ucgm_fast.build_info().get("cpu_stream_min_bytes")
needs_streaming = pytest.mark.skipif(STREAM_MIN is None, reason="this build has no streaming stores (not x86)")
STREAM_MIN_ROW_BYTES = 256  # csrc/cpu/stream_store.h kStreamMinRowBytes


def streamed_and_direct(fn):
    """fn() with every large-enough output streamed (threshold 0) and with none (a huge threshold)."""
    with cpu_setting(_C.set_cpu_stream_min_bytes, 0):
        assert ucgm_fast.build_info()["cpu_stream_min_bytes"] == 0
        streamed = fn()
    with cpu_setting(_C.set_cpu_stream_min_bytes, 1 << 62):
        direct = fn()
    return streamed, direct


def mix_with_gradients(op, transport, x, z, t, w1, w2):
    x, z = x.clone().requires_grad_(), z.clone().requires_grad_()
    out = getattr(ucgm_fast, op)(x, z, t, transport)
    return (*out, *torch.autograd.grad(out, (x, z), (w1, w2)))


@needs_streaming
@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_outputs_are_the_bits_of_direct_ones(dtype):
    """Rows of at least 256 bytes stream when the outputs reach the threshold (csrc/cpu/stream_store.h):
    whole cache lines through streaming stores, the partial lines at each row segment's ends
    directly. Rows of odd lengths (starting and ending inside lines, from just over 256 bytes to
    one long row), under 1 to 3 threads (which move the slices' bounds): interpolate, decode and
    both gradients give the bits of the unstreamed call."""
    item = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(12)
    shapes = ((600, STREAM_MIN_ROW_BYTES // item + 3), (3, 4099), (1, 100003))
    for (rows, row), nthreads in itertools.product(shapes, (1, 2, 3)):
        x, z = data(rows, (row,), dtype, "cpu", gen)
        w1, w2 = data(rows, (row,), dtype, "cpu", gen)
        t = torch.rand(rows, generator=gen)
        for op, transport in (("interpolate", "Linear"), ("decode", "EDM")):
            with cpu_setting(set_num_threads, nthreads):
                streamed, direct = streamed_and_direct(lambda: mix_with_gradients(op, transport, x, z, t, w1, w2))
            for k, (s, d) in enumerate(zip(streamed, direct)):
                assert torch.equal(s, d), f"{op} output {k}, {rows}x{row}, {nthreads} threads"


@needs_streaming
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transport", ["Linear", "ReLinear"])
def test_streamed_coefficients_are_the_bits_of_direct_ones(dtype, transport):
    item = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(13)
    for n, nthreads in itertools.product((STREAM_MIN_ROW_BYTES // item + 5, 4099, 100003), (1, 2, 3)):
        t = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
        with cpu_setting(set_num_threads, nthreads):
            streamed, direct = streamed_and_direct(lambda: ucgm_fast.coefficients(t, transport))
        for s, d in zip(streamed, direct):
            assert torch.equal(s, d), f"{n} times, {nthreads} threads"


@needs_streaming
def test_outputs_past_the_default_threshold_stream_and_match_the_reference():
    """At the default threshold (16 MiB) the float32 rows here stream: three rows of an odd length
    whose two outputs take 1.5x the threshold. The same bits as unstreamed, and the reference's values."""
    assert STREAM_MIN == 16 << 20
    row = STREAM_MIN // 16 + 13
    gen = torch.Generator().manual_seed(11)
    x, z = data(3, (row,), torch.float32, "cpu", gen)
    t = torch.tensor([0.13, 0.5, 0.87])
    for op, transport in (("interpolate", "Linear"), ("decode", "EDM")):
        fn = getattr(ucgm_fast, op)
        streamed = fn(x, z, t, transport)
        with cpu_setting(_C.set_cpu_stream_min_bytes, 1 << 62):
            direct = fn(x, z, t, transport)
        for s, d in zip(streamed, direct):
            assert torch.equal(s, d)
        check_op(op, x, z, t, transport, torch.float32)
