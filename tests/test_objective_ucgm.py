"""UCGM.loss vs the eager step-by-step reference (ucgm_fast.reference.training_loss), the target
network, configuration, bad input, and (with a GPU) no host sync + CUDA graph capture.

Equivalence tolerances (max |fused - oracle| / max |oracle| over the loss and every parameter
gradient of a small deterministic model; the oracle is the reference run in float64 with a float64
copy of the model, on the same t, z):

    ============  ==============  ==================================================
    run dtype     lambda          bound
    ============  ==============  ==================================================
    float64       any             1e-9   (same formulas; only the rounding order differs)
    float32       0               2e-5
    float32       0.5             1e-4   (f(t) - f(lambda t) divided by (1 - lambda) t)
    float32       1               5e-4   (central difference: rounding divided by 2 eps = 0.01)
    ============  ==============  ==================================================

The float32 bounds are ~5-10x the error of the float32 eager reference itself, measured on the same
matrix (2e-6 / 7e-6 / 6e-5 max).
"""
import copy
import itertools
import sys
import types

import pytest
import torch

import ucgm_fast
from ucgm_fast import reference
from ucgm_fast.optim import EMA, FlatGrads, make_optimizer

F32_BOUND = {0.0: 2e-5, 0.5: 1e-4, 1.0: 5e-4}


class TinyModel(torch.nn.Module):
    """A small smooth conditional model: conv + class and time embeddings, model(x, t, y)."""

    def __init__(self, channels=3, num_classes=5):
        super().__init__()
        self.num_classes = num_classes
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.label = torch.nn.Embedding(num_classes + 1, channels)
        self.time = torch.nn.Linear(1, channels)

    def forward(self, x, t, y):
        cond = self.label(y) + self.time(t[:, None].to(x.dtype))
        return torch.tanh(self.conv(x) + cond[:, :, None, None]) * 2 + 0.1 * x


def make_models(seed=0):
    torch.manual_seed(seed)
    m64 = TinyModel().double()
    tgt64 = copy.deepcopy(m64)
    with torch.no_grad():  # a target network that differs from the model
        for p in tgt64.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m64, tgt64


