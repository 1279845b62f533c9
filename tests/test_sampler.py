"""ucgm_fast.sample: the fused sampler vs a float64 reference loop of the published sampler."""
import gc
import weakref

import pytest
import torch

import ucgm_fast
from ucgm_fast.reference import sampler as reference
from ucgm_fast.transports import get_transport
from conftest import rel_err

TRANSPORTS = ucgm_fast.TRANSPORTS
SHAPE = (3, 4, 5)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of per-element Gaussian data N(mu + 0.1 y, sd^2), plus a small tanh: smooth,
    deterministic, bounded on every transport, and run in the dtype of its input."""

    num_classes = 10

    def __init__(self, transport, shape=SHAPE[1:]):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mu = torch.randn(shape, generator=g, dtype=torch.float64)
        self.sd = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        self.tr = get_transport(transport)

    def forward(self, x, t, y=None):
        dt = x.dtype
        tt = t.to(dt).reshape((-1,) + (1,) * (x.dim() - 1))
        ai, gi, at, gt = self.tr.coefficients(tt)
        mu, s2 = self.mu.to(x.device, dt), self.sd.to(x.device, dt) ** 2
        if y is not None:
            mu = mu + 0.1 * y.to(dt).reshape(tt.shape)
        r = x - gi * mu
        v = gi * gi * s2 + ai * ai
        x_hat = mu + gi * s2 / v * r + 0.05 * torch.tanh(x)
        z_hat = ai / v * r
        return at * z_hat + gt * x_hat


def noise_like(shape=SHAPE, seed=1, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


KW = dict(time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.001))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("steps", [1, 2, 35, 60])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("extrapol", [0.0, 0.5])
def test_kappa0_matches_float64_reference(transport, steps, order, extrapol):
    model = GaussianDenoiser(transport)
    noise = noise_like()
    ref = reference.sample(model, noise, transport, steps, order, 0.0, extrapol, **KW)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    for state, tol in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        out = ucgm_fast.sample(model, noise.to(state), transport, steps, order, 0.0, extrapol, **KW,
                               state_dtype=state)
        assert out.dtype == state and out.shape == noise.shape
        assert rel_err(out, ref) <= tol, (state, rel_err(out, ref))


@pytest.mark.parametrize("transport", ["Linear", "ReLinear", "EDM"])
@pytest.mark.parametrize("kappa", [0.3, 1.0, "auto"])
def test_stochastic_matches_reference_with_same_noise(transport, kappa):
    model = GaussianDenoiser(transport)
    noise = noise_like()
    for order, steps, e in ((1, 4, 0.4), (2, 5, 0.0)):
        ref = reference.sample(model, noise, transport, steps, order, kappa, e, seed=21, **KW)
        out = ucgm_fast.sample(model, noise, transport, steps, order, kappa, e, seed=21, **KW,
                               state_dtype=torch.float64)
        assert rel_err(out, ref) <= 1e-9
        det = ucgm_fast.sample(model, noise, transport, steps, order, 0.0, e, **KW, state_dtype=torch.float64)
        assert rel_err(out, det) > 1e-3  # the noise does something


def test_auto_kappa_fixed_at_first_step():
    grid = reference.time_grid(6, 1, "Linear", (1, 1, 1), (0.001, 0.3))
    kappa = reference.auto_stochast_ratio("Linear", float(grid[0]), float(grid[1]))
    t, t1 = float(grid[0]), float(grid[1])
    assert kappa == pytest.approx(min(1.0, ((abs(t1 - t) ** 0.5) * (2 * t) ** 0.5 / t1) ** 2), rel=1e-12)
    model = GaussianDenoiser("Linear")
    noise = noise_like()
    auto = ucgm_fast.sample(model, noise, "Linear", 6, 1, "auto", state_dtype=torch.float64, seed=0)
    fixed = ucgm_fast.sample(model, noise, "Linear", 6, 1, kappa, state_dtype=torch.float64, seed=0)
    assert torch.equal(auto, fixed)


def test_time_grid_follows_published_rules():
    # Order 2 halves the points; g1 == 0 makes one extra point and drops the last; flip for Linear.
    g = reference.time_grid(5, 2, "Linear", (1, 1, 1), (0.1, 0.2))
    assert torch.allclose(g, torch.tensor([0.9, 0.55, 0.2, 0.0], dtype=torch.float64))
    g = reference.time_grid(3, 1, "ReLinear", (1, 1, 1), (0.0, 0.0))
    assert torch.allclose(g, torch.tensor([0.0, 1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    g = reference.time_grid(3, 1, "ReLinear", (2.0, 1.0, 1.0), (0.0, 0.5))
    assert torch.allclose(g, torch.tensor([0.0, 0.0625, 0.25, 0.0], dtype=torch.float64))
    # b != c: the Kumaraswamy map (1 - (1 - u^a)^b)^c written out from DESIGN.md, on
    # u = linspace(0.1, 0.8, 4); Linear starts at the noise end t = 1 (flipped), ReLinear at 0.
    a, b, c = 1.17, 0.8, 1.1
    kuma = [(1 - (1 - u ** a) ** b) ** c for u in (0.1, 0.1 + 0.7 / 3, 0.1 + 1.4 / 3, 0.8)]
    for tr, want in (("Linear", [1 - k for k in kuma]), ("ReLinear", kuma)):
        g = reference.time_grid(4, 1, tr, (a, b, c), (0.1, 0.2))
        assert torch.allclose(g, torch.tensor(want + [0.0], dtype=torch.float64), rtol=1e-12, atol=1e-14), tr
    # The fused sampler calls the model on that grid (K = 4 steps, the last t' = 0 is never an input).
    seen = []

    def model(x, t, y=None):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    ucgm_fast.sample(model, noise_like(), "Linear", 4, 1, 0.0, time_dist_ctrl=(a, b, c), rfba_gap_steps=(0.1, 0.2),
                     state_dtype=torch.float64)
    assert seen == pytest.approx([1 - k for k in kuma], rel=1e-12)


def test_seed_reproducibility_and_trajectory():
    model = GaussianDenoiser("TrigFlow")
    noise = noise_like(dtype=torch.float32)
    a = ucgm_fast.sample(model, noise, "TrigFlow", 4, 1, 0.7, seed=5)
    b = ucgm_fast.sample(model, noise, "TrigFlow", 4, 1, 0.7, seed=5)
    c = ucgm_fast.sample(model, noise, "TrigFlow", 4, 1, 0.7, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    x, traj = ucgm_fast.sample(model, noise, "TrigFlow", 4, 1, 0.7, seed=5, return_trajectory=True)
    assert torch.equal(x, a) and traj.shape == (4,) + noise.shape and torch.equal(traj[-1], x)
    _, ref_traj = reference.sample(model, noise, "TrigFlow", 4, 1, 0.7, seed=5, rfba_gap_steps=(0.001, 0.3),
                                   return_trajectory=True)
    assert rel_err(traj, ref_traj) < 1e-5


def test_model_input_dtype_and_times():
    seen = []

    def model(x, t, y=None):
        seen.append((x.dtype, t.dtype, t.shape, float(t[0])))
        return torch.zeros_like(x)

    noise = noise_like(dtype=torch.bfloat16)
    out = ucgm_fast.sample(model, noise, "Linear", 3, 2, 0.0, rfba_gap_steps=(0.001, 0.25))
    grid = reference.time_grid(3, 2, "Linear", (1, 1, 1), (0.001, 0.25))
    assert out.dtype == torch.float32
    assert [s[0] for s in seen] == [torch.bfloat16] * 3 and all(s[1] == torch.float32 for s in seen)
    assert all(s[2] == (SHAPE[0],) for s in seen)
    assert [s[3] for s in seen] == pytest.approx([float(grid[0]), float(grid[1]), float(grid[1])])


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.0, 0.5)])
def test_classifier_free_guidance(interval):
    model = GaussianDenoiser("Linear")
    y = torch.tensor([1, 4, 7])
    calls = []

    def counted(x, t, y):
        calls.append(x.shape[0])
        return model(x, t, y)

    def guided(x, t, y):
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
        w = 1.35 if interval[0] <= float(t[0]) <= interval[1] else 1.0  # not a float32 number: kept in float64
        return uncond + w * (cond - uncond)

    noise = noise_like()
    counted.num_classes = model.num_classes
    out = ucgm_fast.sample(counted, noise, "Linear", 5, 1, 0.0, cfg_scale=1.35, cfg_interval=interval, y=y,
                           state_dtype=torch.float64)
    ref = reference.sample(guided, noise, "Linear", 5, 1, 0.0, rfba_gap_steps=(0.001, 0.3), y=y)
    assert rel_err(out, ref) < 1e-9
    assert calls == [2 * SHAPE[0]] * 5  # both halves in one call, every step
    plain = ucgm_fast.sample(model, noise, "Linear", 5, 1, 0.0, y=y, state_dtype=torch.float64)
    assert rel_err(out, plain) > 1e-3


def test_guidance_of_the_first_channels_only_as_the_published_networks():
    # The published LightningDiT's forward_with_cfg guides model_out[:, :3]; the rest keeps the
    # conditional output. cfg_channels=k does the same; None (the default) guides every channel.
    model = GaussianDenoiser("Linear")
    y = torch.tensor([1, 4, 7])
    noise = noise_like()
    k = 1  # of SHAPE's 4 channels: one guided, three not

    def published_cfg(x, t, y):
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
        w = 1.35 if 0.0 <= float(t[0]) <= 0.75 else 1.0
        return torch.cat([(uncond + w * (cond - uncond))[:, :k], cond[:, k:]], dim=1)

    out = ucgm_fast.sample(model, noise, "Linear", 5, 1, 0.0, cfg_scale=1.35, y=y, state_dtype=torch.float64,
                           cfg_channels=k)
    ref = reference.sample(published_cfg, noise, "Linear", 5, 1, 0.0, rfba_gap_steps=(0.001, 0.3), y=y)
    assert rel_err(out, ref) < 1e-9
    every = ucgm_fast.sample(model, noise, "Linear", 5, 1, 0.0, cfg_scale=1.35, y=y, state_dtype=torch.float64)
    assert rel_err(out, every) > 1e-3
    # k at or past the channel count guides every channel, as None does
    wide = ucgm_fast.sample(model, noise, "Linear", 5, 1, 0.0, cfg_scale=1.35, y=y, state_dtype=torch.float64,
                            cfg_channels=SHAPE[1])
    assert torch.equal(wide, every)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="cfg_channels must be None"):
            ucgm_fast.sample(model, noise, cfg_scale=1.35, y=y, cfg_channels=bad)
        with pytest.raises(ValueError, match="cfg_channels must be None"):
            ucgm_fast.sampler.check_settings(cfg_channels=bad)


def test_memory_does_not_grow_with_steps():
    """Without return_trajectory no step's tensors outlive the next steps."""
    alive = []

    def model(x, t):
        alive.append(weakref.ref(x))
        return torch.ones_like(x) * 0.1

    ucgm_fast.sample(model, noise_like(dtype=torch.float32), "Linear", 40, 2, 0.5, extrapol_ratio=0.3)
    gc.collect()
    assert len(alive) == 39
    # The model is called with the state itself (float32 noise): none of them is kept.
    assert sum(r() is not None for r in alive) == 0

    peak = []

    def watch(x, t):
        alive.append(weakref.ref(x))
        peak.append(sum(r() is not None for r in alive))
        return torch.ones_like(x) * 0.1

    alive.clear()
    ucgm_fast.sample(watch, noise_like(dtype=torch.float32), "Linear", 60, 1, 0.5, extrapol_ratio=0.3)
    assert max(peak) <= 3


