"""End-to-end training runs on digits with a tiny DiT: outputs, exact resume after SIGKILL, DDP, CLIs,
and the errors a user meets first (bad model name, data/model mismatch, foreign checkpoint)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ucgm_fast import checkpoint as ck
from ucgm_fast.config import ConfigError, load_config
from ucgm_fast.train import main as train_main
from ucgm_fast.train import train

TINY = {
    "data": {"name": "digits", "image_size": 8, "num_classes": 10},
    "model": {"type": "DiT-S/2", "options": {"depth": 2, "hidden_size": 32, "num_heads": 2}},
    "train": {"max_steps": 12, "global_batch_size": 16, "log_every": 3, "ckpt_every": 6, "keep_last": 2,
              "sample_every": 0, "grid_size": 10, "ema_decay": 0.9, "threads": 1, "progress": False},
    "optimizer": {"lr": 1e-3, "max_grad_norm": 1.0},
    "transport": {"type": "Linear", "consistc_ratio": 0.0, "enhanced_ratio": 0.3, "ema_decay_rate": 0.9},
    "sample": {"sampling_steps": 2},
    "eval": {"num_samples": 100, "classifier_epochs": 4},
}


def tiny_config(tmp_path, name="run", **sections):
    cfg = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    cfg["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _equal_states(a, b, where=""):
    """Recursively asserts bitwise equality of nested dicts/lists of tensors and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            _equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"values differ at {where}: {a!r} vs {b!r}"


def test_training_run_writes_all_outputs(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.sample_every=6"])
    summary = train(cfg)
    out = cfg["output_dir"]
    assert summary["step"] == 12 and torch.isfinite(torch.tensor(summary["loss"]))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert all("loss" in r and "images_per_s" in r and "steps_per_s" in r for r in rows)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["0000006.pt", "0000012.pt"]
    assert {"0000006.png", "0000012.png", "final.png"} <= set(os.listdir(os.path.join(out, "samples")))
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    payload = ck.load_checkpoint(os.path.join(out, "checkpoints", "0000012.pt"))
    assert {"model", "ema", "optimizer", "objective", "rng", "step", "config"} <= set(payload)
    # No loader state: the data order is a function of the step and the config's seed and batch size.
    assert payload["step"] == 12 and "data" not in payload
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["train"]["max_steps"] == 12


def test_keep_last_prunes_old_checkpoints(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.ckpt_every=2", "train.keep_last=3", "train.max_steps=10"])
    train(cfg)
    assert sorted(os.listdir(os.path.join(cfg["output_dir"], "checkpoints"))) == \
        ["0000006.pt", "0000008.pt", "0000010.pt"]


def _run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "ucgm_fast.train", *args], env=_env(), capture_output=True,
                          text=True, **kw)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path):
    steps, every = 60, 10
    common = [f"train.max_steps={steps}", f"train.ckpt_every={every}", "train.keep_last=10"]
    ref = tiny_config(tmp_path, "ref")
    done = _run_cli(["--config", ref, *common])
    assert done.returncode == 0, done.stderr

    cfg = tiny_config(tmp_path, "killed")
    ckdir = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "ucgm_fast.train", "--config", cfg, *common], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (ckdir / "0000020.pt").exists():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.002)
    alive = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert alive, "the run finished before SIGKILL; make it longer"
    assert not (ckdir / f"{steps:07d}.pt").exists()

    resumed = _run_cli(["--config", cfg, "--resume", *common])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr

    a = ck.load_checkpoint(str(tmp_path / "ref" / "checkpoints" / f"{steps:07d}.pt"))
    b = ck.load_checkpoint(str(ckdir / f"{steps:07d}.pt"))
    for key in ("model", "ema", "optimizer", "objective", "rng", "step"):
        _equal_states(a[key], b[key], key)
    # The metrics file has one line per logged step, none duplicated by the restart.
    steps_logged = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps


