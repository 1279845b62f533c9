"""Datasets held in memory as tensors, and an infinite shuffled loader whose position can be saved.

Every dataset is an :class:`ImageDataset`: ``images`` (N, C, H, W) float32 (pixels scaled to [-1, 1];
latents as stored), ``labels`` (N,) int64 in [0, num_classes), ``num_classes``. Nothing is downloaded:

- ``digits``: scikit-learn's ``load_digits`` (1797 8x8 grey digits, 10 classes), a fixed stratified
  80/20 train/held-out split.
- ``fashion-mnist``: Fashion-MNIST (60000 train + 10000 test, 28x28) from the idx gzip files of Debian's
  ``dataset-fashion-mnist`` package (or a directory given as ``root``).
- ``image-folder``: ``root/<class>/<image>``; centre-cropped, resized to ``size``, held out per class.
- ``latents``: a ``.npz`` (arrays ``latents`` and ``labels``) or a ``.npy`` array (+ ``labels`` file), or
  a folder of ``.safetensors`` shards in the published layout, read lazily (:mod:`ucgm_fast.latent_shards`).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

#: Names accepted by :func:`get_dataset`.
DATASETS = ("digits", "fashion-mnist", "image-folder", "latents")
#: Splits accepted by :func:`get_dataset`: "test" is the held-out part.
SPLITS = ("train", "test", "all")
#: Where Debian's dataset-fashion-mnist installs its files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageDataset:
    """images (N, C, H, W) float32 and labels (N,) int64 in [0, num_classes), all in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = ""
    split: str = "all"
    class_names: list = field(default_factory=list)
    #: Latents scaled for training: {"mean": (C,), "std": (C,), "multiplier": float} such that
    #: model space = (latent - mean) / std * multiplier (set by the training config's scaling).
    latent_stats: Optional[dict] = None

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: labels have shape {tuple(self.labels.shape)}; expected "
                             f"({self.images.shape[0]},), one per image")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def item_shape(self) -> tuple:
        """(C, H, W) of one item."""
        return tuple(self.images.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def input_size(self) -> int:
        """The image side (images are square)."""
        return self.images.shape[-1]

    def subset(self, index) -> "ImageDataset":
        """The rows ``index`` (a tensor or array of indices) as a new dataset."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageDataset(self.images[index], self.labels[index], self.num_classes, self.name, self.split,
                            self.class_names)


def holdout_split(labels: torch.Tensor, fraction: float, seed: int = 0):
    """(train, test) index tensors: round(fraction * n_c) of each class c held out, chosen by a seeded permutation."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_test = int(round(fraction * len(rows)))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _select_split(data: ImageDataset, split: str, fraction: float, seed: int) -> ImageDataset:
    if split == "all":
        return data
    if fraction == 0.0:
        if split == "test":
            raise ValueError(f"{data.name}: split='test' needs holdout_fraction > 0")
        data.split = split  # nothing held out: the data itself, not a copy (latent files are large)
        return data
    train, test = holdout_split(data.labels, fraction, seed)
    out = data.subset(train if split == "train" else test)
    out.split = split
    return out


def _limit(data: ImageDataset, limit):
    if limit is None:
        return data
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if limit >= len(data):
        return data
    # A fixed random subset, in the data's order: the first rows of a class-sorted folder are one class.
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit]
    return data.subset(rows.sort().values)


#################################################################################
#                                   Datasets                                    #
#################################################################################

def load_digits(split: str = "train", holdout_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8x8 digits: pixels v in 0..16 mapped to v / 8 - 1 in [-1, 1]; 10 classes."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # scikit-learn is an optional extra
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'ucgm_fast[train]'") from exc
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    data = ImageDataset(images, labels, 10, "digits", "all", [str(i) for i in range(10)])
    return _select_split(data, split, holdout_fraction, seed)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain): big-endian magic (dtype code, ndim), sizes, then the raw array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: not an idx file (too short)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: idx header says shape {shape} but holds {data.size} values (truncated?)")
    return data.reshape(shape)