def test_custom_transport_matches_builtin():
    lin = ucgm_fast.Transport(alpha_in=lambda t: t, gamma_in=lambda t: 1 - t, alpha_to=lambda t: 1.0,
                              gamma_to=lambda t: -1.0)
    model = GaussianDenoiser("Linear")
    noise = noise_like()
    a = ucgm_fast.sample(model, noise, lin, 6, 2, 0.4, 0.3, state_dtype=torch.float64, seed=0)
    b = ucgm_fast.sample(model, noise, "Linear", 6, 2, 0.4, 0.3, state_dtype=torch.float64, seed=0)
    assert rel_err(a, b) < 1e-12


def test_custom_transport_with_constant_coefficients():
    # Callables may return numbers (as coefficients() allows): the time grid's end test and auto
    # kappa evaluate them through Transport.coefficients too.
    ve = ucgm_fast.Transport(alpha_in=lambda t: 2.0 * t, gamma_in=lambda t: 1.0, alpha_to=lambda t: 1.0,
                             gamma_to=lambda t: 0.0)
    model, noise = GaussianDenoiser("Linear"), noise_like()
    out = ucgm_fast.sample(model, noise, ve, 3, 1, "auto", state_dtype=torch.float64, seed=2)
    ref = reference.sample(model, noise, ve, 3, 1, "auto", rfba_gap_steps=(0.001, 0.3), seed=2)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-9