def make_batch(B=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 4, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(B, 3, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (B,), generator=gen)
    t = torch.rand(B, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    return x, z, y, t


def use_target(ucgm, target):
    """Gives ucgm an explicit target network (as if created earlier) for the enhanced target."""
    ucgm.target, ucgm._target_call = target, target


def loss_and_grads(loss, model):
    return [loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))


def max_rel_err(outs, refs):
    return max(float((o.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)) for o, r in zip(outs, refs))


M64, T64 = make_models()
M32, T32 = copy.deepcopy(M64).float(), copy.deepcopy(T64).float()
BATCH = make_batch()


@pytest.mark.parametrize("transport", ucgm_fast.TRANSPORTS)
@pytest.mark.parametrize("enhanced", [0.0, 1.5])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_loss_matches_reference(lam, enhanced, transport):
    """The equivalence matrix: every (huber_eps, cosine, time weighting) for this (lambda, e, transport)."""
    x, z, y, t = BATCH
    for h, cosine, tw in itertools.product((0.0, 5.0), (False, True), (None, "cosine")):
        kw = dict(transport=transport, consistency_ratio=lam, enhanced_ratio=enhanced, enhanced_range=(0.1, 0.6),
                  label_drop_ratio=0.25, huber_eps=h, cosine_loss=cosine, time_weighting=tw)
        oracle = loss_and_grads(reference.training_loss(M64, x, y, t, z, target_model=T64, **kw), M64)
        for model, target, dtype, bound in ((M64, T64, torch.float64, 1e-9), (M32, T32, torch.float32, F32_BOUND[lam])):
            ucgm = ucgm_fast.UCGM(**kw, target_ema_decay=0.5)
            use_target(ucgm, target)
            loss = ucgm.loss(model, x.to(dtype), y, t=t.to(dtype), z=z.to(dtype))
            assert loss.dtype == dtype and loss.shape == ()
            err = max_rel_err(loss_and_grads(loss, model), oracle)
            assert err <= bound, f"{dtype} h={h} cosine={cosine} tw={tw}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("transport", ["Linear", "TrigFlow"])
@pytest.mark.parametrize("enhanced", [0.5, 1.0])
def test_loss_matches_reference_lambda0_small_ratios(enhanced, transport):
    """lambda = 0 below and at the remap threshold, which the matrix above skips: 0 < e < 1 is used as
    given, e = 1 remaps to (e - 1)/e = 0 (no enhancement at all). Two loss settings, to stay cheap."""
    x, z, y, t = BATCH
    for h, cosine, tw in ((0.0, False, None), (5.0, True, "cosine")):
        kw = dict(transport=transport, consistency_ratio=0.0, enhanced_ratio=enhanced, enhanced_range=(0.1, 0.6),
                  label_drop_ratio=0.25, huber_eps=h, cosine_loss=cosine, time_weighting=tw)
        oracle = loss_and_grads(reference.training_loss(M64, x, y, t, z, target_model=T64, **kw), M64)
        for model, target, dtype, bound in ((M64, T64, torch.float64, 1e-9), (M32, T32, torch.float32, F32_BOUND[0.0])):
            ucgm = ucgm_fast.UCGM(**kw, target_ema_decay=0.5)
            use_target(ucgm, target)
            loss = ucgm.loss(model, x.to(dtype), y, t=t.to(dtype), z=z.to(dtype))
            err = max_rel_err(loss_and_grads(loss, model), oracle)
            assert err <= bound, f"{dtype} h={h} cosine={cosine} tw={tw}: error {err:.3g} > {bound:.3g}"


def test_reference_follows_published_formulas():
    """The oracle itself, on one case worked out from DESIGN.md by hand (Linear, lambda = 1, no enhancement)."""
    x, z, y, t = BATCH
    B, eps = x.shape[0], 0.005
    c = y.clone()
    c[B - 2:] = M64.num_classes
    tb = t[:, None, None, None]
    F_t = M64(tb * z + (1 - tb) * x, t, c)

    def f(r):
        x_r = r * z + (1 - r) * x
        return x_r - r * M64(x_r, r.flatten(), c)  # Linear: den = -1, f = (F r - x_r) / (-1)

    with torch.no_grad():
        df = ((f(tb + eps) - f(tb - eps)) / (2 * eps)).clamp(-1, 1)
        target = F_t - (tb / -1 * 4 / torch.sin(1.57 * tb)) * df
    want = (torch.sqrt(((F_t - target) ** 2).mean(dim=(1, 2, 3)) + 25) - 5).mean()
    got = reference.training_loss(M64, x, y, t, z, transport="Linear", consistency_ratio=1.0, label_drop_ratio=0.25,
                                  huber_eps=5.0)
    assert torch.allclose(got, want, rtol=1e-12)
    fused = ucgm_fast.UCGM("Linear", 1.0, label_drop_ratio=0.25, huber_eps=5.0).loss(M64, x, y, t=t, z=z)
    assert torch.allclose(fused, want, rtol=1e-10)


def test_batched_and_separate_fd_passes_agree():
    x, z, y, t = BATCH
    kw = dict(transport="TrigFlow", consistency_ratio=1.0, enhanced_ratio=2.0, label_drop_ratio=0.25, huber_eps=5.0)
    calls = []
    model = TinyModel().double()
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    losses = []
    for batched in (True, False):
        ucgm = ucgm_fast.UCGM(**kw, target_ema_decay=1.0, batch_fd_passes=batched)
        losses.append(ucgm.loss(model, x, y, t=t, z=z))
    # F_t, the target-network pass (the copy keeps the hook), then one 2B pass / two passes of B
    assert calls == [8, 8, 16, 8, 8, 8, 8]
    assert torch.allclose(losses[0], losses[1], rtol=1e-12)


def test_online_target_reuses_the_forward():
    """D = 0, lambda > 0: the target network is the model at the same input, so F_t is reused."""
    x, z, y, t = BATCH
    calls = []
    model = TinyModel().double()
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    kw = dict(transport="Linear", consistency_ratio=1.0, enhanced_ratio=2.0, label_drop_ratio=0.25)
    loss = ucgm_fast.UCGM(**kw, target_ema_decay=0.0).loss(model, x, y, t=t, z=z)
    assert calls == [8, 16]
    ref = reference.training_loss(model, x, y, t, z, target_model=model, **kw)
    assert torch.allclose(loss, ref, rtol=1e-10)
    # lambda = 0 with D = 0: the null-label pass goes through the online model itself.
    kw["consistency_ratio"] = 0.0
    ucgm = ucgm_fast.UCGM(**kw, target_ema_decay=0.0)
    assert torch.allclose(ucgm.loss(model, x, y, t=t, z=z),
                          reference.training_loss(model, x, y, t, z, target_model=model, **kw), rtol=1e-10)
    assert ucgm.target is None


def test_16bit_model_outputs():
    """A model returning bfloat16 for float32 data (autocast): targets and loss computed in float32."""
    x, z, y, t = (v.float() if v.is_floating_point() else v for v in BATCH)
    model = copy.deepcopy(M32)

    class Bf16(torch.nn.Module):
        num_classes = 5

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x_t, r, labels):
            return self.inner(x_t, r, labels).bfloat16()

    wrapped = Bf16()
    for lam in (0.0, 1.0):
        kw = dict(transport="Linear", consistency_ratio=lam, enhanced_ratio=1.5, label_drop_ratio=0.25)
        ucgm = ucgm_fast.UCGM(**kw, target_ema_decay=0.0)
        loss = ucgm.loss(wrapped, x, y, t=t, z=z)
        assert loss.dtype == torch.float32
        ref = reference.training_loss(wrapped, x, y, t, z, target_model=wrapped, **kw)
        assert torch.allclose(loss, ref, rtol=2e-3), (float(loss), float(ref))
        g = torch.autograd.grad(loss, list(model.parameters()))
        g_ref = torch.autograd.grad(reference.training_loss(wrapped, x, y, t, z, target_model=wrapped, **kw),
                                    list(model.parameters()))
        assert max_rel_err(g, [r.double() for r in g_ref]) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_16bit_data(lam, dtype):
    """16-bit data and model: UCGM.loss and the published-order reference both run (the reference's
    enhancement once mixed float32 into a 16-bit index_put) and are as close to the float64 oracle
    as each other. Central differences of a 16-bit model are coarse (rel. error ~0.1-0.2 at lambda=1,
    either way), so the bound is relative to the reference's own error."""
    x, z, y, t = BATCH
    model = copy.deepcopy(M64).to(dtype)
    model64 = copy.deepcopy(model).double()
    x, z = x.to(dtype), z.to(dtype)
    kw = dict(transport="Linear", consistency_ratio=lam, enhanced_ratio=1.5, label_drop_ratio=0.25)
    oracle = loss_and_grads(reference.training_loss(model64, x.double(), y, t, z.double(), target_model=model64,
                                                    **kw), model64)
    ref = loss_and_grads(reference.training_loss(model, x, y, t.float(), z, target_model=model, **kw), model)
    fused = loss_and_grads(ucgm_fast.UCGM(**kw, target_ema_decay=0.0).loss(model, x, y, t=t.float(), z=z), model)
    ref_err, fused_err = max_rel_err(ref, oracle), max_rel_err(fused, oracle)
    assert fused_err <= 2 * ref_err + 2e-3, (fused_err, ref_err)


