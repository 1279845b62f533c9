"""Checkpoints written by the published UCGM code (LINs-lab/UCGM ``main.py``), read as ucgm_fast's.

The published trainer saves ``torch.save({"model", "ema", "opt", "unigen", "config"})`` to
``checkpoints/NNNNNNN.pt``. Its TiT models are ucgm_fast's DiT with the TiT options, parameter for
parameter and under the same names (``ucgm_fast.models.TIT_OPTIONS``), so such a checkpoint can be
sampled from (``ucgm-sample``, whose ``--save-npz`` gives latents to decode) or tuned
(``train.init_from``) here. Its RoPE tables
(``feat_rope.freqs_cos`` / ``freqs_sin``) are dropped: ucgm_fast recomputes them. Architectures
outside the registry (LightningDiT, SiT, DDT, ...) are refused by name.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict

import torch

from .checkpoint import CheckpointError

__all__ = ["is_published_payload", "from_published"]

# Buffers of the published models that ucgm_fast computes instead of storing.
_DERIVED = re.compile(r"^feat_rope\.")


def is_published_payload(payload) -> bool:
    """Whether a loaded object has the published trainer's checkpoint layout."""
    return isinstance(payload, dict) and {"model", "ema", "config"} <= set(payload) and "model_config" not in payload


def _weights(state: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """``state`` without DDP / accelerate ``module.`` prefixes (after ``prefix``) and the derived buffers."""
    out = {}
    for name, value in state.items():
        head, inner = (prefix, name[len(prefix):]) if name.startswith(prefix) else ("", name)
        while inner.startswith("module."):
            inner = inner[len("module."):]
        if not _DERIVED.match(inner):
            out[head + inner] = value
    return out


def from_published(path: str, map_location="cpu") -> Dict[str, Any]:
    """The published checkpoint at ``path`` as a ucgm_fast payload (step, model, ema, config, model_config, ...).

    The step is the file's name (published: ``NNNNNNN.pt``), else 0. Raises CheckpointError when the
    file is not a published checkpoint.
    """
    from .config import ConfigError, load_config, merge_config
    from .train import model_config

    try:  # mapped: only the weights used are read (the optimizer moments are twice the model)
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path!r} is not a published UCGM checkpoint either ({type(err).__name__}: "
                              f"{err})") from None
    if not is_published_payload(payload):
        raise CheckpointError(f"{path!r} is not a published UCGM checkpoint either (no model, ema, config entries)")
    published = dict(payload["config"])
    published.pop("exp_name", None)  # derived from the config's path by the published launcher
    try:
        cfg = merge_config(load_config(), published)
        cfg["data"]["name"] = "latents"  # the published trainer reads latents only
        mcfg = model_config(cfg, cfg["model"]["in_chans"] or 4)
    except ConfigError as err:
        raise CheckpointError(f"published checkpoint {path!r}: its config does not load here: {err}") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    out = {"step": int(stem) if stem.isdigit() else 0, "model": _weights(payload["model"]),
           "ema": _weights(payload["ema"]), "config": cfg, "model_config": mcfg, "published": True}
    if "unigen" in payload:  # the published UCGMTS: its target network under mod.
        out["objective"] = _weights(payload["unigen"], prefix="mod.")
    return out