def fashion_mnist_dir(root=None) -> Path:
    """The directory of the Fashion-MNIST idx files: root, $UCGM_FASHION_MNIST_DIR or Debian's location."""
    root = Path(root or os.environ.get("UCGM_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install Debian's package: "
            "`apt-get install dataset-fashion-mnist` (it puts the idx files in "
            f"{FASHION_MNIST_DIR}), or pass root= / set UCGM_FASHION_MNIST_DIR to a directory holding them.")
    return root


def load_fashion_mnist(split: str = "train", root=None) -> ImageDataset:
    """Fashion-MNIST 28x28: pixels v in 0..255 mapped to v / 127.5 - 1; the official 60000/10000 split."""
    root = fashion_mnist_dir(root)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    parts = []
    for part in (("train", "test") if split == "all" else (split,)):
        img_file, lab_file = FASHION_MNIST_FILES[part]
        images = _read_idx(root / img_file)
        labels = _read_idx(root / lab_file)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{root}: {img_file} holds {images.shape[0]} images but {lab_file} "
                             f"{labels.shape[0]} labels")
        parts.append((images, labels))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    tensor = torch.from_numpy(images.astype(np.float32)).div_(127.5).sub_(1.0).unsqueeze(1)
    return ImageDataset(tensor, torch.from_numpy(labels.astype(np.int64)), 10, "fashion-mnist", split, names)


# Pillow modes with more than 8 bits per sample, and their full-scale value: convert("L") / ("RGB")
# would clip these at 255 instead of rescaling. Pillow opens 16-bit PNG / TIFF as I;16* or I.
_WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
_GREY_MODES = ("1", "L", "LA", "La", *_WIDE_MODES)


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as (channels, size, size) float32 in [0, 255]: centre square, bicubic resize."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _WIDE_MODES:  # one channel of 16/32-bit samples: rescale to [0, 255] in float ("F")
            im = Image.fromarray(np.asarray(im, dtype=np.float32) * np.float32(255.0 / _WIDE_MODES[im.mode]))
        else:
            im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        array = np.asarray(im, dtype=np.float32).reshape(size, size, -1)
    if array.shape[-1] != channels:  # a wide grey image read as RGB
        array = np.repeat(array, channels, axis=-1)
    return np.clip(array, 0.0, 255.0).transpose(2, 0, 1)


