"""Deterministic batch order: the indices of every training step are a pure function of (seed, step).

Epoch e is ``randperm(N)`` from a generator seeded with (seed, e); global step s reads batch
``s mod (N // global_batch)`` of epoch ``s // (N // global_batch)``, and rank r of w takes its
``global_batch // w`` slice. Resuming at step s therefore needs no loader state beyond s, the
result does not depend on when the run was interrupted, and w ranks together see exactly the
global batch a single process would see.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

__all__ = ["BatchPlan", "Batches"]


class BatchPlan:
    """Indices of (global step, rank): drop-last epochs of a seeded permutation, sharded by rank."""

    def __init__(self, num_items: int, global_batch: int, seed: int = 0, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"train.global_batch_size ({global_batch}) must be divisible by the number of "
                             f"processes ({world})")
        if num_items < global_batch:
            raise ValueError(f"train.global_batch_size ({global_batch}) is larger than the dataset "
                             f"({num_items} items)")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
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

    def state_dict(self, step: int) -> dict:
        epoch, pos = divmod(step, self.per_epoch)
        return {"seed": self.seed, "global_batch": self.global_batch, "num_items": self.num_items,
                "epoch": epoch, "batch_in_epoch": pos}


class _IndexSampler:
    # A batch sampler over steps [start, ...) for torch's DataLoader (workers fetch, the plan decides).
    def __init__(self, plan: BatchPlan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        step = self.start
        while True:
            yield self.plan.indices(step).tolist()
            step += 1


class Batches:
    """Iterator of (x, y) batches from step ``start`` on, for a map-style dataset of (x, y) items.

    A dataset with in-memory ``images`` / ``labels`` (or ``tensors``) is indexed directly (no per-item Python work);
    any other dataset goes through ``torch.utils.data.DataLoader`` with ``num_workers`` workers,
    its batches still chosen by the plan.
    """

    def __init__(self, dataset, plan: BatchPlan, start: int = 0, num_workers: int = 0, device=None,
                 max_device_bytes: int = 2 << 30):
        self.plan, self.step = plan, start
        tensors = getattr(dataset, "tensors", None)
        if tensors is None and isinstance(getattr(dataset, "images", None), torch.Tensor):
            tensors = (dataset.images, dataset.labels)
        if tensors is not None and len(tensors) >= 2:
            self._x, self._y = tensors[0], tensors[1]
            if device is not None and torch.device(device).type != "cpu" and \
                    self._x.numel() * self._x.element_size() <= max_device_bytes:
                # A small dataset lives on the accelerator: no host->device copy per step.
                self._x, self._y = self._x.to(device), self._y.to(device)
            self._it = None
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=_IndexSampler(plan, start),
                                                 num_workers=num_workers, persistent_workers=num_workers > 0)
            self._it = iter(loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            idx = self.plan.indices(self.step).to(self._x.device, non_blocking=True)
            batch = self._x[idx], self._y[idx]
        else:
            x, y = next(self._it)[:2]
            batch = x, y
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """Position of the next batch (enough to resume: the order is a function of seed and step)."""
        return self.plan.state_dict(self.step)