def test_inputs_not_modified_and_random_draws():
    x, z, y, t = BATCH
    saved = [v.clone() for v in (x, z, y, t)]
    ucgm = ucgm_fast.UCGM("Linear", 1.0, 2.0, label_drop_ratio=0.25, target_ema_decay=1.0)
    ucgm.loss(M64, x, y, t=t, z=z)
    assert all(torch.equal(a, b) for a, b in zip(saved, (x, z, y, t)))  # the published step edits x, z, y in place
    torch.manual_seed(3)
    a = ucgm.loss(M64, x, y)
    torch.manual_seed(3)
    b = ucgm.loss(M64, x, y)
    assert torch.equal(a, b) and torch.isfinite(a)


def test_time_distribution():
    ucgm = ucgm_fast.UCGM(time_dist=(0.8, 1.0, 1.0))
    torch.manual_seed(0)
    t = ucgm.sample_time(50000, "cpu")
    assert t.shape == (50000,) and t.dtype == torch.float32
    assert abs(float(t.mean()) - 0.8 / 1.8) < 0.005 and abs(float(t.var()) - 0.8 / (1.8 ** 2 * 2.8)) < 0.003 and float(t.min()) >= 0 and float(t.max()) <= 1
    t = ucgm_fast.UCGM(time_dist=(2.4, 2.4, 1.3)).sample_time(50000, "cpu")
    scipy_stats = pytest.importorskip("scipy.stats")
    assert abs(float((t == 1).float().mean()) - scipy_stats.beta.sf(1 / 1.3, 2.4, 2.4)) < 0.005  # clamped to 1
    assert abs(float(t.mean()) - scipy_stats.beta.expect(lambda v: min(1.3 * v, 1.0), (2.4, 2.4))) < 0.005


# ---------------------------------------------------------------------------------------------
# Target network
# ---------------------------------------------------------------------------------------------

def ema_setup(D):
    model = TinyModel().double()
    ucgm = ucgm_fast.UCGM("Linear", 0.0, 0.5, label_drop_ratio=0.25, target_ema_decay=D)
    return model, ucgm


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_ema_target_follows_published_sequence():
    x, z, y, t = BATCH
    D = 0.9
    model, ucgm = ema_setup(D)
    ucgm.loss(model, x, y, t=t, z=z)  # creates the copy: the published first update (decay 0)
    expected = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ucgm.target.parameters(), expected))
    d = 0.0 + (1 - 0.0) * (D - 0.0) / 2
    for step in range(3):
        perturb(model, step)  # an optimizer step
        ucgm.update_target(model)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        d = d + (1 - d) * (D - d) / 2
        assert ucgm.target_decay == pytest.approx(d)
        for a, b in zip(ucgm.target.parameters(), expected):
            assert torch.allclose(a, b, rtol=1e-12)
    assert ucgm.target_updates == 4
    assert not any(p.requires_grad for p in ucgm.target.parameters())


def test_frozen_and_online_targets():
    x, z, y, t = BATCH
    model, ucgm = ema_setup(1.0)
    ucgm.loss(model, x, y, t=t, z=z)
    frozen = [p.clone() for p in ucgm.target.parameters()]
    perturb(model, 0)
    ucgm.update_target(model)
    assert all(torch.equal(a, b) for a, b in zip(ucgm.target.parameters(), frozen))
    model, ucgm = ema_setup(0.0)
    ucgm.loss(model, x, y, t=t, z=z)
    ucgm.update_target(model)
    assert ucgm.target is None and ucgm.target_network(model) is model
    # no enhancement: no target network at all
    ucgm = ucgm_fast.UCGM("Linear", 1.0, 0.0, label_drop_ratio=0.25, target_ema_decay=0.5)
    ucgm.loss(model, x, y, t=t, z=z)
    ucgm.update_target(model)
    assert ucgm.target is None


