"""Latent datasets in the published layout: a folder of ``.safetensors`` shards, read lazily.

The published UCGM recipes train on ``data.data_path`` = a folder made by LightningDiT's latent
extraction (its ``ImgLatentDataset``): shards holding ``latents`` (N, C, H, W), ``latents_flip``
(the latents of the horizontally flipped images) and ``labels`` (N,), and optionally
``latents_stats.pt`` ({"mean", "std"}, shaped (1, C, 1, 1)). ImageNet's latents are tens of GB, so
they stay on disk: each shard's arrays are memory-mapped (the OS pages rows in as they are read)
and only the labels are held in memory. Nothing here needs the ``safetensors`` package: the format
is an 8-byte header length, a JSON table of (dtype, shape, byte range) and the raw arrays.

As published, every draw of an item takes the plain or the flipped latents at random; here the
choice is part of the loader's batch plan (a function of the seed and step), so a resumed run
draws the same flips (:class:`ucgm_fast.data.InfiniteLoader`).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["LatentShards", "read_safetensors_table", "STATS_FILE"]

#: The published cache of the latents' per-channel statistics, read when present.
STATS_FILE = "latents_stats.pt"
#: Items the statistics are computed over when there is no cache (as published: at most 10000).
STATS_ITEMS = 10000

# safetensors dtype names -> numpy dtypes (bfloat16 is read as its 16 raw bits).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


def read_safetensors_table(path: str) -> Dict[str, Tuple[str, tuple, int]]:
    """{name: (dtype name, shape, absolute byte offset)} of a ``.safetensors`` file, checked against its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"latents: {path} is not a safetensors file (bad header length)")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"latents: {path} is not a safetensors file ({err})") from None
    out = {}
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype in _DTYPES:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if end - begin != nbytes or 8 + n + end > size:
                raise ValueError(f"latents: {path}: array {name!r} ({dtype}, {list(shape)}) is truncated or "
                                 "inconsistent with its byte range")
        out[name] = (dtype, shape, 8 + n + begin)
    return out


def _array(path: str, entry) -> np.ndarray:
    dtype, shape, offset = entry
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, _DTYPES[dtype])
    return np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=offset, shape=shape)


def _as_float(rows: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(rows))  # a copy: memory maps are read-only
    return (t.view(torch.bfloat16) if dtype == "BF16" else t).float()