def test_step_tables_cached_per_setting():
    # Each setting builds its tables once; a warm cache must give what a cold one gives, so every
    # input of the tables has to be part of the key (a stale table would change the sample).
    y = torch.tensor([1, 2, 3])
    base = dict(transport="Linear", steps=7, order=2, stochast_ratio=0.3, extrapol_ratio=0.5, cfg_scale=2.0,
                cfg_interval=(0.1, 0.9), seed=3, y=y, **KW)
    variants = [{}, dict(steps=9), dict(order=1), dict(stochast_ratio="auto"), dict(stochast_ratio=0.7),
                dict(extrapol_ratio=0.2), dict(cfg_scale=3.0), dict(cfg_interval=(0.0, 0.5)),
                dict(time_dist_ctrl=(1.0, 1.3, 0.9)), dict(rfba_gap_steps=(0.01, 0.1)), dict(transport="TrigFlow"),
                dict(noise=noise_like()), dict(noise=noise_like((2,) + SHAPE[1:], dtype=torch.float32), y=y[:2])]

    def run(v):
        kw = {**base, **v}
        noise = kw.pop("noise", noise_like(dtype=torch.float32))
        return ucgm_fast.sample(GaussianDenoiser(kw["transport"]), noise, **kw)

    cold = []
    for v in variants:
        ucgm_fast.clear_graph_cache()
        cold.append(run(v))
    ucgm_fast.clear_graph_cache()
    for _ in range(2):
        for v, expected in zip(variants, cold):
            assert torch.equal(run(v), expected), v
    assert len(ucgm_fast.sampler._TABLES) == len(variants)
    same = [v for v, c in zip(variants[1:-2], cold[1:-2]) if torch.equal(cold[0], c)]
    assert not same  # each variation matters
    ucgm_fast.clear_graph_cache()
    assert not ucgm_fast.sampler._TABLES