def test_state_dict_resumes_the_target():
    x, z, y, t = BATCH
    model, ucgm = ema_setup(0.9)
    ucgm.loss(model, x, y, t=t, z=z)
    for step in range(2):
        perturb(model, step)
        ucgm.update_target(model)
    state = ucgm.state_dict()
    assert state["target_updates"] == 3 and any(k.startswith("mod.") for k in state)
    # A fresh object, created before any loss: the target is loaded when it is created.
    resumed = ucgm_fast.UCGM("Linear", 0.0, 0.5, label_drop_ratio=0.25, target_ema_decay=0.9)
    resumed.load_state_dict(state)
    assert resumed.target_decay == ucgm.target_decay
    assert torch.equal(resumed.loss(model, x, y, t=t, z=z), ucgm.loss(model, x, y, t=t, z=z))
    for a, b in zip(resumed.target.parameters(), ucgm.target.parameters()):
        assert torch.equal(a, b)
    perturb(model, 7)
    ucgm.update_target(model)
    resumed.update_target(model)
    for a, b in zip(resumed.target.parameters(), ucgm.target.parameters()):
        assert torch.equal(a, b)
    # Published "unigen" checkpoints: mod.module.<name> keys, no decay entries.
    published = {"mod.module." + k: v.clone() for k, v in ucgm.target.state_dict().items()}
    other = ucgm_fast.UCGM("Linear", 0.0, 0.5, label_drop_ratio=0.25, target_ema_decay=0.9)
    other.loss(model, x, y, t=t, z=z)
    other.load_state_dict(published)
    for a, b in zip(other.target.parameters(), ucgm.target.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unexpected key"):
        other.load_state_dict({"bogus": 1})


# ---------------------------------------------------------------------------------------------
# Configuration, sampling, bad input
# ---------------------------------------------------------------------------------------------

PUBLISHED_FEW_STEP = {  # transport: section of configs/training_few_steps/in1k256_tit_xl_sdvae.yaml
    "type": "Linear", "lab_drop_ratio": 0.1, "consistc_ratio": 1.0, "enhanced_ratio": 2.0, "scaled_cbl_eps": 5.0,
    "ema_decay_rate": 1.0, "enhanced_range": [0.0, 0.75], "time_dist_ctrl": [0.8, 1.0, 1.0],
    "weight_funcion": "Cosine", "wt_cosine_loss": False,
}


def test_target_copy_follows_the_model_to_another_dtype():
    # model.double() (or .cuda()) after the copy was made: the copy follows, values kept, instead
    # of failing in its forward with a bare dtype error.
    x, z, y, t = BATCH
    model = copy.deepcopy(M32)
    kw = dict(transport="Linear", consistency_ratio=1.0, enhanced_ratio=1.5, label_drop_ratio=0.25,
              target_ema_decay=0.999)
    ucgm = ucgm_fast.UCGM(**kw)
    ucgm.loss(model, x.float(), y, t=t.float(), z=z.float())
    before = copy.deepcopy(ucgm.target)
    model.double()
    loss = ucgm.loss(model, x, y, t=t, z=z)
    assert all(v.dtype == torch.float64 for v in ucgm.target.parameters())
    ref = ucgm_fast.UCGM(**kw)
    use_target(ref, before.double())
    assert torch.equal(loss, ref.loss(model, x, y, t=t, z=z))
    ucgm.update_target(model)  # the EMA step in the model's dtype
    assert all(v.dtype == torch.float64 for v in ucgm.target.parameters())


def test_from_config():
    for d in (PUBLISHED_FEW_STEP, {"transport": PUBLISHED_FEW_STEP, "model": {}}):
        u = ucgm_fast.UCGM.from_config(d)
        assert (u.transport.name, u.consistency_ratio, u.enhanced_ratio, u.label_drop_ratio, u.huber_eps) == \
            ("Linear", 1.0, 2.0, 0.1, 5.0)
        assert (u.target_ema_decay, u.enhanced_range, u.time_dist, u.time_weighting, u.cosine_loss) == \
            (1.0, (0.0, 0.75), (0.8, 1.0, 1.0), "cosine", False)
    multi = dict(PUBLISHED_FEW_STEP, consistc_ratio=0.0, enhanced_ratio=2.0, weight_funcion=None, wt_cosine_loss=True)
    u = ucgm_fast.UCGM.from_config(multi)
    assert u._ratio == pytest.approx(0.5) and u.time_weighting is None and u.cosine_loss  # (e - 1)/e at lambda = 0
    u = ucgm_fast.UCGM.from_config({"transport": "EDM", "consistency_ratio": 0.5, "fd_eps": 0.01})
    assert u.transport.name == "EDM" and u.fd_eps == 0.01
    with pytest.raises(ValueError, match="unknown key 'consistc'"):
        ucgm_fast.UCGM.from_config({"consistc": 1.0})
    with pytest.raises(ValueError, match="given twice"):
        ucgm_fast.UCGM.from_config({"type": "Linear", "transport": "EDM"})
    with pytest.raises(ValueError, match="'consistency_ratio' given beside a 'transport' mapping"):
        ucgm_fast.UCGM.from_config({"transport": {"type": "Linear"}, "consistency_ratio": 0.5})


def test_model_calls_share_one_time_copy_and_labels():
    # A model that leaves its inputs alone gets one copy of t for its calls at t, and the batched
    # finite-difference pass gets the step's labels twice: the caller's t and y stay untouched.
    seen = []

    class Recording(TinyModel):
        def forward(self, x, t, y):
            seen.append((t.data_ptr(), y.clone()))
            return super().forward(x, t, y)

    x, z, y, t = BATCH
    t_in, y_in = t.clone(), y.clone()
    ucgm = ucgm_fast.UCGM(consistency_ratio=1.0, enhanced_ratio=1.5, label_drop_ratio=0.25, target_ema_decay=0.5)
    ucgm.loss(Recording().double(), x, y_in, t=t_in, z=z)
    (p_t, y_t), (p_w, y_w), (_, y_2) = seen  # online at t, target network at t, both difference passes
    B, nd = y.shape[0], ucgm.num_dropped(y.shape[0])
    dropped = torch.cat([y[:B - nd], torch.full((nd,), 5)])
    assert p_t == p_w != t_in.data_ptr()
    assert torch.equal(y_t, dropped) and torch.equal(y_w, dropped) and torch.equal(y_2, torch.cat([dropped, dropped]))
    assert torch.equal(t_in, t) and torch.equal(y_in, y)


def test_model_that_writes_its_labels_in_place():
    # Such a model's label edits reach the later calls, as in the published step (every call gets the
    # same label tensor); and the gradient pass's saved labels are not written by the later calls.
    class Clamping(TinyModel):
        def forward(self, x, t, y):
            y.clamp_(max=3)  # values 4 and 5 (the null label) become 3
            return super().forward(x, t, y)

    x, z, y, t = BATCH
    y = y.clone()
    y[0] = 4
    torch.manual_seed(0)
    model = Clamping().double()
    for e in (0.0, 1.5):
        kw = dict(transport="Linear", consistency_ratio=1.0, enhanced_ratio=e, label_drop_ratio=0.25)
        with torch.no_grad():  # the reference's own backward fails here: its later calls write the saved labels
            want = reference.training_loss(model, x, y, t, z, target_model=model, **kw)
        ucgm = ucgm_fast.UCGM(**kw, target_ema_decay=0.0)
        got = ucgm.loss(model, x, y, t=t, z=z)
        got.backward()
        assert torch.allclose(got, want, rtol=1e-12), e


def test_loss_under_inference_mode():
    # Inference tensors have no version counter: the model's calls then get copies of their own.
    x, z, y, t = BATCH
    for lam, e in ((0.0, 1.5), (1.0, 1.5), (1.0, 0.0)):
        ucgm = ucgm_fast.UCGM(consistency_ratio=lam, enhanced_ratio=e, label_drop_ratio=0.25, target_ema_decay=0.0)
        model = TinyModel().double()
        with torch.no_grad():
            want = ucgm.loss(model, x, y, t=t, z=z)
        with torch.inference_mode():
            got = ucgm.loss(model, x, y, t=t, z=z)
        assert torch.equal(got, want), (lam, e)


def test_model_calls_get_their_own_times():
    # A model that rescales its time input in place must not change the loss's own t (nor the caller's).
    class InPlace(TinyModel):
        def forward(self, x, t, y):
            t *= 1000
            return super().forward(x, t / 1000, y)

    x, z, y, t = BATCH
    for lam, e in ((0.0, 1.5), (1.0, 1.5), (0.5, 0.0)):
        kw = dict(consistency_ratio=lam, enhanced_ratio=e, label_drop_ratio=0.25, target_ema_decay=0.5)
        plain, inplace = TinyModel().double(), InPlace().double()
        inplace.load_state_dict(plain.state_dict())
        t_in = t.clone()
        a = ucgm_fast.UCGM(**kw).loss(plain, x, y, t=t, z=z)
        b = ucgm_fast.UCGM(**kw).loss(inplace, x, y, t=t_in, z=z)
        assert torch.equal(t_in, t) and torch.allclose(a, b, rtol=1e-12), (lam, e)


def test_the_target_is_a_constant_also_at_lambda_0():
    x, z, y, t = BATCH
    for lam, e in ((0.0, 0.0), (0.0, 1.5), (1.0, 0.0)):
        kw = dict(consistency_ratio=lam, enhanced_ratio=e, label_drop_ratio=0.25)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        ucgm = ucgm_fast.UCGM(**kw, target_ema_decay=0.5)
        use_target(ucgm, T64)
        (gx,) = torch.autograd.grad(ucgm.loss(M64, xs, y, t=t, z=z), xs)
        (gr,) = torch.autograd.grad(reference.training_loss(M64, xr, y, t, z, target_model=T64, **kw), xr)
        assert torch.allclose(gx, gr, rtol=1e-9, atol=1e-12), (lam, e)


def test_transports_derived_from_builtins_run_their_own_functions():
    import dataclasses

    doubled = dataclasses.replace(ucgm_fast.get_transport("Linear"), gamma_to=lambda t: -2 * torch.ones_like(t))
    assert doubled.id is None
    x, z, y, t = BATCH
    kw = dict(label_drop_ratio=0.25)
    got = ucgm_fast.UCGM(doubled, **kw).loss(M64, x, y, t=t, z=z)
    assert torch.allclose(got, reference.training_loss(M64, x, y, t, z, transport=doubled, **kw), rtol=1e-12)
    assert not torch.allclose(got, ucgm_fast.UCGM("Linear", **kw).loss(M64, x, y, t=t, z=z))


def test_load_state_dict_copies_and_resets():
    x, z, y, t = BATCH
    model, ucgm = ema_setup(0.9)
    ucgm.loss(model, x, y, t=t, z=z)
    state = ucgm.state_dict()
    snapshot = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    later = ucgm_fast.UCGM("Linear", 0.0, 0.5, label_drop_ratio=0.25, target_ema_decay=0.9)
    later.load_state_dict(state)  # no target yet: kept until it is made
    perturb(model, 3)
    ucgm.update_target(model)  # the source goes on training
    for k, v in later.state_dict().items():
        assert torch.equal(v, snapshot[k]) if isinstance(v, torch.Tensor) else v == snapshot[k], k
    # A state saved before any target existed makes the next loss build it afresh, as a new object does.
    fresh_state = ucgm_fast.UCGM("Linear", 0.0, 0.5, label_drop_ratio=0.25, target_ema_decay=0.9).state_dict()
    ucgm.load_state_dict(fresh_state)
    new = ucgm_fast.UCGM("Linear", 0.0, 0.5, label_drop_ratio=0.25, target_ema_decay=0.9)
    assert torch.equal(ucgm.loss(model, x, y, t=t, z=z), new.loss(model, x, y, t=t, z=z))
    assert ucgm.target_updates == new.target_updates == 1
    # A target state that does not fit: a clear error, and the object stays usable after a good load.
    bad = ucgm_fast.UCGM("Linear", 0.0, 0.5, label_drop_ratio=0.25, target_ema_decay=0.9)
    bad.load_state_dict({"target_decay": 0.5, "target_updates": 2, "mod.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit the model: conv.bias"):  # checked up front, without a copy
        bad.check_target_state(model)
    with pytest.raises(ValueError, match="does not fit the model"):
        bad.loss(model, x, y, t=t, z=z)
    assert bad.target is None
    bad.load_state_dict(new.state_dict())
    assert torch.isfinite(bad.loss(model, x, y, t=t, z=z))


def test_sample_delegates_to_sampler(monkeypatch):
    seen = {}
    fake = types.ModuleType("ucgm_fast.sampler")

    def sample(model, noise, **kwargs):
        seen.update(model=model, noise=noise, **kwargs)
        return noise * 2

    fake.sample = sample
    monkeypatch.setitem(sys.modules, "ucgm_fast.sampler", fake)
    monkeypatch.setattr(ucgm_fast, "sampler", fake, raising=False)
    noise = torch.randn(2, 3, 4, 4)
    out = ucgm_fast.UCGM("TrigFlow").sample(M32, noise, steps=2, y=torch.zeros(2, dtype=torch.long))
    assert torch.equal(out, noise * 2)
    assert seen["transport"] is ucgm_fast.get_transport("TrigFlow") and seen["steps"] == 2 and seen["model"] is M32
    ucgm_fast.UCGM("TrigFlow").sample(M32, noise, transport="Linear")
    assert seen["transport"] == "Linear"
    # A custom transport that merely carries a built-in's name is passed on as itself.
    mine = ucgm_fast.Transport(alpha_in=lambda t: t, gamma_in=lambda t: 1 - t, alpha_to=lambda t: torch.ones_like(t),
                               gamma_to=lambda t: -2 * torch.ones_like(t), name="Linear")
    ucgm_fast.UCGM(mine).sample(M32, noise)
    assert seen["transport"] is mine


class TestBadInput:
    def test_constructor(self):
        for kwargs, match in [
            (dict(consistency_ratio=1.5), "consistency_ratio must be in"),
            (dict(consistency_ratio=-0.1), "consistency_ratio must be in"),
            (dict(enhanced_range=(0.75, 0.0)), "enhanced_range must be increasing"),
            (dict(enhanced_range=(0.5, 0.5)), "enhanced_range must be increasing"),
            (dict(enhanced_range=(-0.1, 0.5)), "must be increasing within"),
            (dict(enhanced_range=(0.0, 1.2)), "must be increasing within"),
            (dict(enhanced_range=(0.1,)), "enhanced_range must be two numbers"),
            (dict(fd_eps=0.0), "fd_eps must be > 0"),
            (dict(fd_eps=-1e-3), "fd_eps must be > 0"),
            (dict(huber_eps=-1.0), "huber_eps must be >= 0"),
            (dict(label_drop_ratio=1.0), "label_drop_ratio must be in"),
            (dict(target_ema_decay=1.5), "target_ema_decay must be in"),
            (dict(time_dist=(0.0, 1.0, 1.0)), r"time_dist \(a, b, c\) must be positive"),
            (dict(time_weighting="linear"), "time_weighting must be None"),
            (dict(transport="Cosine"), "unknown transport 'Cosine'"),
        ]:
            with pytest.raises(ValueError, match=match):
                ucgm_fast.UCGM(**kwargs)
        with pytest.raises(TypeError, match="consistency_ratio must be a finite number"):
            ucgm_fast.UCGM(consistency_ratio="1")
        with pytest.raises(TypeError, match="cosine_loss must be a bool"):
            ucgm_fast.UCGM(cosine_loss=7)
        # the same malformed range gets the same error from the class and from the op
        for make in (lambda r: ucgm_fast.UCGM(enhanced_range=r),
                     lambda r: ucgm_fast.enhance_target(*BATCH[:2], BATCH[0], None, BATCH[3], "Linear", 1.5, r)):
            for bad in ((0.1,), ("a", "b"), (0.1, float("nan"))):
                with pytest.raises(ValueError, match="enhanced_range must be two numbers"):
                    make(bad)

    def test_plain_function_model_with_a_target_copy(self):
        x, z, y, t = BATCH

        def model(x_t, t, y):
            return 0.5 * x_t
        model.num_classes = 5
        # no copy needed: works; a copy of a function: a clear error, not deepcopy's AttributeError
        ucgm_fast.UCGM("Linear", 1.0, 2.0, label_drop_ratio=0.25, target_ema_decay=0.0).loss(model, x, y, t=t, z=z)
        with pytest.raises(TypeError, match=r"needs a torch.nn.Module; got function\. Use target_ema_decay=0"):
            ucgm_fast.UCGM("Linear", 1.0, 2.0, label_drop_ratio=0.25, target_ema_decay=0.5).loss(model, x, y, t=t, z=z)

    def test_loss(self):
        x, z, y, t = BATCH
        ucgm = ucgm_fast.UCGM("Linear", 1.0, label_drop_ratio=0.25)

        class WrongShape(torch.nn.Module):
            num_classes = 5

            def forward(self, x_t, r, labels):
                return x_t[:, :2]

        with pytest.raises(ValueError, match=r"model output has shape \(8, 2, 4, 4\) but x has shape \(8, 3, 4, 4\)"):
            ucgm.loss(WrongShape(), x, y, t=t, z=z)
        with pytest.raises(ValueError, match="too small for label_drop_ratio=0.25"):
            ucgm.loss(M64, x[:1], y[:1], t=t[:1], z=z[:1])  # round(0.25) = 0: the published code drops all
        with pytest.raises(ValueError, match="y has shape"):
            ucgm.loss(M64, x, y[:3], t=t, z=z)
        with pytest.raises(TypeError, match="integer tensor"):
            ucgm.loss(M64, x, y.double(), t=t, z=z)
        with pytest.raises(ValueError, match="z has shape"):
            ucgm.loss(M64, x, y, t=t, z=z[:, :2])
        with pytest.raises(ValueError, match="t has shape"):
            ucgm.loss(M64, x, y, t=t[:3], z=z)

        class NoClasses(torch.nn.Module):
            def forward(self, x_t, r, labels):
                return x_t

        with pytest.raises(ValueError, match="no num_classes"):
            ucgm.loss(NoClasses(), x, y, t=t, z=z)
        # label_drop_ratio = 0 needs no null class and accepts any batch.
        ok = ucgm_fast.UCGM("Linear", 1.0, label_drop_ratio=0.0).loss(NoClasses(), x[:1], y[:1], t=t[:1], z=z[:1])
        assert torch.isfinite(ok)

    def test_model_outputs_checked_before_the_kernels(self):
        # UCGM.loss skips the public ops' checks, so it checks every model output itself.
        x, z, y, t = (v.float() if v.is_floating_point() else v for v in BATCH)

        class GradDtypeDiffers(torch.nn.Module):
            """bfloat16 with grad (an autocast-like online pass), float32 without (a plain no-grad pass)."""
            num_classes = 5

            def forward(self, x_t, r, labels):
                return x_t.bfloat16() if torch.is_grad_enabled() else x_t

        class OtherDevice(torch.nn.Module):
            num_classes = 5

            def forward(self, x_t, r, labels):
                return x_t if torch.is_grad_enabled() else x_t.to("meta")

        for lam, kw in ((1.0, {}), (1.0, {"batch_fd_passes": False}), (0.5, {})):
            ucgm = ucgm_fast.UCGM("Linear", lam, label_drop_ratio=0.25, **kw)
            with pytest.raises(TypeError, match="has dtype torch.float32 but the model's output at x_t has dtype "
                                               "torch.bfloat16"):
                ucgm.loss(GradDtypeDiffers(), x, y, t=t, z=z)
            with pytest.raises(ValueError, match="output is on meta but x is on cpu"):
                ucgm.loss(OtherDevice(), x, y, t=t, z=z)
        lam0 = ucgm_fast.UCGM("Linear", 0.0, enhanced_ratio=0.5, label_drop_ratio=0.25, target_ema_decay=0.0)
        with pytest.raises(TypeError, match="target network output has dtype torch.float32"):
            lam0.loss(GradDtypeDiffers(), x, y, t=t, z=z)
        with pytest.raises(ValueError, match="cosine_loss needs data with a channel dimension"):
            ucgm_fast.UCGM("Linear", 0.0, cosine_loss=True, label_drop_ratio=0.0).loss(
                NoClassesFlat(), x.flatten()[:8], y, t=t, z=z.flatten()[:8])


class NoClassesFlat(torch.nn.Module):
    def forward(self, x_t, r, labels):
        return x_t


# ---------------------------------------------------------------------------------------------
# CUDA: no host synchronization, CUDA graph capture
# ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_setup(lam, enhanced):
    model = TinyModel().cuda()
    ucgm = ucgm_fast.UCGM("Linear", lam, enhanced, label_drop_ratio=0.25, huber_eps=5.0, cosine_loss=True,
                          time_weighting="cosine", time_dist=(0.8, 1.0, 1.0), target_ema_decay=0.9)
    x = torch.randn(8, 3, 4, 4, device="cuda")
    y = torch.randint(0, 5, (8,), device="cuda")
    return model, ucgm, x, y


@cuda
@pytest.mark.parametrize("lam,enhanced", [(0.0, 0.0), (0.0, 1.5), (0.5, 2.0), (1.0, 2.0)])
def test_cuda_step_without_host_sync(lam, enhanced):
    # ucgm-train's whole step: loss, backward into the flat gradient buffer, nan/inf zeroing and
    # clipping, fused AdamW, target-network and EMA updates.
    model, ucgm, x, y = cuda_setup(lam, enhanced)
    opt = make_optimizer(model.parameters(), lr=1e-3)
    grads = FlatGrads(model.parameters())
    ema = EMA(copy.deepcopy(model).requires_grad_(False), model)

    def step():
        loss = ucgm.loss(model, x, y)  # t and z sampled on the device
        grads.zero_()
        loss.backward()
        grads.clip_(1.0, zero_nonfinite=True)
        opt.step()
        ucgm.update_target(model)
        ema.update(0.99)
        return loss

    step()  # creates the target network and the optimizer state (allowed to sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@cuda
@pytest.mark.parametrize("lam,enhanced", [(0.0, 1.5), (1.0, 2.0)])
def test_cuda_graph_capture_of_the_loss(lam, enhanced):
    model, ucgm, x, y = cuda_setup(lam, enhanced)
    t = torch.rand(8, device="cuda") * 0.8 + 0.1
    z = torch.randn_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the target network and the autograd state
        for _ in range(2):
            ucgm.loss(model, x, y, t=t, z=z).backward()
    torch.cuda.current_stream().wait_stream(side)
    params = list(model.parameters())
    for p in params:
        p.grad = None  # so the captured backward allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = ucgm.loss(model, x, y, t=t, z=z)
        static_loss.backward()
    static_grads = [p.grad for p in params]
    assert all(g is not None for g in static_grads)

    def check_replay():
        # The loss and, since backward is captured too, every parameter gradient equal eager
        # autograd's on the same inputs (torch.autograd.grad leaves the captured .grad alone).
        graph.replay()
        torch.cuda.synchronize()
        eager = ucgm.loss(model, x, y, t=t, z=z)
        assert torch.allclose(static_loss, eager, rtol=1e-5)
        eager_grads = torch.autograd.grad(eager, params)
        assert all(p.grad is g for p, g in zip(params, static_grads))  # replay refills, never reallocates
        assert max(float(g.abs().max()) for g in eager_grads) > 0
        assert max_rel_err(static_grads, [g.double() for g in eager_grads]) < 1e-4

    check_replay()
    # New inputs copied into the captured buffers give the eager loss and gradients of those inputs.
    x.copy_(torch.randn_like(x))
    check_replay()


def test_loss_compiles_fullgraph():
    """The whole loss (model calls included) traces as one graph: nothing in it breaks torch.compile."""
    torch._dynamo.reset()
    x, z, y, t = (v.float() if v.is_floating_point() else v for v in BATCH)
    model = copy.deepcopy(M32)
    ucgm = ucgm_fast.UCGM("TrigFlow", 1.0, 2.0, label_drop_ratio=0.25, huber_eps=5.0, cosine_loss=True,
                          time_weighting="cosine", target_ema_decay=0.9)
    eager = ucgm.loss(model, x, y, t=t, z=z)  # creates the EMA copy outside the compiled region
    compiled = torch.compile(lambda x, y, t, z: ucgm.loss(model, x, y, t=t, z=z), fullgraph=True)
    loss = compiled(x, y, t, z)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = torch.autograd.grad(eager, list(model.parameters()))
    assert torch.allclose(loss, eager, rtol=1e-5)
    assert max_rel_err(grads, [r.double() for r in ref]) < 1e-4


def test_compiled_loss_with_a_dynamic_batch_compiles_once():
    """The number of dropped labels, round(p B), is symbolic with the batch: a new batch size (an
    epoch's last batch) neither recompiles nor, past the cache limit, falls back to eager."""
    torch._dynamo.reset()
    model = copy.deepcopy(M32)
    ucgm = ucgm_fast.UCGM("Linear", 1.0, 2.0, label_drop_ratio=0.25)
    x, z, y, t = (v.float() if v.is_floating_point() else v for v in BATCH)
    ucgm.loss(model, x, y, t=t, z=z)  # the target network copy, made outside the compiled region
    compiled = torch.compile(lambda x, y, t, z: ucgm.loss(model, x, y, t=t, z=z), fullgraph=True, dynamic=True)


    def check(B):
        xb, zb, yb, tb = (torch.cat([v] * 4)[:B] for v in (x, z, y, t))
        assert torch.allclose(compiled(xb, yb, tb, zb), ucgm.loss(model, xb, yb, t=tb, z=zb), rtol=1e-5)

    check(8)  # compiles; drops 2 labels. The test model's conv guards 8 <= B <= 15 itself.
    with torch.compiler.set_stance("fail_on_recompile"):
        for B in (11, 14):  # drop 3 and 4 labels
            check(B)


@pytest.mark.slow
def test_loss_with_sampled_times_compiles_fullgraph():
    """t ~ Beta(a, b) c and z ~ N(0, I) drawn inside the compiled graph too (lambda = 0, EMA target)."""
    torch._dynamo.reset()
    x, _, y, _ = (v.float() if v.is_floating_point() else v for v in BATCH)
    model = copy.deepcopy(M32)
    ucgm = ucgm_fast.UCGM("Linear", 0.0, 1.5, label_drop_ratio=0.25, cosine_loss=True, target_ema_decay=0.9)
    ucgm.loss(model, x, y)
    loss = torch.compile(lambda x, y: ucgm.loss(model, x, y), fullgraph=True)(x, y)
    assert loss.shape == () and torch.isfinite(loss)