class LatentShards(torch.utils.data.Dataset):
    """A folder of ``.safetensors`` latent shards (``latents``, ``latents_flip``, ``labels``), read lazily.

    Item ``i`` of ``len(self) = N`` is (latents[i], label); ``i + N`` is the same item's flipped
    latents (when every shard has them: ``variants == 2``). Each read applies the training scaling
    set by :meth:`set_scaling`: (latent - mean) / std * multiplier.

    Parameters
    ----------
    root : str
        The folder; its ``*.safetensors`` files, in name order, are the data.
    num_classes : int, optional
        Labels must lie in [0, num_classes); default: max label + 1.
    flip : bool
        Use the shards' ``latents_flip`` (as published) when they all have it.
    """

    name = "latents"
    latent_stats = None  # the scaling, as a checkpoint records it (set by the training config)

    def __init__(self, root: str, num_classes: Optional[int] = None, flip: bool = True):
        files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"latents: {root} holds no .safetensors files (the published latent layout)")
        self.root, self.files, self.split, self.class_names = root, files, "all", []
        self._tables, counts, labels = [], [], []
        item_shape, has_flip = None, True
        for path in files:
            table = read_safetensors_table(path)
            for key in ("latents", "labels"):
                if key not in table:
                    raise ValueError(f"latents: {path} has arrays {sorted(table)}; expected 'latents' and 'labels'")
            dtype, shape, _ = table["latents"]
            if dtype not in ("F64", "F32", "F16", "BF16") or len(shape) != 4:
                raise ValueError(f"latents: {path}: 'latents' must be a float array (N, C, H, W), "
                                 f"got {dtype} {list(shape)}")
            if item_shape is not None and shape[1:] != item_shape:
                raise ValueError(f"latents: {path} holds latents of shape {list(shape[1:])}, the earlier shards "
                                 f"{list(item_shape)}")
            item_shape = shape[1:]
            y_dtype = table["labels"][0]
            y = _array(path, table["labels"]) if y_dtype in _DTYPES else None
            if y is None or y.shape != shape[:1] or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"latents: {path}: 'labels' must be {shape[0]} integers, got "
                                 f"{y_dtype} {list(table['labels'][1])}")
            flip_entry = table.get("latents_flip")
            has_flip = has_flip and flip_entry is not None and flip_entry[:2] == (dtype, shape)
            self._tables.append(table)
            counts.append(shape[0])
            labels.append(np.asarray(y, dtype=np.int64))
        self.item_shape = tuple(item_shape)
        self.labels = torch.from_numpy(np.concatenate(labels))
        self.num_classes = int(num_classes) if num_classes is not None else int(self.labels.max()) + 1 \
            if len(self.labels) else 1
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(f"latents: labels must lie in [0, {self.num_classes}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        self.variants = 2 if flip and has_flip else 1
        self._starts = np.cumsum([0] + counts)
        self._rows = None  # a subset's rows of the whole folder (None: all)
        self._maps: Dict[Tuple[int, str], np.ndarray] = {}
        self.set_scaling(torch.zeros(self.item_shape[0]), torch.ones(self.item_shape[0]), 1.0)

    # Memory maps stay out of pickles (DataLoader workers open their own).
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def set_scaling(self, mean: torch.Tensor, std: torch.Tensor, multiplier: float) -> None:
        """Reads return (latent - mean) / std * multiplier; mean and std are per channel, shape (C,)."""
        shape = (-1, 1, 1)
        self._mean = mean.float().reshape(shape)
        self._std = std.float().reshape(shape)
        self._multiplier = float(multiplier)

    def raw(self, index: int, variant: int = 0) -> torch.Tensor:
        """Item ``index``'s latents as stored (float32, unscaled); variant 1: the flipped image's."""
        row = int(self._rows[index]) if self._rows is not None else int(index)
        shard = int(np.searchsorted(self._starts, row, side="right")) - 1
        key = "latents_flip" if variant else "latents"
        arr = self._maps.get((shard, key))
        if arr is None:
            arr = self._maps[(shard, key)] = _array(self.files[shard], self._tables[shard][key])
        return _as_float(arr[row - self._starts[shard]], self._tables[shard][key][0])

    def __getitem__(self, i: int):
        n = len(self)
        if not 0 <= i < n * self.variants:
            raise IndexError(f"latents: item {i} out of range [0, {n * self.variants})")
        variant, index = divmod(int(i), n)
        x = self.raw(index, variant).sub_(self._mean).div_(self._std)
        if self._multiplier != 1.0:
            x.mul_(self._multiplier)
        return x, self.labels[index]

    def subset(self, index) -> "LatentShards":
        """The rows ``index`` of this dataset, as a new (lazy) dataset."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = object.__new__(LatentShards)
        out.__dict__.update(self.__getstate__())
        rows = self._rows[index] if self._rows is not None else index
        out._rows, out.labels = rows, self.labels[index]
        return out

    def channel_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) of the plain latents, each (C,): the published ``latents_stats.pt``
        when the folder has it, else over at most 10000 items drawn with a fixed seed (as published)."""
        cache = os.path.join(self.root, STATS_FILE)
        if os.path.isfile(cache):
            stats = torch.load(cache, map_location="cpu", weights_only=True)
            return stats["mean"].float().reshape(-1), stats["std"].float().reshape(-1)
        n = len(self)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:STATS_ITEMS].sort().values
        x = torch.stack([self.raw(int(i)) for i in pick]).double()
        return x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).float()
