"""Config system, checkpoint files, optimizer tail and batch plan (no training run needed)."""
import os

import pytest
import torch

from ucgm_fast import checkpoint as ck
from ucgm_fast.data import BatchPlan
from ucgm_fast.config import ConfigError, DEFAULTS, load_config
from ucgm_fast.optim import EMA, FlatGrads, load_optimizer_state, lr_at, make_optimizer

# A published recipe (LINs-lab/UCGM configs/training_multi_steps/in1k256_tit_xl_sdvae.yaml), verbatim keys.
PUBLISHED = """
output_dir: './outputs'
data:
  data_path: './buffers/data/sdvae_f8c4/train_256'
  fid_reference_file: './buffers/refs/in1k256_fid_ref.npz'
  image_size: 256
  num_classes: 1000
  num_workers: 8
  latent_norm: False
  latent_multiplier: 0.18215
vae:
  type: 'sdvae_ema_f8c4'
  downsample_ratio: 8
model:
  type: TiT-XL/2
  in_chans: 4
train:
  no_reopt: False
  no_reuni: False
  no_buffer: False
  max_steps: 1000000
  global_batch_size: 1024
  global_seed: 0
  log_every: 100
  ckpt_every: 20000
  ema_decay: 0.9999
optimizer:
  type: 'AdamW'
  lr: 0.0002
  weight_decay: 0.0
  beta1: 0.9
  beta2: 0.95
transport:
  type: Linear
  lab_drop_ratio: 0.1
  consistc_ratio: 0.0
  enhanced_ratio: 0.44
  scaled_cbl_eps: 0.0
  ema_decay_rate: 0.999
  enhanced_range: [0.0, 0.75]
  time_dist_ctrl: [2.4, 2.4, 1.00]
  weight_funcion: Cosine
  wt_cosine_loss: True
sample:
  ckpt: "0500000.pt"
  type: UNI
  cfg_scale: 0.0
  cfg_interval: [0.00, 0.75]
  sampling_steps: 60
  stochast_ratio: 0.0
  extrapol_ratio: 0.21
  sampling_order: 1
  time_dist_ctrl: [1.17, 0.8, 1.1]
  rfba_gap_steps: [0.001, 0.001]
  per_batch_size: 125
  fid_sample_num: 50000
"""

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ config

def test_published_recipe_loads_with_its_keys(tmp_path):
    cfg = load_config(_write(tmp_path, PUBLISHED))
    assert cfg["transport"]["enhanced_ratio"] == 0.44 and cfg["transport"]["weight_funcion"] == "Cosine"
    assert cfg["transport"]["time_dist_ctrl"] == [2.4, 2.4, 1.0]
    assert cfg["optimizer"]["beta2"] == 0.95 and cfg["train"]["global_batch_size"] == 1024
    assert cfg["model"]["type"] == "TiT-XL/2" and cfg["vae"]["downsample_ratio"] == 8


def test_dotted_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(_write(tmp_path, PUBLISHED), ["train.max_steps=30", "train.ckpt_every=15", "output_dir=runs/x",
                                                    "transport.enhanced_range=[0.1, 0.5]", "train.compile=true",
                                                    "model.options.depth=2", "optimizer.max_grad_norm=0.1"])
    assert cfg["train"]["max_steps"] == 30 and cfg["train"]["ckpt_every"] == 15 and cfg["output_dir"] == "runs/x"
    assert cfg["transport"]["enhanced_range"] == [0.1, 0.5] and cfg["train"]["compile"] is True
    assert cfg["model"]["options"] == {"depth": 2} and cfg["optimizer"]["max_grad_norm"] == 0.1


def test_floats_written_with_an_exponent_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; learning rates are written that way.
    cfg = load_config(_write(tmp_path, "optimizer:\n  lr: 2e-4\n  min_lr: 1E-6\n  eps: 1.0e-8\n"),
                      ["optimizer.weight_decay=3e-2", "train.max_minutes=1e1"])
    assert cfg["optimizer"]["lr"] == 2e-4 and cfg["optimizer"]["min_lr"] == 1e-6 and cfg["optimizer"]["eps"] == 1e-8
    assert cfg["optimizer"]["weight_decay"] == 0.03 and cfg["train"]["max_minutes"] == 10.0
    assert load_config(None, ["exp_name=1e4x"])["exp_name"] == "1e4x"