def load_image_folder(root, size: int, split: str = "train", channels=3, holdout_fraction: float = 0.1,
                      seed: int = 0) -> ImageDataset:
    """root/<class>/<image>: centre-cropped to a square, resized to size x size, pixels mapped to [-1, 1].

    ``channels`` is 1 (grey), 3 (RGB) or None: 1 when every image is grey, else 3. Images with
    16-bit samples are scaled by their full range (65535), float images by 1.
    """
    from PIL import Image

    if root is None:
        raise ValueError("image-folder: pass root=<directory with one subfolder per class>")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image-folder: {root} is not a directory")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"image-folder: size must be a positive integer, got {size!r}")
    if channels not in (1, 3, None):
        raise ValueError(f"image-folder: channels must be 1 (grey), 3 (RGB) or None (the images'), got {channels!r}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image-folder: {root} has no class subfolders")
    files = [(index, sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
             for index, name in enumerate(classes)]
    if not any(paths for _, paths in files):
        raise ValueError(f"image-folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    if channels is None:  # opening an image reads its header only; the first colour image settles it
        def mode(path):
            with Image.open(path) as im:
                return im.mode
        channels = 1 if all(mode(path) in _GREY_MODES for _, paths in files for path in paths) else 3
    images = [_read_image(path, size, channels) for _, paths in files for path in paths]
    labels = [index for index, paths in files for _ in paths]
    tensor = torch.from_numpy(np.stack(images)).div_(127.5).sub_(1.0)
    data = ImageDataset(tensor, torch.tensor(labels, dtype=torch.int64), len(classes), "image-folder", "all",
                        classes)
    return _select_split(data, split, holdout_fraction, seed)


def load_latents(path, split: str = "train", labels=None, num_classes=None, holdout_fraction: float = 0.0,
                 seed: int = 0) -> ImageDataset:
    """Pre-encoded latents (N, C, H, W) with labels, unscaled: a .npz (latents, labels), a .npy (+ labels
    file), or a folder of .safetensors shards in the published layout.

    A ``.npz`` holds ``latents`` (or ``x`` / ``images``) and ``labels`` (or ``y``). A ``.npy`` holds the
    latents; ``labels`` is then a path to a ``.npy`` of labels or omitted (every label 0, one class).
    Files are read into memory. A folder (``latents``, ``latents_flip``, ``labels`` per shard, as made
    by the published recipes' latent extraction) stays on disk: a lazy
    :class:`ucgm_fast.latent_shards.LatentShards`.
    """
    if path is None:
        raise ValueError("latents: pass path=<.npz or .npy file, or a folder of .safetensors shards>")
    path = Path(path)
    if path.is_dir():
        if labels is not None:
            raise ValueError("latents: a folder of shards holds its own labels; do not pass labels")
        from .latent_shards import LatentShards

        return _select_split(LatentShards(str(path), num_classes), split, holdout_fraction, seed)
    if not path.is_file():
        raise FileNotFoundError(f"latents: {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as archive:
            keys = set(archive.files)
            x_key = next((k for k in ("latents", "x", "images") if k in keys), None)
            y_key = next((k for k in ("labels", "y") if k in keys), None)
            if x_key is None:
                raise ValueError(f"latents: {path} has arrays {sorted(keys)}; expected 'latents' (or 'x' / 'images')")
            x = archive[x_key]
            y = archive[y_key] if y_key else None
    elif path.suffix == ".npy":
        x = np.load(path)
        y = None
    else:
        raise ValueError(f"latents: {path} must be a .npz or .npy file")
    if labels is not None:
        y = np.load(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
    if y is None:
        y = np.zeros(len(x), dtype=np.int64)
    if x.ndim != 4:
        raise ValueError(f"latents: {path} holds an array of shape {x.shape}; expected (N, C, H, W)")
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ValueError(f"latents: labels must be integers, got dtype {np.asarray(y).dtype}")
    y = torch.from_numpy(np.asarray(y).astype(np.int64).reshape(-1))
    if num_classes is None:
        num_classes = int(y.max()) + 1 if len(y) else 1
    data = ImageDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), y, int(num_classes),
                        "latents", "all")
    return _select_split(data, split, holdout_fraction, seed)


def get_dataset(name: str, split: str = "train", limit=None, **kw) -> ImageDataset:
    """The dataset ``name`` (see DATASETS), split "train", "test" (held out) or "all".

    Parameters
    ----------
    name : str
        "digits", "fashion-mnist", "image-folder" (needs ``root``, ``size``) or "latents" (needs ``path``).
    split : str
        "train", "test" or "all".
    limit : int, optional
        Keep only ``limit`` rows (quick runs and tests): a fixed random subset (seed 0), in the data's order.
    **kw
        Passed to the loader: ``holdout_fraction``, ``seed`` (digits, image-folder, latents), ``root``
        (fashion-mnist, image-folder), ``size``, ``channels`` (image-folder), ``path``, ``labels``,
        ``num_classes`` (latents).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    loaders = {"digits": load_digits, "fashion-mnist": load_fashion_mnist, "image-folder": load_image_folder,
               "latents": load_latents}
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key == "fashion":
        key = "fashion-mnist"
    if key not in loaders:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    try:
        data = loaders[key](split=split, **kw)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"get_dataset({name!r}): {exc}") from None
        raise
    return _limit(data, limit)


#################################################################################
#                                     Loader                                    #
#################################################################################

class BatchPlan:
    """Indices of (global step, rank): drop-last epochs of a seeded permutation, sharded by rank.

    Epoch e is ``randperm(N)`` from a generator seeded with (seed, e); global step s reads batch
    ``s mod (N // global_batch)`` of epoch ``s // (N // global_batch)``, and rank r of w takes its
    ``global_batch // w`` slice. The indices are a pure function of (seed, step): resuming at step s
    needs no loader state beyond s, and w ranks together see exactly the global batch one process
    would see.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int = 0, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"train.global_batch_size ({global_batch}) must be divisible by the number of "
                             f"processes ({world})")
        if num_items < global_batch:
            raise ValueError(f"train.global_batch_size ({global_batch}) is larger than the dataset "
                             f"({num_items} items)")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, int(seed)
        self.rank, self.world = rank, world
        self.local_batch = global_batch // world
        self.per_epoch = num_items // global_batch
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            self._perm, self._epoch = torch.randperm(self.num_items, generator=gen), epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's indices for global step ``step`` (0-based)."""
        epoch, pos = divmod(step, self.per_epoch)
        start = pos * self.global_batch + self.rank * self.local_batch
        return self._permutation(epoch)[start:start + self.local_batch]

    def variants(self, step: int, k: int) -> torch.Tensor:
        """This rank's variant (0 .. k-1, e.g. plain / flipped) of each item of step ``step``: drawn
        for the global batch from (seed, step), so resuming and the number of ranks change nothing."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + 500_009 + step * 7919) % (2 ** 63))
        start = self.rank * self.local_batch
        return torch.randint(k, (self.global_batch,), generator=gen)[start:start + self.local_batch]


class _IndexSampler:
    # A batch sampler over steps [start, ...) for torch's DataLoader (workers fetch, the plan decides).
    # A dataset with k variants of each of its N items (published latents: plain and flipped) takes
    # index i + v N for variant v.
    def __init__(self, plan: BatchPlan, start: int, variants: int = 1):
        self.plan, self.start, self.k = plan, start, variants

    def __iter__(self):
        step = self.start
        while True:
            idx = self.plan.indices(step)
            if self.k > 1:
                idx = idx + self.plan.num_items * self.plan.variants(step, self.k)
            yield idx.tolist()
            step += 1


class InfiniteLoader:
    """Endless shuffled (images, labels) batches whose order is a function of (seed, step) only.

    Batches follow a :class:`BatchPlan` (a batch never spans two epochs: every batch has the same
    shape, one compiled graph). ``batch_size`` is per process; with ``world_size > 1`` the ranks'
    batches partition one global batch of ``batch_size * world_size``. A dataset holding
    ``images``/``labels`` tensors (an :class:`ImageDataset`) is indexed directly -- moved to
    ``device`` once when it is under ``max_device_bytes`` -- any other map-style dataset of (x, y)
    items goes through ``torch.utils.data.DataLoader`` with ``num_workers`` workers; when it has
    ``variants = k`` versions of each item (index ``i + v * len(dataset)``), the plan picks one at random
    per draw. Resume with ``start=step`` or ``load_state_dict``.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, device=None, rank: int = 0, world_size: int = 1,
                 start: int = 0, num_workers: int = 0, max_device_bytes: int = 2 << 30):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(dataset) // world_size} samples per "
                             f"rank ({len(dataset)} samples, world_size={world_size})")
        self.plan = BatchPlan(len(dataset), batch_size * world_size, seed=seed, rank=rank, world=world_size)
        self.batches_per_epoch = self.plan.per_epoch
        self.dataset, self.num_workers, self.step = dataset, num_workers, int(start)
        self.device = torch.device(device) if device is not None else None
        self._x = self._y = self._it = None
        if isinstance(getattr(dataset, "images", None), torch.Tensor):
            self._x, self._y = dataset.images, dataset.labels
            if self.device is not None and self.device.type != "cpu" and \
                    self._x.numel() * self._x.element_size() <= max_device_bytes:
                # A small dataset lives on the accelerator: no host->device copy per step.
                self._x, self._y = self._x.to(self.device), self._y.to(self.device)

    def __iter__(self):
        return self

    def __next__(self):
        if self._x is not None:
            idx = self.plan.indices(self.step).to(self._x.device, non_blocking=True)
            x, y = self._x[idx], self._y[idx]
        else:
            if self._it is None:
                self._it = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=_IndexSampler(self.plan, self.step, getattr(self.dataset, "variants", 1)),
                    num_workers=self.num_workers,
                    # Its own generator: the DataLoader draws a seed when iteration starts, which would
                    # otherwise come from (and shift) the global one, so a resumed run would draw differently.
                    generator=torch.Generator().manual_seed(self.plan.seed),
                    persistent_workers=self.num_workers > 0))
            x, y = next(self._it)[:2]
        self.step += 1
        if self.device is not None:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def state_dict(self) -> dict:
        """{seed, step, epoch, position}: enough to continue with the very next batch."""
        epoch, position = divmod(self.step, self.plan.per_epoch)
        return {"seed": self.plan.seed, "step": self.step, "epoch": epoch, "position": position}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a state_dict(); the seed must be the one this loader was made with."""
        missing = {"seed", "step"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {', '.join(sorted(missing))}")
        if int(state["seed"]) != self.plan.seed:
            raise ValueError(f"loader state has seed {state['seed']} but this loader uses seed {self.plan.seed}")
        self.step, self._it = int(state["step"]), None
