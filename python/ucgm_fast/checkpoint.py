"""Checkpoints: atomic writes (temp file, fsync, rename), a SHA-256 trailer, keep-last-k, verified loads.

File layout: the bytes of ``torch.save(payload)`` followed by a 40-byte trailer
``b"UCGMCKPT" + sha256(those bytes)``. ``torch.load`` still reads the file (zip readers look for
the central directory from the end and skip the trailer), while :func:`load_checkpoint` verifies the
length and the hash first, so a truncated file or flipped bits give an error naming the file
instead of silently wrong weights. Files are named ``{step:07d}.pt`` as in the published code.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
from typing import Any, Dict, Iterable, List, Optional

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "load_latest_valid", "prune_checkpoints", "checkpoint_path", "checkpoint_step", "is_checkpoint_name",
           "NoTrailerError"]

_MAGIC = b"UCGMCKPT"
_TRAILER = len(_MAGIC) + 32
_NAME = re.compile(r"^(\d{7,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, corrupted, not a checkpoint); names the file."""


class NoTrailerError(CheckpointError):
    """The file lacks save_checkpoint's integrity trailer: truncated, or written by another program."""


def checkpoint_path(directory: str, step: int) -> str:
    """``directory/{step:07d}.pt``."""
    return os.path.join(directory, f"{step:07d}.pt")


def is_checkpoint_name(path: str) -> bool:
    """Whether the file name is ``NNNNNNN.pt``."""
    return _NAME.match(os.path.basename(path)) is not None


def checkpoint_step(path: str) -> int:
    """The step in a checkpoint's file name ``NNNNNNN.pt``."""
    m = _NAME.match(os.path.basename(path))
    if m is None:
        raise ValueError(f"{path!r} is not named like a checkpoint (NNNNNNN.pt)")
    return int(m.group(1))


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX; a no-op elsewhere).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: str, mode: str, write) -> None:
    """write(f) into ``path.tmp-<pid>`` opened with ``mode``, fsync, rename over ``path``, fsync the folder:
    readers see the old file or the complete new one, never a part, and the rename survives a power cut."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def write_text_atomic(path: str, text: str) -> None:
    """Writes a text file as :func:`save_checkpoint` writes a checkpoint: temp file, fsync, rename."""
    _replace_atomically(path, "w", lambda f: f.write(text))


def save_checkpoint(payload: Dict[str, Any], path: str) -> str:
    """Writes payload to path atomically: readers see the old file or the complete new one, never a part.

    The data goes to ``path.tmp-<pid>`` in the same directory and gets its SHA-256 trailer; then
    :func:`_replace_atomically` fsyncs it and renames it over ``path``.
    """
    def write(f):
        torch.save(payload, f)
        f.flush()
        f.write(_MAGIC + _hash_file(f.name, f.tell()))

    _replace_atomically(path, "wb", write)
    return path


def _hash_file(path: str, length: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.digest()


def verify_checkpoint(path: str) -> int:
    """Checks the trailer and hash; returns the payload length. Raises CheckpointError naming path."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    size = os.path.getsize(path)
    if size < _TRAILER:
        raise NoTrailerError(f"checkpoint {path!r} is truncated or empty ({size} bytes)")
    with open(path, "rb") as f:
        f.seek(size - _TRAILER)
        trailer = f.read(_TRAILER)
    if trailer[:len(_MAGIC)] != _MAGIC:
        raise NoTrailerError(f"checkpoint {path!r} is truncated or not a ucgm_fast checkpoint "
                              "(its integrity trailer is missing)")
    if _hash_file(path, size - _TRAILER) != trailer[len(_MAGIC):]:
        raise CheckpointError(f"checkpoint {path!r} is corrupted (SHA-256 mismatch)")
    return size - _TRAILER


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """The verified payload of a checkpoint written by :func:`save_checkpoint` (weights_only load).

    The hash is checked streaming, then the file is memory-mapped (``torch.load(mmap=True)``), not
    read: tensors on the CPU are views of the mapped file, paged in as they are used, instead of the
    file's bytes plus a copy of each tensor (twice the checkpoint in RAM on every rank). The mapping is
    private (copy-on-write) whatever ``torch.serialization``'s default: writing into a loaded tensor
    changes this process's copy, never the file.
    """
    verify_checkpoint(path)
    # Windows maps files copy-on-write anyway (and has no flag); torch before 2.5 has no setting and
    # always maps privately.
    private = (torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
               if hasattr(mmap, "MAP_PRIVATE") and hasattr(torch.serialization, "set_default_mmap_options")
               else contextlib.nullcontext())
    try:
        with private:  # the zip reader finds its directory from the end and skips the trailer
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as err:  # hash matched, so the writer produced something unreadable
        raise CheckpointError(f"checkpoint {path!r} could not be unpickled: {err}") from err
    if not isinstance(payload, dict) or "step" not in payload:
        raise CheckpointError(f"checkpoint {path!r} is not a ucgm_fast training checkpoint (no 'step')")
    return payload


def list_checkpoints(directory: str, exclude: Iterable[str] = ()) -> List[str]:
    """Checkpoint files ``NNNNNNN.pt`` in directory, oldest step first (temp files and ``exclude`` left out)."""
    if not os.path.isdir(directory):
        return []
    skip = {os.path.realpath(p) for p in exclude}  # real paths: a symlinked run folder is the same folder
    found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := _NAME.match(name))]
    paths = (os.path.join(directory, name) for _, name in sorted(found))
    return [p for p in paths if os.path.realpath(p) not in skip]


def latest_checkpoint(directory: str) -> Optional[str]:
    """The newest checkpoint file in directory (not verified), or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_latest_valid(directory: str, map_location="cpu", warn=print, exclude: Iterable[str] = ()):
    """(path, payload) of the newest checkpoint in directory that verifies, skipping broken ones.

    Each skipped file is reported through ``warn`` with the reason; files in ``exclude`` (not this
    run's, e.g. the checkpoint it was initialised from) are not considered. Raises CheckpointError
    if the directory holds checkpoints but none verifies, FileNotFoundError if it holds none.
    """
    found = list_checkpoints(directory, exclude)
    if not found:
        raise FileNotFoundError(f"no checkpoints (NNNNNNN.pt) in {directory!r} to resume from")
    errors = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            errors.append(str(err))
            warn(f"warning: {err}; trying the previous checkpoint")
    raise CheckpointError("no usable checkpoint in " + repr(directory) + ": " + "; ".join(errors))


def prune_checkpoints(directory: str, keep_last: int, keep: Iterable[str] = ()) -> List[str]:
    """Deletes all but the newest keep_last checkpoints and stale temp files; returns what it removed.

    Files in ``keep`` are neither deleted nor counted (e.g. the checkpoint the run started from).
    """
    removed = []
    found = list_checkpoints(directory, exclude=keep)
    for path in found[:-keep_last] if keep_last > 0 else found:
        os.remove(path)
        removed.append(path)
    for name in os.listdir(directory):
        # A temp file of a writer that was killed mid-write; never one of a live writer (our own pid).
        if ".pt.tmp-" in name and not name.endswith(f".tmp-{os.getpid()}"):
            os.remove(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed
