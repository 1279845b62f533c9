"""ucgm-sample: batches of sample.per_batch_size drawn as ucgm-eval draws them, timed after the device is done."""
import os
import types

import numpy as np
import pytest
import torch

import ucgm_fast.sampler
from ucgm_fast.config import load_config
from ucgm_fast.train import train
from test_train_run import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample-cli")
    cfg = load_config(tiny_config(tmp), ["train.max_steps=1", "train.ckpt_every=1", "sample.per_batch_size=5"])
    train(cfg)
    return os.path.join(cfg["output_dir"], "checkpoints", "0000001.pt")


def test_sample_cli_batches_as_eval_does(checkpoint, tmp_path, monkeypatch, capsys):
    # --num samples used to go to the sampler in one batch whatever sample.per_batch_size said.
    from ucgm_fast.eval_cli import generate
    from ucgm_fast.sample_cli import main as sample_main
    from ucgm_fast.train import load_model_from_checkpoint

    batches = []
    real = ucgm_fast.sampler.sample

    def spy(model, noise, *args, **kwargs):
        batches.append(noise.shape[0])
        return real(model, noise, *args, **kwargs)

    monkeypatch.setattr(ucgm_fast.sampler, "sample", spy)
    out = tmp_path / "s.npz"
    assert sample_main(["--ckpt", checkpoint, "--steps", "2", "--num", "12", "--seed", "4", "--device", "cpu",
                        "--out", str(tmp_path / "g.png"), "--save-npz", str(out)]) == 0
    assert batches == [5, 5, 2]
    assert "ucgm-sample" in capsys.readouterr().err  # progress over the batches
    # One seed per batch, as ucgm-eval: the same seed gives ucgm-eval's samples (labels 0..9 cycled).
    model, cfg, _ = load_model_from_checkpoint(checkpoint)
    expected, labels = generate(model, cfg, 12, 2, seed=4)
    saved = np.load(out)
    assert np.array_equal(saved["samples"], expected.numpy()) and np.array_equal(saved["labels"], labels.numpy())
    # Chunks are not copies of one another's noise.
    assert not np.allclose(saved["samples"][:2], saved["samples"][5:7])
    # A single batch draws no progress bar.
    batches.clear()
    assert sample_main(["--ckpt", checkpoint, "--steps", "2", "--num", "3", "--device", "cpu", "--labels", "1,2",
                        "--out", str(tmp_path / "g.png"), "--save-npz", str(out)]) == 0
    assert batches == [3] and "ucgm-sample" not in capsys.readouterr().err
    assert np.array_equal(np.load(out)["labels"], [1, 2, 1])


def test_sampling_time_waits_for_the_device(monkeypatch):
    # CUDA calls return once their kernels are queued: the clock is read after a synchronize.
    from ucgm_fast import sample_cli

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    real_clock = sample_cli.time.perf_counter
    monkeypatch.setattr(sample_cli, "time", types.SimpleNamespace(
        perf_counter=lambda: events.append("clock") or real_clock()))
    assert sample_cli.elapsed_since(0.0, torch.device("cuda:1")) > 0
    assert events == [("sync", "cuda:1"), "clock"]
    events.clear()
    sample_cli.elapsed_since(0.0, torch.device("cpu"))
    assert events == ["clock"]


def test_guidance_flags_reach_the_sampler():
    from ucgm_fast.sample_cli import _parser, sampler_overrides

    args = _parser().parse_args(["--ckpt", "x.pt", "--cfg-scale", "1.5", "--cfg-interval", "0.1", "0.8",
                                 "--cfg-channels", "3"])
    assert sampler_overrides(args) == {"cfg_scale": 1.5, "cfg_interval": [0.1, 0.8], "cfg_channels": 3}