def test_seed_as_a_tensor_on_cpu_and_cuda():
    model, noise = GaussianDenoiser("Linear"), noise_like()
    kw = dict(steps=3, stochast_ratio=0.7)
    expected = ucgm_fast.sample(model, noise, "Linear", seed=12345, **kw)
    assert torch.equal(ucgm_fast.sample(model, noise, "Linear", seed=torch.tensor(12345), **kw), expected)
    if torch.cuda.is_available():  # stays on the device (no read-back), same noise
        cuda_model = GaussianDenoiserCuda("Linear")
        a = ucgm_fast.sample(cuda_model, noise.cuda(), "Linear", seed=12345, **kw)
        b = ucgm_fast.sample(cuda_model, noise.cuda(), "Linear", seed=torch.tensor(12345, device="cuda"), **kw)
        assert torch.equal(a, b)


def test_models_get_their_own_times():
    # A model that rescales t in place must not reach the cached per-step tables (nor later calls).
    class InPlace(GaussianDenoiser):
        def forward(self, x, t, y=None):
            t *= 1000
            return super().forward(x, t / 1000, y)

    noise = noise_like()
    for order in (1, 2):
        kw = dict(steps=5, order=order, stochast_ratio=0.0)
        plain = ucgm_fast.sample(GaussianDenoiser("Linear"), noise, "Linear", **kw)
        assert torch.allclose(ucgm_fast.sample(InPlace("Linear"), noise, "Linear", **kw), plain, rtol=1e-6)
        assert torch.equal(ucgm_fast.sample(GaussianDenoiser("Linear"), noise, "Linear", **kw), plain)


def test_bad_input():
    model = GaussianDenoiser("Linear")
    noise = noise_like()
    for kwargs, exc, pattern in [
        (dict(steps=0), ValueError, "steps must be an integer >= 1"),
        (dict(steps=2.5), ValueError, "steps must be an integer >= 1"),
        (dict(order=3), ValueError, "order must be 1 or 2"),
        (dict(stochast_ratio=1.5), ValueError, "stochast_ratio must be in"),
        (dict(stochast_ratio=-0.1), ValueError, "stochast_ratio must be in"),
        (dict(stochast_ratio="sometimes"), ValueError, "stochast_ratio must be a number"),
        (dict(extrapol_ratio=-0.5), ValueError, "extrapol_ratio must be >= 0"),
        (dict(rfba_gap_steps=(0.6, 0.4)), ValueError, "empty time interval"),
        (dict(rfba_gap_steps=(0.0, 1.0)), ValueError, "empty time interval"),
        (dict(rfba_gap_steps=(0.1,)), ValueError, "rfba_gap_steps must be a sequence of 2 numbers"),
        # Order 2 from the noise end: the correction would divide by gamma_in(1) = 0 (NaN as published).
        (dict(rfba_gap_steps=(0.0, 0.3), order=2, steps=4), ValueError, "gamma_in"),
        (dict(time_dist_ctrl=(1.0, 0.0, 1.0)), ValueError, r"time_dist_ctrl \(a, b, c\) must all be > 0"),
        (dict(cfg_scale=-1.0), ValueError, "cfg_scale must be >= 0"),
        (dict(cfg_scale=2.0), ValueError, "needs class labels"),
        (dict(cfg_interval=(0.8, 0.2)), ValueError, "cfg_interval must be"),
        (dict(state_dtype=torch.float16), TypeError, "state_dtype must be torch.float32 or torch.float64"),
        (dict(seed="a"), TypeError, "seed must be an int"),
        (dict(y=torch.tensor([1, 2])), ValueError, "y must"),
        (dict(y=torch.tensor([1.0, 2.0, 3.0])), TypeError, "integer class labels"),
        (dict(cuda_graph=True), ValueError, "cuda_graph=True needs CUDA noise"),
        (dict(transport="Nope"), ValueError, "unknown transport 'Nope'"),
    ]:
        with pytest.raises(exc, match=pattern):
            ucgm_fast.sample(model, noise, **kwargs)
    with pytest.raises(ValueError, match="rejected its first input, noise of shape"):
        ucgm_fast.sample(model, noise_like((3, 4, 6)))
    with pytest.raises(ValueError, match="shaped like its input"):
        ucgm_fast.sample(lambda x, t: x[:, :2], noise)
    # The kernels read the output's pointer: another device (here meta, data_ptr 0) or an integer
    # dtype must be an error, not a crash.
    for bad in (lambda x, t: x.to("meta"), lambda x, t: x.to(torch.int32)):
        with pytest.raises(ValueError, match="floating tensor on the input's device"):
            ucgm_fast.sample(bad, noise)
    with pytest.raises(ValueError, match="needs model.num_classes"):
        ucgm_fast.sample(lambda x, t, y: x, noise, cfg_scale=2.0, y=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="noise has dtype torch.int64"):
        ucgm_fast.sample(model, noise.long())
    # gamma_in never vanishes on the grid of these: order 2 from g0 = 0 is fine.
    for tr in ("TrigFlow", "EDM"):
        out = ucgm_fast.sample(GaussianDenoiser(tr), noise, tr, steps=4, order=2, rfba_gap_steps=(0.0, 0.3))
        assert torch.isfinite(out).all()
    # One step of order 2 corrects nothing: g0 = 0 is fine.
    assert torch.isfinite(ucgm_fast.sample(model, noise, steps=1, order=2, rfba_gap_steps=(0.0, 0.3))).all()


