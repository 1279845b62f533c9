"""Datasets (digits, fashion-mnist, image-folder, latents) and the resumable infinite loader."""
import gzip
import struct

import numpy as np
import pytest
import torch

from ucgm_fast import data as data_module
from ucgm_fast.data import ImageDataset, InfiniteLoader, get_dataset


def test_digits_splits_are_disjoint_deterministic_and_scaled():
    train, test, full = get_dataset("digits"), get_dataset("digits", split="test"), get_dataset("digits", split="all")
    assert len(full) == 1797 and len(train) + len(test) == 1797
    assert 0.19 < len(test) / len(full) < 0.21
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert float(full.images.min()) == -1.0 and float(full.images.max()) == 1.0
    assert (train.in_channels, train.input_size) == (1, 8)
    # Every class is held out in proportion (stratified).
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 34
    # Disjoint: no held-out image appears in the train split (digits has no exact duplicates across them).
    a = {tuple(r.tolist()) for r in train.images.flatten(1)}
    assert sum(tuple(r.tolist()) in a for r in test.images.flatten(1)) <= 2
    again = get_dataset("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_get_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits.*fashion-mnist"):
        get_dataset("cifar")
    with pytest.raises(ValueError, match="split must be one of"):
        get_dataset("digits", split="val")
    with pytest.raises(TypeError, match="get_dataset.*size"):
        get_dataset("digits", size=16)
    with pytest.raises(ValueError, match="limit"):
        get_dataset("digits", limit=0)
    assert len(get_dataset("digits", limit=10)) == 10


def test_image_dataset_validates_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 3]), 3, "x")
    with pytest.raises(ValueError, match="one per image"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0]), 3, "x")


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_from_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 5), ("test", 3)):
        img, lab = data_module.FASHION_MNIST_FILES[part]
        write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / lab, rng.integers(0, 10, n))
    train = get_dataset("fashion-mnist", root=tmp_path)
    test = get_dataset("fashion-mnist", split="test", root=tmp_path)
    assert train.images.shape == (5, 1, 28, 28) and len(test) == 3
    assert train.images.min() >= -1 and train.images.max() <= 1
    raw = data_module._read_idx(tmp_path / data_module.FASHION_MNIST_FILES["train"][0])
    torch.testing.assert_close(train.images[:, 0], torch.from_numpy(raw / 127.5 - 1).float())
    assert len(get_dataset("fashion-mnist", split="all", root=tmp_path)) == 8


