"""Latent datasets in the published layout: a folder of ``.safetensors`` shards, read lazily.

The published UCGM recipes train on ``data.data_path`` = a folder made by LightningDiT's latent
extraction (its ``ImgLatentDataset``): shards holding ``latents`` (N, C, H, W), ``latents_flip``
(the latents of the horizontally flipped images) and ``labels`` (N,), and optionally
``latents_stats.pt`` ({"mean", "std"}, shaped (1, C, 1, 1)). ImageNet's latents are tens of GB, so
they stay on disk: each shard's arrays are memory-mapped (the OS pages rows in as they are read)
and only the labels are held in memory. Nothing here needs the ``safetensors`` package: the format
is an 8-byte header length, a JSON table of (dtype, shape, byte range) and the raw little-endian
arrays. At most :data:`OPEN_SHARDS` shards stay mapped at once (each map holds a file descriptor).

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

#: Shard files kept memory-mapped at once (least recently read unmapped first).
OPEN_SHARDS = 32

# safetensors dtype names -> little-endian numpy dtypes (bfloat16 is read as its 16 raw bits).
_DTYPES = {name: np.dtype(code) for name, code in {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}.items()}


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
    if not isinstance(table, dict):
        raise ValueError(f"latents: {path} is not a safetensors file (its header is not a table)")
    out, ranges = {}, []
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and 8 + n + end <= size
        except (TypeError, KeyError, ValueError):
            ok = False
        if ok and dtype in _DTYPES:
            ok = end - begin == int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if not ok:
            raise ValueError(f"latents: {path}: array {name!r} is truncated or its entry is inconsistent "
                             f"({entry!r})")
        out[name] = (dtype, shape, 8 + n + begin)
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, a), (begin, _, b) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ValueError(f"latents: {path}: arrays {a!r} and {b!r} overlap")
    return out


def _read_all(path: str, entry) -> np.ndarray:
    """A whole array, read (not mapped: no file descriptor stays open)."""
    dtype, shape, offset = entry
    count = int(np.prod(shape, dtype=np.int64))
    return np.fromfile(path, dtype=_DTYPES[dtype], count=count, offset=offset).reshape(shape)


def _as_float(row: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(row)
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
            integer = y_dtype in _DTYPES and np.issubdtype(_DTYPES[y_dtype], np.integer)
            y = _read_all(path, table["labels"]) if integer else None
            if y is None or y.shape != shape[:1]:
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
        self._maps: Dict[int, np.memmap] = {}  # shard -> its whole file, most recently read last
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
        dtype, shape, offset = self._tables[shard]["latents_flip" if variant else "latents"]
        data = self._maps.pop(shard, None)
        if data is None:
            data = np.memmap(self.files[shard], dtype=np.uint8, mode="r")
        self._maps[shard] = data
        if len(self._maps) > OPEN_SHARDS:
            del self._maps[next(iter(self._maps))]
        nbytes = int(np.prod(shape[1:], dtype=np.int64)) * _DTYPES[dtype].itemsize
        start = offset + (row - int(self._starts[shard])) * nbytes
        item = np.array(data[start:start + nbytes]).view(_DTYPES[dtype]).reshape(shape[1:])  # a copy
        return _as_float(item, dtype)

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
        if n == 0:
            raise ValueError(f"latents: {self.root} holds no items to measure the latents' channel statistics on")
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:STATS_ITEMS].sort().values
        x = torch.stack([self.raw(int(i)) for i in pick]).double()
        return x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).float()