def test_default_seed_is_fresh_per_call_and_follows_manual_seed():
    # A fixed default seed gave every call the same step noise: at kappa > 0 batches drawn from
    # independent noise came out nearly identical (correlation 0.998 at 30 steps, kappa 0.3).
    model = GaussianDenoiser("Linear")
    noise = noise_like(dtype=torch.float32)
    a = ucgm_fast.sample(model, noise, "Linear")  # defaults: kappa = 1, the step noise is all there is
    b = ucgm_fast.sample(model, noise, "Linear")
    assert not torch.equal(a, b)
    torch.manual_seed(7)
    c = ucgm_fast.sample(model, noise, "Linear")
    torch.manual_seed(7)
    assert torch.equal(ucgm_fast.sample(model, noise, "Linear"), c)
    # The key drawn is one int64 of the default generator, used as an explicit seed would be.
    torch.manual_seed(7)
    drawn = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64)
    assert torch.equal(ucgm_fast.sample(model, noise, "Linear", seed=drawn), c)

    def corr(u, v):
        u, v = u.flatten() - u.mean(), v.flatten() - v.mean()
        return float(u @ v / (u.norm() * v.norm()))

    kw = dict(steps=30, stochast_ratio=0.3, rfba_gap_steps=(0.001, 0.001))
    big = GaussianDenoiser("Linear", shape=(64,))
    u = ucgm_fast.sample(big, torch.randn(256, 64), "Linear", **kw)
    v = ucgm_fast.sample(big, torch.randn(256, 64), "Linear", **kw)
    assert abs(corr(u - big.mu.float(), v - big.mu.float())) < 0.2


def test_check_settings_defaults_are_samples():
    # check_settings validates what sample() would run: a setting left out means sample()'s default.
    import inspect

    sample_defaults = inspect.signature(ucgm_fast.sample).parameters
    checked = inspect.signature(ucgm_fast.sampler.check_settings).parameters
    for name, p in checked.items():
        assert p.default == sample_defaults[name].default, name
    assert "few-step" in ucgm_fast.sample.__doc__ and "rfba_gap_steps=(0.001, 0.001)" in ucgm_fast.sample.__doc__


def test_check_settings_caches_nothing():
    ucgm_fast.clear_graph_cache()
    ucgm_fast.sampler.check_settings(steps=5, order=2, cfg_scale=2.0, stochast_ratio="auto")
    ucgm_fast.sampler.check_settings("TrigFlow", steps=40, rfba_gap_steps=(0.001, 0.001))
    assert not ucgm_fast.sampler._TABLES
    with pytest.raises(ValueError, match="gamma_in"):
        ucgm_fast.sampler.check_settings(steps=4, order=2, rfba_gap_steps=(0.0, 0.3))
    assert not ucgm_fast.sampler._TABLES


