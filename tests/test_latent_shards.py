"""Latent folders in the published layout (.safetensors shards with latents, latents_flip, labels)."""
import json
import os

import numpy as np
import pytest
import torch

from ucgm_fast.config import ConfigError, load_config
from ucgm_fast.data import InfiniteLoader, get_dataset
from ucgm_fast.latent_shards import LatentShards

st = pytest.importorskip("safetensors.torch", reason="writes the test shards with the safetensors package")

SIZES = (5, 1, 7)  # awkward shard sizes


def write_shards(root, dtype=torch.float32, sizes=SIZES, flip=True, shape=(3, 2, 2), seed=0):
    """Shards whose flipped latents are the negated plain ones; returns (latents, labels) of all of them."""
    os.makedirs(root, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for k, n in enumerate(sizes):
        x = (torch.randn(n, *shape, generator=g) * torch.tensor([3.0, 0.5, 1.0][:shape[0]]).view(-1, 1, 1) + 2)
        x = x.to(dtype)
        y = torch.randint(0, 4, (n,), generator=g)
        arrays = {"latents": x.contiguous(), "labels": y}
        if flip:
            arrays["latents_flip"] = (-x).contiguous()
        st.save_file(arrays, os.path.join(root, f"latents_rank00_shard{k:03d}.safetensors"))
        xs.append(x.float())
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_items_are_the_shards_rows_and_their_flips(tmp_path, dtype):
    x, y = write_shards(tmp_path, dtype)
    data = LatentShards(str(tmp_path))
    n = len(x)
    assert len(data) == n and data.item_shape == (3, 2, 2) and data.variants == 2 and data.num_classes == 4
    assert torch.equal(data.labels, y)
    for i in range(n):
        xi, yi = data[i]
        assert xi.dtype == torch.float32 and torch.equal(xi, x[i]) and int(yi) == int(y[i])
        assert torch.equal(data[i + n][0], -x[i])
    with pytest.raises(IndexError):
        data[2 * n]


def test_flips_only_when_every_shard_has_them(tmp_path):
    write_shards(tmp_path / "a", sizes=(3,), flip=True)
    assert LatentShards(str(tmp_path / "a")).variants == 2
    st.save_file({"latents": torch.zeros(2, 3, 2, 2), "labels": torch.zeros(2, dtype=torch.int64)},
                 str(tmp_path / "a" / "z.safetensors"))  # a second shard without flips
    assert LatentShards(str(tmp_path / "a")).variants == 1
    write_shards(tmp_path / "b", sizes=(3,))
    assert LatentShards(str(tmp_path / "b"), flip=False).variants == 1


def test_splits_subsets_and_limit(tmp_path):
    x, y = write_shards(tmp_path, sizes=(20, 13))
    train = get_dataset("latents", path=str(tmp_path), holdout_fraction=0.25, split="train")
    test = get_dataset("latents", path=str(tmp_path), holdout_fraction=0.25, split="test")
    assert len(train) + len(test) == len(x)
    rows = {tuple(train[i][0].flatten().tolist()) for i in range(len(train))}
    rows |= {tuple(test[i][0].flatten().tolist()) for i in range(len(test))}
    assert rows == {tuple(r.flatten().tolist()) for r in x}
    assert torch.equal(train[len(train)][0], -train[0][0])  # a subset keeps the flipped variant
    small = get_dataset("latents", path=str(tmp_path), limit=6)
    assert len(small) == 6 and len(small.labels) == 6
    with pytest.raises(ValueError, match="holdout_fraction"):
        get_dataset("latents", path=str(tmp_path), split="test")


def test_bad_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        LatentShards(str(tmp_path / "empty"))
    write_shards(tmp_path / "trunc", sizes=(4,))
    path = tmp_path / "trunc" / "latents_rank00_shard000.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)
    with pytest.raises(ValueError, match="truncated"):
        LatentShards(str(tmp_path / "trunc"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        LatentShards(str(tmp_path / "junk"))
    (tmp_path / "nolabels").mkdir()
    st.save_file({"latents": torch.zeros(2, 1, 2, 2)}, str(tmp_path / "nolabels" / "a.safetensors"))
    with pytest.raises(ValueError, match="'labels'"):
        LatentShards(str(tmp_path / "nolabels"))
    write_shards(tmp_path / "mixed", sizes=(2,))
    st.save_file({"latents": torch.zeros(2, 3, 4, 4), "labels": torch.zeros(2, dtype=torch.int64)},
                 str(tmp_path / "mixed" / "z.safetensors"))
    with pytest.raises(ValueError, match="earlier shards"):
        LatentShards(str(tmp_path / "mixed"))
    # Byte ranges that are negative or overlap (the real reader rejects both; read, they are garbage).
    for name, table in (("negative", {"latents": {"dtype": "F32", "shape": [1, 1, 2, 2], "data_offsets": [-16, 0]}}),
                        ("overlap", {"latents": {"dtype": "F32", "shape": [1, 1, 2, 2], "data_offsets": [0, 16]},
                                     "labels": {"dtype": "U8", "shape": [1], "data_offsets": [8, 9]}}),
                        ("notatable", [1, 2]),
                        ("nooffsets", {"latents": {"dtype": "F32", "shape": [1, 1, 2, 2]}})):
        header = json.dumps(table).encode()
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(32))
        with pytest.raises(ValueError, match="overlap|inconsistent|not a table"):
            LatentShards(str(tmp_path / name))
    write_shards(tmp_path / "classes", sizes=(6,))
    with pytest.raises(ValueError, match="labels must lie"):
        LatentShards(str(tmp_path / "classes"), num_classes=2)


def _config(root, *extra):
    return load_config(None, ["data.name=latents", f"data.data_path={root}", "data.num_classes=4",
                              "data.image_size=2", *extra])


def test_channel_stats_of_a_folder_without_items_name_it(tmp_path):
    write_shards(tmp_path / "none", sizes=(0,))
    with pytest.raises(ValueError, match="holds no items"):
        LatentShards(str(tmp_path / "none")).channel_stats()


def test_build_dataset_scales_as_read_with_computed_or_published_stats(tmp_path):
    from ucgm_fast.train import build_dataset

    x, _ = write_shards(tmp_path)
    data = build_dataset(_config(tmp_path, "data.latent_norm=true", "data.latent_multiplier=0.5"))
    mean, std = x.double().mean((0, 2, 3)), x.double().std((0, 2, 3))
    assert torch.allclose(data.latent_stats["mean"].double(), mean, atol=1e-6)
    assert torch.allclose(data.latent_stats["std"].double(), std, rtol=1e-6)
    expected = (x - mean.float().view(-1, 1, 1)) / std.float().view(-1, 1, 1) * 0.5
    assert torch.allclose(data[3][0], expected[3], atol=1e-5)
    # The published cache, shaped (1, C, 1, 1), wins over computing.
    torch.save({"mean": torch.full((1, 3, 1, 1), 1.0), "std": torch.full((1, 3, 1, 1), 2.0)},
               tmp_path / "latents_stats.pt")
    data = build_dataset(_config(tmp_path, "data.latent_norm=true"))
    assert torch.equal(data[0][0], (x[0] - 1) / 2)
    # Without latent_norm only the multiplier applies.
    data = build_dataset(_config(tmp_path, "data.latent_multiplier=0.25"))
    assert torch.equal(data[1][0], x[1] * 0.25) and torch.equal(data.latent_stats["std"], torch.ones(3))
    with pytest.raises(ConfigError, match="no held-out split"):
        build_dataset(_config(tmp_path), "test")


def test_loader_draws_flips_from_seed_and_step(tmp_path):
    x, _ = write_shards(tmp_path, sizes=(9, 7))
    data = LatentShards(str(tmp_path))
    full = InfiniteLoader(data, 8, seed=3)
    batches = [next(full)[0] for _ in range(6)]
    plain = {tuple(r.flatten().tolist()) for r in x}
    flipped = {tuple((-r).flatten().tolist()) for r in x}
    rows = [tuple(r.flatten().tolist()) for b in batches for r in b]
    assert all(r in plain or r in flipped for r in rows)
    assert 10 < sum(r in flipped for r in rows) < 38  # both kinds, about half each
    resumed = InfiniteLoader(data, 8, seed=3, start=4)
    assert torch.equal(next(resumed)[0], batches[4])
    ranks = [InfiniteLoader(data, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for b in batches[:3]:
        assert torch.equal(torch.cat([next(ranks[0])[0], next(ranks[1])[0]]), b)
    workers = InfiniteLoader(data, 8, seed=3, num_workers=1)
    assert torch.equal(next(workers)[0], batches[0])  # a worker process reads the same (maps re-opened)


def test_training_runs_on_a_shard_folder(tmp_path):
    import yaml
    from ucgm_fast import checkpoint as ck
    from ucgm_fast.train import train

    x, _ = write_shards(tmp_path / "lat", sizes=(12, 9), shape=(2, 4, 4))
    cfg = {"output_dir": str(tmp_path / "run"),
           "data": {"name": "latents", "data_path": str(tmp_path / "lat"), "num_classes": 4, "image_size": 4,
                    "latent_norm": True},
           "model": {"type": "DiT-S/2", "options": {"depth": 1, "hidden_size": 16, "num_heads": 2}},
           "train": {"max_steps": 2, "global_batch_size": 8, "ckpt_every": 2, "grid_size": 4, "threads": 1,
                     "progress": False},
           "sample": {"sampling_steps": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    summary = train(load_config(str(tmp_path / "c.yaml")))
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    stats = ck.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000002.pt"))["latent_stats"]
    assert torch.allclose(stats["mean"].double(), x.double().mean((0, 2, 3)), atol=1e-6)


def test_unsigned_labels_and_a_bounded_number_of_open_files(tmp_path, monkeypatch):
    from ucgm_fast import latent_shards

    g = torch.Generator().manual_seed(0)
    xs = []
    for k in range(12):
        x = torch.randn(2, 1, 2, 2, generator=g)
        st.save_file({"latents": x, "labels": torch.tensor([k % 3, 1], dtype=torch.uint16)},
                     str(tmp_path / f"s{k:02d}.safetensors"))
        xs.append(x)
    monkeypatch.setattr(latent_shards, "OPEN_SHARDS", 3)
    fds = len(os.listdir("/proc/self/fd"))
    data = LatentShards(str(tmp_path))
    assert data.labels.tolist()[:4] == [0, 1, 1, 1] and data.variants == 1
    for i in range(len(data)):
        assert torch.equal(data[i][0], xs[i // 2][i % 2])
    assert len(os.listdir("/proc/self/fd")) <= fds + 3  # not one per shard (ImageNet-21k: ~1400 shards)


def test_a_resumed_run_on_a_shard_folder_is_bit_exact(tmp_path):
    import yaml
    from ucgm_fast import checkpoint as ck
    from ucgm_fast.train import train

    write_shards(tmp_path / "lat", sizes=(12, 9), shape=(2, 4, 4))
    cfg = {"data": {"name": "latents", "data_path": str(tmp_path / "lat"), "num_classes": 4, "image_size": 4},
           "model": {"type": "DiT-S/2", "options": {"depth": 1, "hidden_size": 16, "num_heads": 2}},
           "train": {"max_steps": 4, "global_batch_size": 8, "ckpt_every": 2, "grid_size": 4, "threads": 1,
                     "progress": False, "keep_last": 5},
           "transport": {"enhanced_ratio": 0.5}, "sample": {"sampling_steps": 1}}
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(dict(cfg, output_dir=str(tmp_path / name))))
    train(load_config(str(tmp_path / "a.yaml")))
    b = load_config(str(tmp_path / "b.yaml"), ["train.max_steps=2"])
    train(b)
    train(load_config(str(tmp_path / "b.yaml")), resume="")
    final = [ck.load_checkpoint(str(tmp_path / n / "checkpoints" / "0000004.pt")) for n in ("a", "b")]
    for key in ("model", "ema"):
        for k, v in final[0][key].items():
            assert torch.equal(v, final[1][key][k]), (key, k)