def test_fashion_mnist_truncated_file_is_named(tmp_path):
    for part in ("train", "test"):
        img, lab = data_module.FASHION_MNIST_FILES[part]
        write_idx(tmp_path / img, np.zeros((4, 28, 28)))
        write_idx(tmp_path / lab, np.zeros(4))
    bad = tmp_path / data_module.FASHION_MNIST_FILES["train"][0]
    raw = gzip.open(bad).read()
    with gzip.open(bad, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        get_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.skipif(not (data_module.Path(data_module.FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    test = get_dataset("fashion-mnist", split="test")
    assert test.images.shape == (10000, 1, 28, 28) and test.num_classes == 10
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert float(test.images.min()) == -1.0 and float(test.images.max()) == 1.0


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in (("cat", 6), ("dog", 4)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    full = get_dataset("image-folder", split="all", root=tmp_path, size=8)
    assert full.images.shape == (10, 3, 8, 8) and full.num_classes == 2
    assert full.class_names == ["cat", "dog"] and full.labels.tolist() == [0] * 6 + [1] * 4
    assert full.images.min() >= -1 and full.images.max() <= 1
    train = get_dataset("image-folder", root=tmp_path, size=8, holdout_fraction=0.5)
    test = get_dataset("image-folder", split="test", root=tmp_path, size=8, holdout_fraction=0.5)
    assert len(train) == len(test) == 5
    grey = get_dataset("image-folder", split="all", root=tmp_path, size=4, channels=1)
    assert grey.images.shape == (10, 1, 4, 4)
    with pytest.raises(ValueError, match="no class subfolders"):
        get_dataset("image-folder", root=tmp_path / "cat", size=8)
    with pytest.raises(ValueError, match="channels"):
        get_dataset("image-folder", root=tmp_path, size=8, channels=2)


def test_image_folder_wide_samples_grey_detection_and_limit(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ramp = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a" / "wide.png")  # 16-bit grey
    for i in range(4):
        Image.fromarray(np.full((2, 2), 64 * i, dtype=np.uint8)).save(tmp_path / "b" / f"{i}.png")
    # 16-bit samples are scaled by their full range, not clipped at 255 (which made them all white)
    grey = get_dataset("image-folder", split="all", root=tmp_path, size=2, channels=None)
    assert grey.images.shape == (5, 1, 2, 2)  # every image grey: one channel
    expected = torch.tensor(ramp / 65535.0 * 2 - 1, dtype=torch.float32)
    assert torch.allclose(grey.images[0, 0], expected, atol=1e-5)
    rgb = get_dataset("image-folder", split="all", root=tmp_path, size=2, channels=3)
    assert torch.allclose(rgb.images[0], expected.expand(3, 2, 2), atol=1e-5)
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "b" / "colour.png")
    assert get_dataset("image-folder", split="all", root=tmp_path, size=2, channels=None).in_channels == 3
    # limit takes a fixed subset across the folder, not the first rows (all of the first class)
    lim = get_dataset("image-folder", split="all", root=tmp_path, size=2, limit=3)
    assert len(lim) == 3 and lim.labels.tolist() != [0, 0, 0]
    assert torch.equal(lim.labels, get_dataset("image-folder", split="all", root=tmp_path, size=2, limit=3).labels)


def test_latents_npz_and_npy(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 4, 4, 4)).astype(np.float32) * 5
    y = np.arange(12) % 3
    np.savez(tmp_path / "lat.npz", latents=x, labels=y)
    data = get_dataset("latents", split="all", path=tmp_path / "lat.npz")
    assert torch.equal(data.images, torch.from_numpy(x)) and data.labels.tolist() == y.tolist()
    assert data.num_classes == 3  # latents are not rescaled
    np.save(tmp_path / "lat.npy", x)
    np.save(tmp_path / "lab.npy", y)
    data = get_dataset("latents", split="all", path=tmp_path / "lat.npy", labels=tmp_path / "lab.npy",
                       num_classes=5)
    assert data.num_classes == 5 and data.labels.tolist() == y.tolist()
    unlabeled = get_dataset("latents", path=tmp_path / "lat.npy")
    assert unlabeled.num_classes == 1 and unlabeled.labels.eq(0).all()
    held = get_dataset("latents", split="test", path=tmp_path / "lat.npz", holdout_fraction=0.25)
    assert len(held) == 3
    np.savez(tmp_path / "bad.npz", z=x)
    with pytest.raises(ValueError, match="expected 'latents'"):
        get_dataset("latents", path=tmp_path / "bad.npz")
    np.save(tmp_path / "flat.npy", x.reshape(12, -1))
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\)"):
        get_dataset("latents", path=tmp_path / "flat.npy")


def small_dataset(n=10):
    return ImageDataset(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.arange(n) % 2, 2, "toy")


def test_loader_epochs_cover_the_data_and_reshuffle():
    loader = InfiniteLoader(small_dataset(), batch_size=3, seed=1)
    assert loader.batches_per_epoch == 3
    epoch0 = torch.cat([next(loader)[0].flatten() for _ in range(3)])
    epoch1 = torch.cat([next(loader)[0].flatten() for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9  # no repeats within an epoch
    assert not torch.equal(epoch0, epoch1)
    x, y = next(loader)
    assert x.shape == (3, 1, 1, 1) and y.dtype == torch.int64
    assert torch.equal(y, x.flatten().long() % 2)  # labels travel with their images


def test_loader_resume_is_exact():
    straight = InfiniteLoader(small_dataset(), batch_size=4, seed=7)
    expected = [next(straight)[0] for _ in range(9)]
    first = InfiniteLoader(small_dataset(), batch_size=4, seed=7)
    got = [next(first)[0] for _ in range(5)]
    state = first.state_dict()
    resumed = InfiniteLoader(small_dataset(), batch_size=4, seed=7)
    resumed.load_state_dict(state)
    got += [next(resumed)[0] for _ in range(4)]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        InfiniteLoader(small_dataset(), batch_size=4, seed=8).load_state_dict(state)


def test_loader_ranks_partition_each_epoch():
    ranks = [InfiniteLoader(small_dataset(), batch_size=5, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([next(loader)[0].flatten() for loader in ranks])
    assert sorted(seen.tolist()) == list(range(10))


def test_loader_errors():
    with pytest.raises(ValueError, match="batch_size=11 is larger"):
        InfiniteLoader(small_dataset(), batch_size=11)
    with pytest.raises(ValueError, match="batch_size must be"):
        InfiniteLoader(small_dataset(), batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        InfiniteLoader(small_dataset(), batch_size=1, rank=2, world_size=2)