def _published_cfg_weight(t32: torch.Tensor, lo: float, hi: float, scale: float) -> float:
    """forward_with_cfg's test, as published: t[0] >= cfg_interval[0] and t[0] <= cfg_interval[1]."""
    return scale if (t32[0] >= lo and t32[0] <= hi) else 1.0


def test_cfg_interval_is_tested_on_the_float32_t_the_model_sees():
    # Linear, 10 steps, gaps (0, 0): the last t is 1 - 0.9 = 0.09999999999999998 in float64, below
    # lo = 0.1, but the model is given float32(0.1), which the published test counts as inside.
    model = GaussianDenoiser("Linear")
    y = torch.tensor([1, 4, 7])
    lo, hi = 0.1, 0.9

    def guided(x, t, y):
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
        return uncond + _published_cfg_weight(t, lo, hi, 2.0) * (cond - uncond)

    def both_halves(x, t, y):
        return model(x, t, y)

    both_halves.num_classes = model.num_classes
    noise = noise_like(dtype=torch.float32)
    kw = dict(rfba_gap_steps=(0.0, 0.0), y=y)
    out = ucgm_fast.sample(both_halves, noise, "Linear", 10, 1, 0.0, cfg_scale=2.0, cfg_interval=(lo, hi),
                           state_dtype=torch.float64, **kw)
    ref = reference.sample(guided, noise, "Linear", 10, 1, 0.0, **kw)
    assert rel_err(out, ref) < 1e-6
    # Every table weight against the published test on the float32 t, across settings near the edges.
    from ucgm_fast.sampler import _Plan

    for tr in ("Linear", "ReLinear", "TrigFlow"):
        for steps in range(1, 41):
            for gaps in ((0.0, 0.0), (0.001, 0.0), (0.001, 0.002)):
                for interval in ((0.1, 0.9), (0.0, 0.76), (0.3, 1.0), (0.125, 1.0)):
                    plan = _Plan(both_halves, noise, tr, steps, 1, 0.0, 0.0, (1, 1, 1), gaps, 2.0, interval, 0,
                                 torch.float32, False, False, y, cache_tables=False)
                    want = [_published_cfg_weight(plan.t_model[i], *interval, 2.0) for i in range(plan.iters)]
                    assert plan.weight[:plan.iters].tolist() == want, (tr, steps, gaps, interval)


def test_guidance_through_a_bound_method():
    # The published eval passes model.forward_with_cfg / model.forward: num_classes is the module's.
    model = GaussianDenoiser("Linear")
    y, noise = torch.tensor([1, 4, 7]), noise_like()
    kw = dict(steps=4, stochast_ratio=0.5, cfg_scale=1.5, y=y, seed=3, state_dtype=torch.float64)
    bound = ucgm_fast.sample(model.forward, noise, "Linear", **kw)
    assert torch.equal(bound, ucgm_fast.sample(model, noise, "Linear", **kw))
    from ucgm_fast.sampler import _num_classes

    class Wrapper(torch.nn.Module):  # DDP-style: the innermost .module holds the attribute
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert _num_classes(Wrapper(Wrapper(model))) == 10 and _num_classes(Wrapper(model).forward) == 10
    assert _num_classes(torch.compile(model)) == 10  # a compiled module forwards attribute reads
    assert _num_classes(lambda x, t, y: x) is None


def _graph_key(model, noise=None):
    from ucgm_fast.sampler import _Plan

    noise = noise_like(dtype=torch.float32) if noise is None else noise
    return _Plan(model, noise, "Linear", 2, 1, 0.0, 0.0, (1, 1, 1), (0.001, 0.3), 0.0, (0.0, 0.75), 0,
                 torch.float32, False, False, None, cache_tables=False).graph_key()


def test_graph_key_names_a_bound_method_by_its_module():
    # model.forward is a new object at every attribute access: keyed on id(), every call captured
    # the loop again (a private memory pool each, up to GRAPH_CACHE_SIZE of them).
    net, other = GaussianDenoiser("Linear"), GaussianDenoiser("Linear")
    assert net.forward is not net.forward
    assert _graph_key(net.forward) == _graph_key(net.forward)
    assert _graph_key(net) == _graph_key(net)
    assert len({_graph_key(net.forward), _graph_key(other.forward), _graph_key(net)}) == 3
    assert _graph_key(net.forward) != _graph_key(net.forward, noise_like((2,) + SHAPE[1:], dtype=torch.float32))