def test_resume_skips_a_corrupted_latest_checkpoint(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=6", "train.ckpt_every=3", "train.keep_last=5"])
    train(cfg)
    ckdir = os.path.join(cfg["output_dir"], "checkpoints")
    latest = os.path.join(ckdir, "0000006.pt")
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 3)
    # An explicit path: a clear error naming the file and the earlier good one.
    with pytest.raises(ck.CheckpointError) as err:
        train(cfg, resume=latest)
    assert latest in str(err.value) and "0000003.pt" in str(err.value)
    # --resume without a path falls back to the newest checkpoint that verifies.
    cfg2 = load_config(tiny_config(tmp_path), ["train.max_steps=9", "train.ckpt_every=3"])
    summary = train(cfg2, resume="")
    assert summary["step"] == 9
    assert "0000006.pt" in capsys.readouterr().err


def test_unknown_model_name_is_an_error(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["model.type=DiT-Q/3"])
    with pytest.raises(ConfigError, match="DiT-Q/3"):
        train(cfg)


def test_dataset_not_matching_the_model_is_an_error(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["model.in_chans=3"])
    with pytest.raises(ConfigError, match=r"\(1, 8, 8\).*\(3, 8, 8\)"):
        train(cfg)


def test_checkpoint_from_another_model_config_is_an_error(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=2", "train.ckpt_every=2"])
    train(cfg)
    src = os.path.join(cfg["output_dir"], "checkpoints", "0000002.pt")
    other = load_config(tiny_config(tmp_path, "other"), [f"train.init_from={src}", "model.options.hidden_size=64"])
    with pytest.raises(ConfigError, match="another model config.*hidden_size|options"):
        train(other)
    with pytest.raises(ConfigError, match="another model config"):
        train(load_config(tiny_config(tmp_path, "other2"), ["model.options.depth=3"]), resume=src)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    assert train_main(["--config", tiny_config(tmp_path), "train.nope=1"]) == 2
    assert "'train.nope'" in capsys.readouterr().err


def test_init_from_starts_few_step_tuning_as_published(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=4", "train.ckpt_every=4"])
    train(cfg)
    src = os.path.join(cfg["output_dir"], "checkpoints", "0000004.pt")
    tune = load_config(tiny_config(tmp_path, "tune"), [f"train.init_from={src}", "train.max_steps=2",
                                                       "train.ckpt_every=2", "transport.consistc_ratio=1.0",
                                                       "transport.ema_decay_rate=1.0"])
    summary = train(tune)
    assert summary["step"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))
    # With the learning rate at 0 and the EMA frozen (decay 1) the tuned run keeps what it started from:
    # by default, as published, the model from the source's model weights and the EMA from its EMA (the
    # two differ after 4 steps); with init_weights "ema", both from its EMA.
    source = ck.load_checkpoint(src)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert not same(source["model"], source["ema"])
    for choice, model_from in (([], "model"), (["train.init_weights=ema"], "ema")):
        frozen = load_config(tiny_config(tmp_path, f"frozen_{model_from}"), choice + [
            f"train.init_from={src}", "train.max_steps=1", "train.ckpt_every=1", "train.ema_decay=1.0",
            "optimizer.lr=0", "optimizer.min_lr=0", "optimizer.warmup_steps=0", "transport.consistc_ratio=1.0",
            "transport.ema_decay_rate=1.0"])
        capsys.readouterr()
        train(frozen)
        tuned = ck.load_checkpoint(os.path.join(frozen["output_dir"], "checkpoints", "0000001.pt"))
        other = "ema" if model_from == "model" else "model"
        assert same(tuned["model"], source[model_from]) and not same(tuned["model"], source[other]), model_from
        assert same(tuned["ema"], source["ema"]) and not same(tuned["ema"], source["model"]), model_from
        assert "train.ema_decay is 1.0: the EMA weights never move" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_two_cpu_processes_with_gloo(tmp_path, compiled):
    # torchrun of this interpreter (a `torchrun` on PATH may belong to another Python)
    cmd = [sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc_per_node", "2", "-m", "ucgm_fast.train", "--config", tiny_config(tmp_path),
        "train.max_steps=6", "train.ckpt_every=3", f"train.compile={str(compiled).lower()}"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FutureWarning" not in done.stderr
    out = tmp_path / "run"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 6]  # rank 0 alone writes
    payload = ck.load_checkpoint(str(out / "checkpoints" / "0000006.pt"))
    assert payload["world_size"] == 2 and len(payload["rng"]) == 2
    assert not torch.equal(payload["rng"][0]["cpu"], payload["rng"][1]["cpu"])  # ranks draw differently
    assert done.stderr.count("done: step 6") == 1


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = load_config(tiny_config(tmp), ["train.max_steps=4", "train.ckpt_every=4"])
    train(cfg)
    return os.path.join(cfg["output_dir"], "checkpoints", "0000004.pt")


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], env=_env(), capture_output=True, text=True)


