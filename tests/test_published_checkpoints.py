"""Checkpoints of the published UCGM trainer (torch.save of model, ema, opt, unigen, config) read here."""
import os

import numpy as np
import pytest
import torch

from ucgm_fast import checkpoint as ck
from ucgm_fast.config import ConfigError, load_config
from ucgm_fast.models import get_model
from ucgm_fast.train import load_model_from_checkpoint, read_checkpoint, train

SMALL = {"depth": 1, "hidden_size": 32, "num_heads": 2}


def published_config(**model):
    """A config in the published layout (configs/training_*/in1k256_tit_xl_sdvae.yaml's keys)."""
    return {
        "output_dir": "./outputs", "exp_name": "training_multi_steps/in1k256_tit_xl_sdvae",
        "data": {"data_path": "./buffers/data/sdvae_f8c4/train_256", "fid_reference_file": "./ref.npz",
                 "image_size": 32, "num_classes": 10, "num_workers": 8, "latent_norm": False,
                 "latent_multiplier": 0.18215},
        "vae": {"type": "sdvae_ema_f8c4", "downsample_ratio": 8},
        "model": {"type": "TiT-S/2", "in_chans": 4, **model},
        "train": {"no_reopt": False, "no_reuni": False, "no_buffer": False, "max_steps": 1000000,
                  "global_batch_size": 1024, "global_seed": 0, "log_every": 100, "ckpt_every": 20000,
                  "ema_decay": 0.9999},
        "optimizer": {"type": "AdamW", "lr": 0.0002, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95},
        "transport": {"type": "Linear", "lab_drop_ratio": 0.1, "consistc_ratio": 0.0, "enhanced_ratio": 0.44,
                      "scaled_cbl_eps": 0.0, "ema_decay_rate": 0.999, "enhanced_range": [0.0, 0.75],
                      "time_dist_ctrl": [2.4, 2.4, 1.0], "weight_funcion": "Cosine", "wt_cosine_loss": True},
        "sample": {"ckpt": "0500000.pt", "type": "UNI", "cfg_scale": 0.0, "cfg_interval": [0.0, 0.75],
                   "sampling_steps": 4, "stochast_ratio": 0.0, "extrapol_ratio": 0.21, "sampling_order": 1,
                   "time_dist_ctrl": [1.17, 0.8, 1.1], "rfba_gap_steps": [0.001, 0.001], "per_batch_size": 125,
                   "fid_sample_num": 50000},
    }


def write_published(path, seed=0):
    """A published-layout checkpoint of a small TiT (random weights); returns the model of its EMA
    weights (its online weights are those, perturbed)."""
    torch.manual_seed(seed)
    model = get_model("TiT-S/2", input_size=4, in_channels=4, num_classes=10, **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    sd = model.state_dict()
    derived = {"feat_rope.freqs_cos": torch.ones(4, 8), "feat_rope.freqs_sin": torch.zeros(4, 8)}
    online = {k: v + 0.05 * torch.randn_like(v) for k, v in sd.items()}
    torch.save({"model": {"module." + k: v for k, v in {**online, **derived}.items()},
                "ema": {**sd, **derived}, "opt": {"state": {}, "param_groups": []},
                # The published UCGMTS state: its target network (the whole TiT) under mod.
                "unigen": {"mod." + k: v.clone() for k, v in {**sd, **derived}.items()},
                "config": published_config(options=SMALL)}, path)
    return model


def test_a_published_checkpoint_samples_like_its_model(tmp_path):
    path = str(tmp_path / "0001000.pt")
    model = write_published(path)
    loaded, cfg, payload = load_model_from_checkpoint(path)
    assert payload["step"] == 1000 and payload["published"]
    assert cfg["data"]["name"] == "latents" and cfg["transport"]["enhanced_ratio"] == 0.44
    assert cfg["sample"]["extrapol_ratio"] == 0.21 and payload["model_config"]["type"] == "DiT-S/2"
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 5, 10])
    assert torch.equal(loaded(x, t, y), model(x, t, y))  # the EMA weights, by default
    online, _, _ = load_model_from_checkpoint(path, use_ema=False)
    assert not torch.allclose(online(x, t, y), model(x, t, y), atol=1e-3)
    from ucgm_fast.sample_cli import main as sample_main
    out = tmp_path / "s.npz"
    assert sample_main(["--ckpt", path, "--num", "4", "--device", "cpu", "--out", str(tmp_path / "g.png"),
                        "--save-npz", str(out)]) == 0
    assert np.isfinite(np.load(out)["samples"]).all()


def test_a_published_checkpoint_in_the_legacy_format(tmp_path):
    path = str(tmp_path / "0000007.pt")
    model = write_published(path)
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)  # not mappable
    loaded, _, payload = load_model_from_checkpoint(path)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2])
    assert payload["step"] == 7 and torch.equal(loaded(x, t, y), model(x, t, y))


def test_tuning_starts_from_a_published_checkpoint(tmp_path, capsys):
    src = str(tmp_path / "0000000.pt")
    model = write_published(src)
    lat = np.random.default_rng(0).standard_normal((32, 4, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "lat.npz", latents=lat, labels=np.arange(32) % 10)
    overrides = ["data.name=latents", f"data.data_path={tmp_path / 'lat.npz'}", "data.image_size=32",
                 "vae.downsample_ratio=8", "model.type=TiT-S/2", "model.in_chans=4", f"train.init_from={src}",
                 "train.no_reopt=false", "train.no_reuni=false", "transport.enhanced_ratio=0.44",
                 "transport.ema_decay_rate=0.999", "train.max_steps=1", "train.ckpt_every=1", "train.global_batch_size=16",
                 "train.grid_size=4", "train.progress=false", "sample.sampling_steps=1",
                 f"output_dir={tmp_path / 'run'}"] + [f"model.options.{k}={v}" for k, v in SMALL.items()]
    summary = train(load_config(None, overrides))
    assert summary["step"] == 1
    err = capsys.readouterr().err
    assert "initialised from" in err and "optimizer state is not loaded" in err
    # As published: the model from the published online weights, the EMA from its EMA weights (each one
    # small step away; the two differ by 0.05 noise). Parameters only: the EMA's buffers are the model's.
    tuned, start = ck.load_checkpoint(summary["checkpoint"]), read_checkpoint(src)
    dist = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k, _ in model.named_parameters())
    assert dist(tuned["model"], start["model"]) < 0.01 < dist(tuned["model"], start["ema"])
    assert dist(tuned["ema"], start["ema"]) < 0.01 < dist(tuned["ema"], start["model"])
    assert torch.equal(start["ema"]["x_embedder.proj.weight"], model.state_dict()["x_embedder.proj.weight"])


def test_files_that_are_neither_say_so(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ck.CheckpointError, match="not a published UCGM checkpoint either"):
        read_checkpoint(str(other))
    good = tmp_path / "0000003.pt"
    ck.save_checkpoint({"step": 3}, str(good))
    truncated = tmp_path / "0000004.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        read_checkpoint(str(truncated))
    unknown = tmp_path / "0000005.pt"
    torch.save({"model": {}, "ema": {}, "config": published_config(type="LightningDiT-XL/1")}, unknown)
    with pytest.raises(ConfigError, match="LightningDiT-XL/1"):
        load_model_from_checkpoint(str(unknown))