def test_graph_sees_parameters_that_moved():
    # A captured graph reads the parameters where they were; replaced or re-allocated ones would be
    # read from freed memory, so the cache checks their addresses before each replay.
    from ucgm_fast import sampler as S

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    net.register_buffer("scale", torch.ones(4))
    for model in (net, net.forward):
        slots = S._tensor_slots(model)
        assert len(slots) == 5
        before = S._addresses(slots)
        with torch.no_grad():
            net[0].weight.add_(1.0)  # in place: the graph sees it, nothing to do
        assert S._addresses(slots) == before
    net.half()
    assert S._addresses(slots) != before
    net.float()
    before = S._addresses(slots)
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    assert S._addresses(slots) != before
    before = S._addresses(slots)
    net.scale = torch.zeros(4)  # a buffer replaced
    assert S._addresses(slots) != before
    assert S._tensor_slots(lambda x, t: net(x)) == []  # a closure's tensors are not seen (documented)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("state", [torch.float32, torch.float64])
def test_cuda_matches_cpu_same_seed(state):
    model = GaussianDenoiser("EDM")
    noise = noise_like()
    y = torch.tensor([0, 3, 9])
    kw = dict(steps=6, order=2, stochast_ratio=0.6, extrapol_ratio=0.3, seed=99, state_dtype=state, cfg_scale=1.5)
    a = ucgm_fast.sample(model, noise.to(state), "EDM", y=y, **kw)
    b = ucgm_fast.sample(GaussianDenoiserCuda("EDM"), noise.to(state).cuda(), "EDM",
                         y=y.cuda(), **kw)
    # Same noise bit for bit; the model itself runs on a different device (its own rounding).
    assert rel_err(b, a) < (1e-10 if state == torch.float64 else 1e-5)


class GaussianDenoiserCuda(GaussianDenoiser):
    def __init__(self, transport):
        super().__init__(transport)
        self.mu, self.sd = self.mu.cuda(), self.sd.cuda()


@cuda
def test_cuda_graph_replay_matches_eager():
    ucgm_fast.clear_graph_cache()
    model = GaussianDenoiserCuda("Linear")
    y = torch.tensor([1, 2, 3], device="cuda")
    kw = dict(steps=6, order=2, stochast_ratio=0.5, extrapol_ratio=0.4, cfg_scale=2.0, y=y)
    for seed in (1, 2):
        noise = noise_like(seed=seed, dtype=torch.float32).cuda()
        eager = ucgm_fast.sample(model, noise, "Linear", seed=seed, **kw)
        graph = ucgm_fast.sample(model, noise, "Linear", seed=seed, cuda_graph=True, **kw)
        assert torch.equal(eager, graph)
    assert len(ucgm_fast.sampler._GRAPHS) == 1  # captured once, replayed with new noise and seed
    # Other settings with the same graph (kappa, guidance): its copies of the step tables are refilled.
    for other in (dict(stochast_ratio=0.9, cfg_scale=3.0), kw):
        noise = noise_like(seed=3, dtype=torch.float32).cuda()
        eager = ucgm_fast.sample(model, noise, "Linear", seed=3, **{**kw, **other})
        graph = ucgm_fast.sample(model, noise, "Linear", seed=3, cuda_graph=True, **{**kw, **other})
        assert torch.equal(eager, graph)
    assert len(ucgm_fast.sampler._GRAPHS) == 1
    # Autocast around the call changes the model's kernels: a graph of its own, not a replay of the first.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = ucgm_fast.sample(model, noise, "Linear", seed=3, **kw)
        graph = ucgm_fast.sample(model, noise, "Linear", seed=3, cuda_graph=True, **kw)
    assert torch.equal(eager, graph)
    assert len(ucgm_fast.sampler._GRAPHS) == 2


class SlowDenoiserCuda(GaussianDenoiserCuda):
    """Spins the GPU ~1 ms per call (captured into a graph too), so a replay is still running when
    the host has long moved on."""

    def forward(self, x, t, y=None):
        torch.cuda._sleep(2_000_000)
        return super().forward(x, t, y)


@cuda
def test_cuda_graph_replays_on_two_streams_take_turns():
    # One cached graph, replayed from two streams back to back: the second replay must not overwrite
    # the static inputs and outputs while the first still runs (it would, without waiting for it).
    ucgm_fast.clear_graph_cache()
    model = SlowDenoiserCuda("Linear")
    kw = dict(steps=4, stochast_ratio=0.5)
    noises = [noise_like(seed=s, dtype=torch.float32).cuda() for s in (1, 2)]
    eager = [ucgm_fast.sample(model, n, "Linear", seed=s, **kw) for s, n in zip((1, 2), noises)]
    ucgm_fast.sample(model, noises[0], "Linear", seed=1, cuda_graph=True, **kw)  # captured here
    torch.cuda.synchronize()
    out = []
    for s, n in zip((1, 2), noises):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            out.append(ucgm_fast.sample(model, n, "Linear", seed=s, cuda_graph=True, **kw))
    torch.cuda.synchronize()
    assert len(ucgm_fast.sampler._GRAPHS) == 1
    assert all(torch.equal(a, b) for a, b in zip(out, eager))