def test_sample_cli_writes_a_grid(trained_checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    done = _cli("ucgm_fast.sample_cli", "--ckpt", trained_checkpoint, "--steps", "2", "--out", str(out),
                "--num", "20", "--save-npz", str(tmp_path / "s.npz"))
    assert done.returncode == 0, done.stderr
    from PIL import Image
    assert Image.open(out).size[0] > 64
    import numpy as np
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["samples"].shape == (20, 1, 8, 8) and np.isfinite(arrays["samples"]).all()


def test_sampler_flags_are_checked_before_sampling(trained_checkpoint, tmp_path, capsys):
    from ucgm_fast.eval_cli import main as eval_main
    from ucgm_fast.sample_cli import main as sample_main

    common = ["--ckpt", trained_checkpoint, "--steps", "2", "--num", "4", "--device", "cpu"]
    assert sample_main(common + ["--out", str(tmp_path / "g.png"), "--stochast-ratio", "auto"]) == 0
    for flags, message in ((["--stochast-ratio", "1.5"], "stochast_ratio"), (["--stochast-ratio", "x"], "auto"),
                           (["--cfg-scale", "-1"], "cfg_scale"), (["--time-dist-ctrl", "0", "1", "1"], "time_dist"),
                           (["--cfg-interval", "0.9", "0.1"], "cfg_interval"), (["--cfg-channels", "0"], "cfg_channels")):
        capsys.readouterr()
        assert sample_main(common + ["--out", str(tmp_path / "g.png"), *flags]) == 2, flags
        assert message in capsys.readouterr().err
    # ucgm-eval: 0 is a value (not "use the config's"), and flags fail before the classifier trains.
    cache = ["--cache-dir", str(tmp_path / "never")]
    assert eval_main(["--ckpt", trained_checkpoint, "--steps", "2", "--num", "0", *cache]) == 2
    assert eval_main(["--ckpt", trained_checkpoint, "--steps", "0", *cache]) == 2
    assert eval_main(["--ckpt", trained_checkpoint, "--steps", "6", "--num", "10", "--order", "2",
                      "--rfba-gap-steps", "0", "0.1", *cache]) == 2
    assert "gamma_in" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_config_checks_sampler_and_optimizer_settings():
    for override, message in (("sample.cfg_scale=-1", "cfg_scale"), ("sample.time_dist_ctrl=[0,1,1]", "time_dist"),
                              ("sample.cfg_interval=[0.9,0.1]", "cfg_interval"),
                              ("optimizer.beta1=1.5", "optimizer.beta1"), ("optimizer.eps=-1", "optimizer.eps"),
                              ("optimizer.eps=null", "optimizer.eps"), ("optimizer.beta2=null", "optimizer.beta2")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="gamma_in"):  # order 2 from the noise end (Linear): NaN samples
        load_config(None, ["sample.sampling_order=2", "sample.rfba_gap_steps=[0.0, 0.1]"])


def test_a_symlinked_source_file_and_a_refused_launch_keep_the_checkpoints(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=3", "train.ckpt_every=3"])
    train(cfg)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(os.path.join(cfg["output_dir"], "checkpoints", "0000003.pt"), models / "pretrained.pt")
    ckdir = tmp_path / "tune" / "checkpoints"
    ckdir.mkdir(parents=True)
    os.symlink(models / "pretrained.pt", ckdir / "0000000.pt")  # published layout, source kept elsewhere
    tune = ["train.ckpt=0000000.pt", "train.max_steps=2", "train.ckpt_every=2", "train.keep_last=1"]
    for _ in range(2):  # a second fresh launch still finds its source
        train(load_config(tiny_config(tmp_path, "tune"), tune))
        assert os.path.islink(ckdir / "0000000.pt")
    # A launch refused before it trains leaves the earlier run's checkpoints where they are.
    with pytest.raises(ConfigError, match="global_batch_size"):
        train(load_config(tiny_config(tmp_path, "tune"), tune + ["train.global_batch_size=100000"]))
    assert sorted(p for p in os.listdir(ckdir) if p.endswith(".pt")) == ["0000000.pt", "0000002.pt"]


def test_resume_without_config_when_the_runs_config_no_longer_validates(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=2", "train.ckpt_every=2"])
    train(cfg)
    saved = os.path.join(cfg["output_dir"], "config.yaml")
    with open(saved, encoding="utf-8") as f:
        text = f.read()
    with open(saved, "w", encoding="utf-8") as f:  # e.g. written before a check existed
        f.write(text.replace("cfg_interval: [0.0, 0.75]", "cfg_interval: [0.9, 0.1]"))
    with pytest.raises(ConfigError, match="cfg_interval"):
        load_config(saved)
    assert train_main(["--resume", cfg["output_dir"], "train.max_steps=3"]) == 0


def test_source_checkpoint_among_the_runs_own(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=3", "train.ckpt_every=3"])
    train(cfg)
    src = os.path.join(cfg["output_dir"], "checkpoints", "0000003.pt")
    # Under a step the run would save: refused, rather than overwritten.
    clash = tmp_path / "clash" / "checkpoints"
    clash.mkdir(parents=True)
    shutil.copy(src, clash / "0000003.pt")
    with pytest.raises(ConfigError, match="rename it.*use --resume PATH instead of train.ckpt"):
        train(load_config(tiny_config(tmp_path, "clash"), ["train.ckpt=0000003.pt", "train.max_steps=3"]))
    # --resume RUN without --config: the source is not the run's state (config.yaml names it).
    run = tmp_path / "tune"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(src, run / "checkpoints" / "0000100.pt")  # named past the run's steps: newest by name
    tune = ["train.ckpt=0000100.pt", "transport.consistc_ratio=1.0", "transport.ema_decay_rate=1.0",
            "train.ckpt_every=2", "train.keep_last=1"]
    train(load_config(tiny_config(tmp_path, "tune"), tune + ["train.max_steps=2"]))
    assert train_main(["--resume", str(run), "train.max_steps=4"]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert sorted(os.listdir(run / "checkpoints")) == ["0000004.pt", "0000100.pt"]
    assert ck.load_checkpoint(str(run / "checkpoints" / "0000004.pt"))["config"]["transport"]["consistc_ratio"] == 1.0
    # The same, named by its checkpoints/ folder.
    assert train_main(["--resume", str(run / "checkpoints"), "train.max_steps=6"]) == 0
    assert sorted(os.listdir(run / "checkpoints")) == ["0000006.pt", "0000100.pt"]


def test_sample_cli_names_a_corrupted_checkpoint(trained_checkpoint, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(trained_checkpoint, "rb").read()[:1000])
    done = _cli("ucgm_fast.sample_cli", "--ckpt", str(bad), "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert done.returncode == 2 and str(bad) in done.stderr and "truncated" in done.stderr


@pytest.mark.slow
def test_eval_cli_prints_fd_beside_the_floor(trained_checkpoint, tmp_path):
    done = _cli("ucgm_fast.eval_cli", "--ckpt", trained_checkpoint, "--steps", "2", "--num", "100",
                "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "FD" in done.stdout and "floor at N=100" in done.stdout and "MMD" in done.stdout
    assert "class acc" in done.stdout and "nearest-train-neighbour" in done.stdout
    r = json.load(open(tmp_path / "r.json"))
    assert r["n"] == 100 and r["fd"] > 0 and r["fd_floor"] > 0 and r["steps"] == 2
    # --repeats: one report per sample set, then their mean and spread
    done = _cli("ucgm_fast.eval_cli", "--ckpt", trained_checkpoint, "--steps", "2", "--num", "100", "--repeats", "2",
                "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("real-vs-real floor") == 2 and "mean of 2 sample sets" in done.stdout
    m = json.load(open(tmp_path / "m.json"))
    assert [run["seed"] for run in m["repeats"]] == [0, 1] and m["fd_std"] >= 0
    assert m["fd"] == pytest.approx(sum(run["fd"] for run in m["repeats"]) / 2)
    assert m["repeats"][0]["fd"] == pytest.approx(r["fd"])  # seed 0 is the single run's sample set


def test_resume_a_run_directory_without_its_config_file(tmp_path, monkeypatch):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=3", "train.ckpt_every=3"])
    train(cfg)
    reads = []
    load = ck.load_checkpoint
    monkeypatch.setattr(ck, "load_checkpoint", lambda path, *a, **k: reads.append(path) or load(path, *a, **k))
    assert train_main(["--resume", cfg["output_dir"], "train.max_steps=5", "train.ckpt_every=5"]) == 0
    assert len(reads) == 1  # the checkpoint's config and its state come from one read
    assert ck.latest_checkpoint(os.path.join(cfg["output_dir"], "checkpoints")).endswith("0000005.pt")
    rows = [json.loads(line)["step"] for line in open(os.path.join(cfg["output_dir"], "metrics.jsonl"))]
    assert rows == [3, 5]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def test_resume_without_config_from_elsewhere_stays_in_the_run_directory(tmp_path, monkeypatch, capsys):
    # The stored output_dir is relative to where the run started; a broken latest checkpoint is skipped.
    started = tmp_path / "A"
    started.mkdir()
    monkeypatch.chdir(started)
    train(load_config(tiny_config(tmp_path), ["train.max_steps=6", "train.ckpt_every=3", "train.keep_last=5",
                                              "output_dir=runs/x"]))
    ckdir = started / "runs" / "x" / "checkpoints"
    _truncate(ckdir / "0000006.pt")
    elsewhere = tmp_path / "B"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train_main(["--resume", str(started / "runs" / "x"), "train.max_steps=9", "train.ckpt_every=9"]) == 0
    assert "0000006.pt" in capsys.readouterr().err
    assert not (elsewhere / "runs").exists()
    assert sorted(os.listdir(ckdir)) == ["0000003.pt", "0000009.pt", "superseded"]
    assert os.listdir(ckdir / "superseded") == ["0000006.pt"]  # the broken one, from the abandoned steps 4-6


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=6", "train.ckpt_every=3", "train.keep_last=5"])
    train(cfg)
    ckdir = os.path.join(cfg["output_dir"], "checkpoints")
    again = load_config(tiny_config(tmp_path), ["train.max_steps=5", "train.ckpt_every=1", "train.keep_last=1"])
    summary = train(again, resume=os.path.join(ckdir, "0000003.pt"))
    assert "moved 1 later checkpoint" in capsys.readouterr().err
    # Pruning keeps the highest steps: left in place, the old 0000006.pt would have deleted the new ones.
    assert sorted(os.listdir(ckdir)) == ["0000005.pt", "superseded"] and os.path.isfile(summary["checkpoint"])
    assert os.listdir(os.path.join(ckdir, "superseded")) == ["0000006.pt"]


def test_resume_applies_the_configs_optimizer_settings(tmp_path, capsys):
    train(load_config(tiny_config(tmp_path), ["train.max_steps=2", "train.ckpt_every=2"]))
    ckdir = tmp_path / "run" / "checkpoints"
    train(load_config(tiny_config(tmp_path), ["train.max_steps=4", "train.ckpt_every=2", "optimizer.weight_decay=0.5",
                                              "optimizer.beta2=0.9", "optimizer.eps=0.001"]), resume="")
    opt = ck.load_checkpoint(str(ckdir / "0000004.pt"))["optimizer"]
    group = opt["param_groups"][0]
    assert group["weight_decay"] == 0.5 and tuple(group["betas"]) == (0.9, 0.9) and group["eps"] == 0.001
    assert float(opt["state"][0]["step"]) == 4  # the moments went on from the checkpoint
    # Another optimizer type: its moments would not mean the same, so it starts afresh (and says so).
    train(load_config(tiny_config(tmp_path), ["train.max_steps=6", "train.ckpt_every=2", "optimizer.type=RAdam"]),
          resume="")
    assert "optimizer starts afresh" in capsys.readouterr().err
    opt = ck.load_checkpoint(str(ckdir / "0000006.pt"))["optimizer"]
    assert float(opt["state"][0]["step"]) == 2 and "fused" not in opt["param_groups"][0]


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path, capsys):
    # Pruning keeps the highest steps: left in place, a longer earlier run's checkpoints would make it
    # delete each new one as it is written (and a later --resume continue the old run).
    common = ["train.ckpt_every=3", "train.keep_last=2"]
    train(load_config(tiny_config(tmp_path), common + ["train.max_steps=9"]))
    ckdir = tmp_path / "run" / "checkpoints"
    summary = train(load_config(tiny_config(tmp_path), common + ["train.max_steps=6"]))
    assert "moved 2 checkpoint(s) of an earlier run" in capsys.readouterr().err
    assert sorted(os.listdir(ckdir)) == ["0000003.pt", "0000006.pt", "superseded"]
    assert os.path.isfile(summary["checkpoint"])
    train(load_config(tiny_config(tmp_path), common + ["train.max_steps=3"]))  # again: nothing overwritten
    assert sorted(os.listdir(ckdir / "superseded")) == ["0000003.pt", "0000006.1.pt", "0000006.pt", "0000009.pt"]


def test_source_checkpoint_is_recognised_through_a_symlinked_run_folder(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=1", "train.ckpt_every=1"])
    train(cfg)
    real = tmp_path / "real" / "checkpoints"
    real.mkdir(parents=True)
    src = real / "0000000.pt"
    shutil.copy(os.path.join(cfg["output_dir"], "checkpoints", "0000001.pt"), src)
    os.symlink(tmp_path / "real", tmp_path / "link")
    train(load_config(tiny_config(tmp_path, "tune"), [f"output_dir={tmp_path / 'link'}", f"train.init_from={src}",
                                                      "train.max_steps=3", "train.ckpt_every=1", "train.keep_last=1"]))
    assert sorted(os.listdir(real)) == ["0000000.pt", "0000003.pt"]  # the user's source model survives


def test_published_ckpt_among_the_runs_checkpoints_is_neither_resumed_nor_pruned(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=4", "train.ckpt_every=4"])
    train(cfg)
    ckdir = tmp_path / "tune" / "checkpoints"
    ckdir.mkdir(parents=True)
    # Published layout: train.ckpt names a file in the run's own checkpoints/ (here with a step past the run's).
    shutil.copy(os.path.join(cfg["output_dir"], "checkpoints", "0000004.pt"), ckdir / "0000100.pt")
    tune = ["train.ckpt=0000100.pt", "train.ckpt_every=1", "train.keep_last=1", "transport.consistc_ratio=1.0",
            "transport.ema_decay_rate=1.0"]
    train(load_config(tiny_config(tmp_path, "tune"), tune + ["train.max_steps=3"]))
    assert sorted(os.listdir(ckdir)) == ["0000003.pt", "0000100.pt"]
    summary = train(load_config(tiny_config(tmp_path, "tune"), tune + ["train.max_steps=4"]), resume="")
    assert summary["step"] == 4
    assert sorted(os.listdir(ckdir)) == ["0000004.pt", "0000100.pt"]


def test_sample_cli_seed_defaults_to_the_configs(tmp_path):
    from ucgm_fast.sample_cli import main as sample_main
    import numpy as np

    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=1", "train.ckpt_every=1", "sample.seed=5"])
    train(cfg)
    src = os.path.join(cfg["output_dir"], "checkpoints", "0000001.pt")

    def draw(*seed):
        out = tmp_path / f"s{len(os.listdir(tmp_path))}.npz"
        assert sample_main(["--ckpt", src, "--steps", "2", "--num", "4", "--device", "cpu", *seed,
                            "--out", str(tmp_path / "g.png"), "--save-npz", str(out)]) == 0
        return np.load(out)["samples"]

    default = draw()
    assert np.array_equal(default, draw("--seed", "5")) and not np.array_equal(default, draw("--seed", "0"))


def test_latent_run_saves_its_scaling_and_sample_npz_maps_back(tmp_path):
    # Trained on scaled latents; the checkpoint keeps the scaling, so --save-npz can give the
    # autoencoder's latents (to decode) even where the latent file is gone.
    from ucgm_fast.sample_cli import main as sample_main
    import numpy as np

    x = np.random.default_rng(0).standard_normal((64, 2, 4, 4)).astype(np.float32) * [[[3.0]], [[0.5]]] + 2
    np.savez(tmp_path / "lat.npz", latents=x.astype(np.float32), labels=np.arange(64) % 4)
    cfg = load_config(tiny_config(tmp_path), [
        "data.name=latents", f"data.data_path={tmp_path / 'lat.npz'}", "data.num_classes=4", "data.image_size=4",
        "data.latent_norm=true", "data.latent_multiplier=0.5", "train.max_steps=1", "train.ckpt_every=1"])
    train(cfg)
    src = os.path.join(cfg["output_dir"], "checkpoints", "0000001.pt")
    stats = ck.load_checkpoint(src)["latent_stats"]
    assert np.allclose(stats["mean"].numpy(), x.mean((0, 2, 3)), atol=1e-5)
    assert np.allclose(stats["std"].numpy(), x.std((0, 2, 3), ddof=1), rtol=1e-5)
    assert stats["multiplier"] == 0.5
    os.remove(tmp_path / "lat.npz")
    out = tmp_path / "s.npz"
    assert sample_main(["--ckpt", src, "--steps", "1", "--num", "3", "--device", "cpu",
                        "--out", str(tmp_path / "g.png"), "--save-npz", str(out)]) == 0
    saved = np.load(out)
    expected = saved["samples"] / 0.5 * x.std((0, 2, 3), ddof=1)[:, None, None] + x.mean((0, 2, 3))[:, None, None]
    assert saved["latents"].shape == (3, 2, 4, 4) and np.allclose(saved["latents"], expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(saved["latent_std"], stats["std"].numpy()) and saved["latent_multiplier"] == 0.5


def test_resume_names_settings_that_change_the_data_order_or_the_learning_rate(tmp_path, capsys):
    common = ["train.ckpt_every=2", "train.keep_last=5", "optimizer.lr_schedule=cosine"]
    train(load_config(tiny_config(tmp_path), common + ["train.max_steps=4"]))
    ckpt = str(tmp_path / "run" / "checkpoints" / "0000002.pt")
    capsys.readouterr()
    train(load_config(tiny_config(tmp_path), common + ["train.max_steps=4"]), resume=ckpt)  # a plain continuation
    err = capsys.readouterr().err
    assert "data order" not in err and "learning rate" not in err
    changed = ["train.max_steps=8", "train.global_batch_size=32", "train.global_seed=5"]
    summary = train(load_config(tiny_config(tmp_path), common + changed), resume=ckpt)
    assert summary["step"] == 8  # warned about, not refused
    err = capsys.readouterr().err
    assert "train.global_batch_size is 32 but the checkpoint's run used 16: the data order changes mid-epoch" in err
    assert "train.global_seed is 5 but the checkpoint's run used 0" in err
    # Cosine over 4 steps: 5e-4 at step 2; over 8 steps: 8.536e-4.
    assert "train.max_steps 4 -> 8" in err and "learning rate jumps from 0.0005 to 0.0008536 at step 2" in err
    # Under a constant schedule a longer run is a plain continuation.
    train(load_config(tiny_config(tmp_path, "flat"), ["train.max_steps=2", "train.ckpt_every=2"]))
    capsys.readouterr()
    train(load_config(tiny_config(tmp_path, "flat"), ["train.max_steps=4", "train.ckpt_every=2"]), resume="")
    assert "learning rate" not in capsys.readouterr().err


def test_logged_speed_leaves_out_checkpoints_and_sample_grids(tmp_path, monkeypatch):
    import ucgm_fast.train as train_mod

    pause = 1.0
    real_save, real_grid = ck.save_checkpoint, train_mod.save_grid
    monkeypatch.setattr(ck, "save_checkpoint", lambda *a, **k: (time.sleep(pause), real_save(*a, **k))[1])
    monkeypatch.setattr(train_mod, "save_grid", lambda *a, **k: (time.sleep(pause), real_grid(*a, **k))[1])
    cfg = load_config(tiny_config(tmp_path), ["train.max_steps=6", "train.log_every=2", "train.ckpt_every=1",
                                              "train.sample_every=1", "train.keep_last=1"])
    train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(cfg["output_dir"], "metrics.jsonl"))]
    # Counted in, each 2-step interval would hold two saves and two grids (4 s): 0.5 steps/s at most. Left
    # out, it holds one step of this model (a few ms; the bound allows 666 ms on a loaded machine).
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(r["steps_per_s"] > 1.5 and r["images_per_s"] == r["steps_per_s"] * 16 for r in rows), rows


def test_resumed_latent_run_keeps_its_scaling(tmp_path):
    # The scaling comes from the checkpoint on resume, not from the data measured again: a latent file
    # (or shard folder) that changed since would otherwise rescale the model's inputs mid-run.
    import numpy as np

    x = np.random.default_rng(0).standard_normal((64, 2, 4, 4)).astype(np.float32) * [[[3.0]], [[0.5]]] + 2
    data = tmp_path / "lat.npz"
    np.savez(data, latents=x.astype(np.float32), labels=np.arange(64) % 4)
    over = ["data.name=latents", f"data.data_path={data}", "data.num_classes=4", "data.image_size=4",
            "data.latent_norm=true", "data.latent_multiplier=0.5", "train.ckpt_every=1", "train.keep_last=5"]
    train(load_config(tiny_config(tmp_path), over + ["train.max_steps=1"]))
    first = ck.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000001.pt"))["latent_stats"]
    np.savez(data, latents=(x * 10 - 3).astype(np.float32), labels=np.arange(64) % 4)  # other statistics
    train(load_config(tiny_config(tmp_path), over + ["train.max_steps=2"]), resume="")
    second = ck.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000002.pt"))["latent_stats"]
    assert torch.equal(second["mean"], first["mean"]) and torch.equal(second["std"], first["std"])
    assert np.allclose(first["mean"].numpy(), x.mean((0, 2, 3)), atol=1e-5)