@pytest.mark.parametrize("text, names", [
    ("train:\n  max_step: 3\n", ["'train.max_steps'", "'train.max_step'"]),
    ("trainn:\n  max_steps: 3\n", ["'trainn.max_steps' (did you mean 'train.max_steps'?)"]),
    ("sampel:\n  sampling_steps: 3\n", ["'sampel.sampling_steps' (did you mean 'sample.sampling_steps'?)"]),
    ("transport:\n  weight_function: Cosine\n  foo: 1\n", ["'transport.weight_function'", "'transport.foo'"]),
])
def test_unknown_keys_in_file_are_named(tmp_path, text, names):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for name in names:
        assert name in str(err.value)
    assert path in str(err.value)


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"'optimizer\.betas'"):
        load_config(None, ["optimizer.betas=0.9"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.max_steps"])


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=abc", "train.max_steps"), ("train.max_steps=0", "train.max_steps"),
    ("optimizer.type=SGD", "optimizer.type"), ("transport.time_dist_ctrl=[1,2]", "transport.time_dist_ctrl"),
    ("train.compile=3", "train.compile"), ("transport.consistc_ratio=1.5", "transport.consistc_ratio"),
    ("data.name=cifar", "data.name"), ("sample.stochast_ratio=foo", "sample.stochast_ratio"),
    ("optimizer.lr_schedule=step", "optimizer.lr_schedule"), ("optimizer.min_lr=1.0", "optimizer.min_lr"),
    # keys whose default is null are still typed once set
    ("train.max_minutes=abc", "train.max_minutes"), ("exp_name=2024-01-01", "exp_name"),
    ("train.threads=0", "train.threads"), ("model.in_chans=2.5", "model.in_chans"),
    ("optimizer.max_grad_norm=[1]", "optimizer.max_grad_norm"), ("train.grid_size=0", "train.grid_size"),
    ("train.grid_size=257", "train.grid_size"), ("data.num_workers=-1", "data.num_workers"),
    # the transport section is the objective's: UCGM's own checks, at load time, under the config's key names
    ("transport.lab_drop_ratio=1.0", "transport.lab_drop_ratio"),
    ("transport.enhanced_range=[0.8,0.2]", "transport.enhanced_range"),
    ("transport.ema_decay_rate=2", "transport.ema_decay_rate"), ("transport.scaled_cbl_eps=-1", "transport.scaled_cbl_eps"),
    ("transport.time_dist_ctrl=[0,1,1]", "transport.time_dist_ctrl"), ("transport.type=Cosine", "transport.type"),
    ("transport.weight_funcion=linear", "transport.weight_funcion"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_latents_get_the_published_scaling_and_no_heldout_split(tmp_path):
    import numpy as np
    from ucgm_fast.train import build_dataset

    x = np.random.default_rng(0).standard_normal((40, 4, 2, 2)).astype(np.float32) * 3 + 1
    np.savez(tmp_path / "lat.npz", latents=x, labels=np.arange(40) % 4)
    cfg = load_config(None, ["data.name=latents", f"data.data_path={tmp_path / 'lat.npz'}", "data.num_classes=4",
                             "data.image_size=2", "data.latent_norm=true", "data.latent_multiplier=0.5"])
    data = build_dataset(cfg, "train")
    expected = (x - x.mean((0, 2, 3), keepdims=True)) / x.std((0, 2, 3), ddof=1, keepdims=True) * 0.5
    assert len(data) == 40 and np.allclose(data.images.numpy(), expected, atol=1e-5)
    # A held-out part would be left out of training (published: the whole file) or leak into it.
    with pytest.raises(ConfigError, match="no held-out split"):
        build_dataset(cfg, "test")


def test_shipped_configs_load():
    names = sorted(os.listdir(CONFIG_DIR))
    assert any("digits" in n for n in names) and any("fashion" in n for n in names)
    assert any("in1k256" in n for n in names)
    for name in names:
        cfg = load_config(os.path.join(CONFIG_DIR, name))
        assert set(cfg) == set(DEFAULTS)


# ------------------------------------------------------------------ checkpoints

def _payload(step=1):
    return {"step": step, "model": {"w": torch.randn(64, 33)}, "config": {"a": 1}}


def test_checkpoint_roundtrip_is_atomic_and_plain_torch_load_works(tmp_path):
    path = ck.save_checkpoint(_payload(5), ck.checkpoint_path(str(tmp_path), 5))
    assert os.path.basename(path) == "0000005.pt"
    assert [p for p in os.listdir(tmp_path)] == ["0000005.pt"]  # no temp file left
    got = ck.load_checkpoint(path)
    assert got["step"] == 5 and got["model"]["w"].shape == (64, 33)
    assert torch.load(path, weights_only=True)["step"] == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_checkpoint_is_named_and_previous_one_is_used(tmp_path, damage):
    good = ck.save_checkpoint(_payload(10), ck.checkpoint_path(str(tmp_path), 10))
    bad = ck.save_checkpoint(_payload(20), ck.checkpoint_path(str(tmp_path), 20))
    data = bytearray(open(bad, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = b""
    open(bad, "wb").write(bytes(data))
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(bad)
    assert bad in str(err.value)
    warnings = []
    path, payload = ck.load_latest_valid(str(tmp_path), warn=warnings.append)
    assert path == good and payload["step"] == 10
    assert len(warnings) == 1 and bad in warnings[0]


def test_prune_keeps_last_k_and_removes_stale_temp_files(tmp_path):
    for s in (1, 2, 3, 4):
        ck.save_checkpoint(_payload(s), ck.checkpoint_path(str(tmp_path), s))
    (tmp_path / "0000005.pt.tmp-999999").write_bytes(b"partial")
    ck.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["0000003.pt", "0000004.pt"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc (Linux)")
def test_loading_a_checkpoint_maps_it_instead_of_reading_it_twice(tmp_path):
    # Read into bytes and unpickled from them, a checkpoint took twice its size in RAM on every rank.
    import subprocess
    import sys
    size = 128 << 20  # the hash check reads 16 MiB chunks: a bounded, size-independent peak
    path = ck.save_checkpoint({"step": 1, "model": {"w": torch.ones(size // 4)}}, str(tmp_path / "0000001.pt"))
    # Peak RSS of the loading process alone: VmHWM (ru_maxrss would carry pytest's peak over the exec).
    probe = (f"import re, torch; from ucgm_fast import checkpoint as ck; "
             f"rss = lambda: int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)) * 1024; "
             f"before = rss(); w = ck.load_checkpoint({path!r})['model']['w']; print(rss() - before, float(w[-1]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    grown, last = done.stdout.split()
    assert float(last) == 1.0
    assert int(grown) < size // 2, f"peak RSS grew by {int(grown) >> 20} MiB loading a {size >> 20} MiB checkpoint"


def test_writing_into_a_loaded_checkpoint_leaves_the_file_alone(tmp_path):
    import mmap
    if not hasattr(mmap, "MAP_SHARED"):
        pytest.skip("mmap flags are POSIX")
    path = ck.save_checkpoint(_payload(3), str(tmp_path / "0000003.pt"))
    # Even with torch's mmap default set to shared, the checkpoint is mapped copy-on-write.
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        payload = ck.load_checkpoint(path)
    payload["model"]["w"].add_(1.0)  # e.g. optimizer moments loaded as they are, updated in place
    del payload
    ck.verify_checkpoint(path)


# ------------------------------------------------------------------ optimizer tail

def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5))


def _backward(m, seed=0):
    torch.manual_seed(100 + seed)
    m(torch.randn(9, 7, dtype=next(m.parameters()).dtype)).pow(2).sum().backward()


def _grads(seed=0):
    m = _net(seed)
    _backward(m)
    return m


def _poison(m):
    m[0].weight.grad[1, 2] = float("nan")
    m[2].bias.grad[0] = float("inf")
    m[2].weight.grad[3, 1] = -float("inf")


@pytest.mark.parametrize("max_norm", [None, 0.05, 1e6])
def test_flat_grads_clean_and_clip_like_per_parameter_reference(max_norm):
    m, ref = _net(), _grads()
    grads = FlatGrads(m.parameters())
    _backward(m)
    _poison(m)
    _poison(ref)
    norm = grads.clip_(max_norm, zero_nonfinite=True)
    # The published order: clip_grad_norm_ over the raw gradients (when max_grad_norm is set), then nan_to_num.
    if max_norm is not None:
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    for p in ref.parameters():
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if max_norm is None:
        ref_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref.parameters()]))
    torch.testing.assert_close(norm, ref_norm, equal_nan=True)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
        assert torch.isfinite(p.grad).all()
    # Clipping by a non-finite norm skips the whole step: all of it zero, not only the bad entries.
    assert (max_norm is None) != all(bool((p.grad == 0).all()) for p in m.parameters())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_one_nonfinite_gradient_zeroes_the_clipped_step_as_published(bad):
    m, ref = _net(), _grads()
    grads = FlatGrads(m.parameters())
    _backward(m)
    m[2].bias.grad[0] = ref[2].bias.grad[0] = bad
    norm = grads.clip_(0.1, zero_nonfinite=True)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    for q in ref.parameters():
        torch.nan_to_num_(q.grad, nan=0.0, posinf=0.0, neginf=0.0)
    assert not torch.isfinite(norm) and torch.equal(norm.isnan(), ref_norm.isnan())  # the raw norm
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad) and not p.grad.any()


def test_backward_accumulates_into_the_flat_buffer():
    m, ref = _net(), _grads()
    grads = FlatGrads(m.parameters())
    (flat,) = grads.flats
    for _ in range(2):  # a second step after zero_ sees fresh gradients, not a sum
        grads.zero_()
        _backward(m)
        assert flat.abs().sum() > 0
        offset = 0
        for p, q in zip(m.parameters(), ref.parameters()):
            assert p.grad.data_ptr() == flat[offset:].data_ptr()  # still a view, filled in place
            assert torch.equal(p.grad, q.grad)
            offset += p.numel()
    before = [p.grad.clone() for p in m.parameters()]
    grads.clip_(None, zero_nonfinite=True)  # finite gradients, no clipping: untouched
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.grad, b)


def test_flat_grads_reattach_after_set_to_none():
    m, ref = _net(), _grads()
    grads = FlatGrads(m.parameters())
    torch.optim.SGD(m.parameters(), lr=0.1).zero_grad(set_to_none=True)  # detaches the views
    _backward(m)
    _poison(m)
    _poison(ref)
    grads.clip_(None, zero_nonfinite=True)
    for p, q, v in zip(m.parameters(), ref.parameters(), grads.views):
        assert p.grad is v
        torch.testing.assert_close(p.grad, torch.nan_to_num(q.grad, nan=0.0, posinf=0.0, neginf=0.0))


def test_flat_grads_one_buffer_per_dtype():
    a, b = _net(0), _net(1).double()
    params = list(a.parameters()) + list(b.parameters())
    grads = FlatGrads(params)
    assert [f.dtype for f in grads.flats] == [torch.float32, torch.float64]
    _backward(a)
    _backward(b)
    ref = [p.grad.double().clone() for p in params]
    norm = grads.clip_(0.1)
    ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
    torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-6, atol=0)
    scale = 0.1 / (ref_norm + 1e-6)
    for p, g in zip(params, ref):
        torch.testing.assert_close(p.grad.double(), g * scale, rtol=1e-6, atol=1e-9)


def test_multi_tensor_ema_matches_formula():
    model, ema = _grads(0), _grads(1)
    ref = [e.detach().clone() * 0.9 + p.detach() * 0.1 for e, p in zip(ema.parameters(), model.parameters())]
    EMA(ema, model).update(0.9)
    for e, r in zip(ema.parameters(), ref):
        torch.testing.assert_close(e, r, rtol=1e-6, atol=1e-7)


def test_ema_copies_every_buffer():
    # Buffers are copied, not averaged: integer ones (BatchNorm's num_batches_tracked) too.
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    model(torch.randn(4, 3))
    EMA(ema, model).update(0.9)
    for name, b in model.named_buffers():
        assert torch.equal(dict(ema.named_buffers())[name], b), name


def test_adamw_is_fused_where_supported():
    opt = make_optimizer(torch.nn.Linear(3, 3).parameters(), type="AdamW", lr=1e-3)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    assert isinstance(opt, torch.optim.AdamW)


def test_loaded_optimizer_moments_are_the_optimizers_own(tmp_path):
    # A resumed checkpoint maps its file: moments updated in place must not be views of it.
    m = _net()
    opt = make_optimizer(m.parameters(), type="AdamW", lr=1e-3)
    _backward(m)
    opt.step()
    path = ck.save_checkpoint({"step": 1, "optimizer": opt.state_dict()}, str(tmp_path / "0000001.pt"))
    saved = ck.load_checkpoint(path)["optimizer"]
    before = {k: {n: v.clone() for n, v in s.items()} for k, s in saved["state"].items()}
    other = _net()
    opt2 = make_optimizer(other.parameters(), type="AdamW", lr=1e-3)
    load_optimizer_state(opt2, saved)
    _backward(other)
    opt2.step()
    for k, s in saved["state"].items():
        for n, v in s.items():
            assert torch.equal(v, before[k][n]), f"state {k}.{n} changed"
    assert float(opt2.state_dict()["state"][0]["step"]) == 2


# ------------------------------------------------------------------ batch plan

def test_lr_schedule_warms_up_then_decays_to_min_lr():
    kw = dict(lr=1e-3, warmup_steps=10, min_lr=1e-5)
    assert [lr_at(s, 110, **kw) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(10, 110, lr_schedule="cosine", **kw) == pytest.approx(1e-3)
    assert lr_at(60, 110, lr_schedule="cosine", **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(60, 110, lr_schedule="linear", **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(35, 110, lr_schedule="linear", **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.75)
    assert lr_at(110, 110, lr_schedule="cosine", **kw) == pytest.approx(1e-5)
    assert lr_at(500, 110, lr_schedule="cosine", **kw) == pytest.approx(1e-5)  # past the end: stays there
    assert lr_at(500, 110, lr_schedule="constant", **kw) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(0, 10, lr=1.0, lr_schedule="exp")


def test_batch_plan_is_a_function_of_step_and_ranks_partition_the_global_batch():
    plan = BatchPlan(103, 16, seed=3)
    again = BatchPlan(103, 16, seed=3)
    assert torch.equal(plan.indices(9), again.indices(9))  # no hidden iterator state
    epoch = torch.cat([plan.indices(s) for s in range(plan.per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == 96
    ranks = [BatchPlan(103, 16, seed=3, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([r.indices(11) for r in ranks]), plan.indices(11))
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchPlan(103, 15, world=2)


def test_transport_section_takes_what_the_objective_takes():
    cfg = load_config(None, ["transport.weight_funcion=cosine", "transport.enhanced_range=[0.1,0.6]"])
    from ucgm_fast.config import build_objective
    ucgm = build_objective(cfg)
    assert ucgm.time_weighting == "cosine" and ucgm.enhanced_range == (0.1, 0.6)


def test_init_from_and_ckpt_together_are_refused():
    # train.init_from used to win silently over the published train.ckpt.
    with pytest.raises(ConfigError, match=r"'train\.init_from' \('a\.pt'\) and 'train\.ckpt' \('b\.pt'\) both"):
        load_config(None, ["train.init_from=a.pt", "train.ckpt=b.pt"])


def test_text_files_are_replaced_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    ck.write_text_atomic(path, "one\n")
    ck.write_text_atomic(path, "two\n")
    assert open(path).read() == "two\n"
    with pytest.raises(TypeError):
        ck.write_text_atomic(path, None)  # fails inside the write: the old file stays, no temp file is left
    assert open(path).read() == "two\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_cfg_channels_reaches_the_sampler_settings():
    from ucgm_fast.config import sampler_settings
    assert sampler_settings(load_config(None, ["sample.cfg_channels=3"]))["cfg_channels"] == 3
    assert sampler_settings(load_config(None, []))["cfg_channels"] is None
    with pytest.raises(ConfigError, match=r"'sample\.cfg_channels'"):
        load_config(None, ["sample.cfg_channels=0"])