@cuda
def test_cuda_graph_inside_autocast_does_not_keep_cached_casts():
    # Autocast caches the bf16 casts of weights that require grad until its region ends; a graph
    # captured reading such a cast would replay from freed memory once the region is left.
    ucgm_fast.clear_graph_cache()
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16).cuda()  # parameters require grad: autocast caches their casts

    class Model(torch.nn.Module):
        num_classes = 4

        def forward(self, x, t, y):
            return lin(x).float() * 0.1 + x * t[:, None]

    model, noise = Model(), torch.randn(8, 16, device="cuda")
    kw = dict(steps=3, stochast_ratio=0.0, seed=1, y=torch.zeros(8, dtype=torch.long, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = ucgm_fast.sample(model, noise, "Linear", **kw)
        captured = ucgm_fast.sample(model, noise, "Linear", cuda_graph=True, **kw)
    churn = [torch.randn(16, 16, device="cuda") for _ in range(64)]  # reuses whatever the region freed
    with torch.autocast("cuda", dtype=torch.bfloat16):
        replayed = ucgm_fast.sample(model, noise, "Linear", cuda_graph=True, **kw)
    del churn
    assert torch.equal(eager, captured) and torch.equal(eager, replayed)
    assert len(ucgm_fast.sampler._GRAPHS) == 1


@cuda
def test_cached_tables_serve_another_stream():
    # Tables built (copied asynchronously) on one stream and reused on another: the call waits on
    # their event, so both streams sample the same.
    ucgm_fast.clear_graph_cache()
    model = GaussianDenoiserCuda("Linear")
    noise = noise_like(dtype=torch.float32).cuda()
    a = ucgm_fast.sample(model, noise, "Linear", steps=4, stochast_ratio=0.5, seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        b = ucgm_fast.sample(model, noise, "Linear", steps=4, stochast_ratio=0.5, seed=1)
    torch.cuda.synchronize()
    assert torch.equal(a, b) and len(ucgm_fast.sampler._TABLES) == 1


@cuda
def test_no_host_sync_in_loop():
    model = GaussianDenoiserCuda("TrigFlow")
    noise = noise_like(dtype=torch.float32).cuda()
    y = torch.tensor([1, 2, 3], device="cuda")
    ucgm_fast.sample(model, noise, "TrigFlow", steps=4, order=2, cfg_scale=2.0, y=y)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ucgm_fast.sample(model, noise, "TrigFlow", steps=4, order=2, stochast_ratio="auto", extrapol_ratio=0.5,
                         cfg_scale=2.0, y=y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_graph_of_a_bound_method_replays_and_moved_parameters_capture_again():
    from ucgm_fast import sampler as S

    ucgm_fast.clear_graph_cache()
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        num_classes = 4

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x, t, y):
            return self.lin(x) * 0.1 + x * t[:, None]

    model, noise = Model().cuda(), torch.randn(8, 16, device="cuda")
    kw = dict(steps=3, stochast_ratio=0.5, seed=1, y=torch.zeros(8, dtype=torch.long, device="cuda"))
    for _ in range(3):  # model.forward: a new method object per call, one graph
        graph = ucgm_fast.sample(model.forward, noise, "Linear", cuda_graph=True, **kw)
        assert torch.equal(graph, ucgm_fast.sample(model, noise, "Linear", **kw))
    assert len(S._GRAPHS) == 1
    # Default seed: drawn per call on the host and copied in before each replay.
    torch.manual_seed(5)
    a = ucgm_fast.sample(model.forward, noise, "Linear", cuda_graph=True, **{**kw, "seed": None})
    torch.manual_seed(5)
    assert torch.equal(a, ucgm_fast.sample(model, noise, "Linear", **{**kw, "seed": None}))
    assert not torch.equal(a, ucgm_fast.sample(model.forward, noise, "Linear", cuda_graph=True,
                                               **{**kw, "seed": None}))
    # Parameters replaced, not updated in place: the old graph would read freed memory.
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()}, assign=True)
    churn = [torch.randn(16, 16, device="cuda") for _ in range(64)]  # reuses what was freed
    graph = ucgm_fast.sample(model.forward, noise, "Linear", cuda_graph=True, **kw)
    del churn
    assert torch.equal(graph, ucgm_fast.sample(model, noise, "Linear", **kw))
    assert len(S._GRAPHS) == 1  # the stale graph was dropped, not kept beside the new one
