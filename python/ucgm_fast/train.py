"""``ucgm-train``: train a DiT with the UCGM objective from a YAML recipe.

    ucgm-train --config configs/digits_multistep.yaml [dotted.key=value ...] [--resume [PATH]]
    torchrun --nproc_per_node 2 -m ucgm_fast.train --config ...       # data-parallel (DDP)

One step: UCGM loss (bf16 autocast on CUDA) -> backward into one flat gradient buffer -> clipping
and nan/inf zeroing in the published order (a kernel each, no host sync) -> fused AdamW ->
multi-tensor EMA. Rank 0 logs
(tqdm, metrics.jsonl), writes atomic checkpoints every ``train.ckpt_every`` steps (last
``train.keep_last`` kept), sample grids every ``train.sample_every`` steps and at the end, and a
loss curve at the end.
``--resume`` continues bit-for-bit: the checkpoint holds model, EMA, optimizer, the objective's
state (target network), every rank's RNG state, the step (which, with the seed and the global batch
size, fixes the data order) and the config (settings changed on resume are named in a warning).
``train.init_from`` / ``train.ckpt`` start a new run from a checkpoint as published: the model from
its model weights, the EMA from its EMA weights (``train.init_weights: ema``: both from its EMA).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from .data import InfiniteLoader
from .config import (ConfigError, apply_overrides, build_objective, dump_config, latent_size, load_config,
                     merge_config, read_yaml, run_dir, sampler_settings, validate_config)
from .optim import EMA, FlatGrads, ema_init, load_optimizer_state, lr_at, make_optimizer
from .plots import save_grid, save_loss_curve, to_display

__all__ = ["main", "train", "build_model", "build_dataset", "model_config", "check_model_config",
           "load_model_from_checkpoint", "read_checkpoint", "sample_images"]


# ---------------------------------------------------------------------------------------------
#                                    Builders (model, data, objective)
# ---------------------------------------------------------------------------------------------

def model_config(cfg: Dict[str, Any], in_channels: int) -> Dict[str, Any]:
    """What identifies the architecture: registry name, sizes and options (stored in checkpoints)."""
    from .models import resolve_model_name

    # A TiT name is stored as the DiT it is.
    name, options = resolve_model_name(cfg["model"]["type"], dict(cfg["model"]["options"] or {}))
    return {"type": name, "input_size": latent_size(cfg), "in_channels": int(in_channels),
            "num_classes": int(cfg["data"]["num_classes"]), "options": options}


def build_model(mcfg: Dict[str, Any]) -> torch.nn.Module:
    """The DiT of a :func:`model_config` dict (unknown names and options raise ValueError/TypeError)."""
    from .models import get_model

    try:
        return get_model(mcfg["type"], input_size=mcfg["input_size"], in_channels=mcfg["in_channels"],
                         num_classes=mcfg["num_classes"], **mcfg["options"])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.type / model.options: {err}") from None


def check_model_config(found: Dict[str, Any], wanted: Dict[str, Any], path: str) -> None:
    """Raises ConfigError if a checkpoint's model config differs from the one being built."""
    if found != wanted:
        diff = [k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)]
        details = ", ".join(f"{k}: checkpoint {found.get(k)!r} vs config {wanted.get(k)!r}" for k in diff)
        raise ConfigError(f"checkpoint {path!r} was trained with another model config ({details})")


def build_dataset(cfg: Dict[str, Any], split: str = "train", stats: Optional[Dict[str, Any]] = None):
    """The :class:`ucgm_fast.data.ImageDataset` of ``data.*``, split 'train' or 'test' (held out).

    Latents get the published scaling: standardised per channel with their statistics when
    ``data.latent_norm``, then multiplied by ``data.latent_multiplier``. A latent file is all
    training data (as published): it has no held-out split. ``stats``: a resumed checkpoint's
    ``latent_stats``, whose per-channel mean and std are used instead of being measured again, so the
    run keeps its scaling (and no rank reads 10000 latents to find it).
    """
    from . import data as data_mod

    d = cfg["data"]
    name = d["name"]
    kw: Dict[str, Any] = {}
    if name == "image-folder":
        kw = {"root": d["data_path"], "size": d["image_size"], "channels": d["channels"]}
    elif name == "latents":
        kw = {"path": d["data_path"], "num_classes": d["num_classes"]}
    elif name == "fashion-mnist" and d["data_path"]:
        kw = {"root": d["data_path"]}
    if name == "latents" and split == "test":
        # Holding some back would leave them out of training (published: all of the file) or, kept
        # in it, make the "held-out" scores a memorisation check that cannot see memorisation.
        raise ConfigError("data (latents): a latent file has no held-out split; score decoded samples instead")
    try:
        dataset = data_mod.get_dataset(name, split=split, **kw)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"data ({name}): {err}") from None
    if dataset.num_classes != d["num_classes"]:
        raise ConfigError(f"data.num_classes is {d['num_classes']} but dataset {name!r} has "
                          f"{dataset.num_classes} classes")
    if name == "latents":
        multiplier, channels = float(d["latent_multiplier"]), dataset.item_shape[0]
        mean, std = torch.zeros(channels), torch.ones(channels)
        known = None  # the resumed run's (mean, std): copies, not views of the mapped checkpoint
        if d["latent_norm"] and stats is not None and stats["mean"].numel() == channels:
            known = stats["mean"].float().clone().reshape(-1), stats["std"].float().clone().reshape(-1)
        if not isinstance(getattr(dataset, "images", None), torch.Tensor):  # shards on disk: scaled as read
            if d["latent_norm"]:
                mean, std = known or dataset.channel_stats()
                std = std.clamp_min(1e-8)
            dataset.set_scaling(mean, std, multiplier)
        else:  # in place: a latent file can be most of the host's memory
            images = dataset.images
            if d["latent_norm"]:
                mean, std = known or (images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3)))
                std = std.clamp_min(1e-8)
                images.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
            if multiplier != 1.0:
                images.mul_(multiplier)
        # Saved with each checkpoint: samples map back to the autoencoder's latents without the data.
        dataset.latent_stats = {"mean": mean, "std": std, "multiplier": multiplier}
    return dataset


def to_autoencoder_latents(x: torch.Tensor, stats: Dict[str, Any]) -> torch.Tensor:
    """latent = x / multiplier * std + mean: model-space samples back in the autoencoder's latent space.

    ``stats`` is a checkpoint's ``latent_stats`` (per-channel ``mean`` and ``std``, ``multiplier``), the
    inverse of the scaling :func:`build_dataset` applied to the training latents (published demo decode).
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = stats["mean"].to(x.device, torch.float32).view(shape)
    std = stats["std"].to(x.device, torch.float32).view(shape)
    return x.float() / float(stats["multiplier"]) * std + mean


def check_dataset(dataset, mcfg: Dict[str, Any], name: str) -> None:
    """Raises ConfigError when the data's (C, H, W) does not match the model's input."""
    c, h, w = dataset.item_shape
    size, chans = mcfg["input_size"], mcfg["in_channels"]
    if (c, h, w) != (chans, size, size):
        raise ConfigError(
            f"dataset {name!r} has items of shape (C, H, W) = ({c}, {h}, {w}) but the model expects "
            f"({chans}, {size}, {size}) (model.in_chans / data.image_size // vae.downsample_ratio); "
            "set data.image_size, vae.downsample_ratio and model.in_chans to match the data")


def sample_images(model: torch.nn.Module, cfg: Dict[str, Any], labels: torch.Tensor, seed: int = 0,
                  steps: Optional[int] = None, **overrides) -> torch.Tensor:
    """Samples in model space with the ``sample`` section's settings (steps/overrides win)."""
    from .sampler import sample

    settings = sampler_settings(cfg, steps, **overrides)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, generator=gen)
    was_training = model.training
    model.eval()
    try:
        out = sample(model, noise.to(device), **settings, seed=seed, y=labels.to(device))
    finally:
        model.train(was_training)
    return out


def images_of(dataset, x: torch.Tensor) -> torch.Tensor:
    """Model-space samples -> [0, 1] images: pixel datasets live in [-1, 1]; latents get a min-max view."""
    if dataset is None or getattr(dataset, "name", "latents") == "latents":
        return to_display(x)
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def grid_labels(num_classes: int, n: int) -> torch.Tensor:
    """n labels cycling through the classes (one column per class when n is a multiple)."""
    return torch.arange(n) % num_classes


def read_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """A verified ucgm_fast checkpoint, or one of the published UCGM trainer read as such
    (:mod:`ucgm_fast.published`: a file without ucgm_fast's integrity trailer)."""
    try:
        return ckpt_io.load_checkpoint(path, map_location)
    except ckpt_io.NoTrailerError as err:
        from .published import from_published

        try:
            return from_published(path, map_location)
        except ckpt_io.CheckpointError as published:  # neither: both reasons (truncated, ...)
            raise ckpt_io.CheckpointError(f"{err}; {published}") from None


def load_model_from_checkpoint(path: str, use_ema: bool = True, map_location="cpu"):
    """(model, cfg, payload) from a training checkpoint (or a published UCGM one); the EMA weights by default."""
    payload = read_checkpoint(path, map_location)
    for key in ("config", "model_config", "model", "ema"):
        if key not in payload:
            raise ckpt_io.CheckpointError(f"checkpoint {path!r} has no {key!r} entry")
    cfg = merge_config(load_config(), payload["config"])
    model = build_model(payload["model_config"])
    _load_state(model, payload["ema" if use_ema else "model"], path)
    return model, cfg, payload


def _load_state(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {path!r} does not fit the model: {err}") from None


# ---------------------------------------------------------------------------------------------
#                                    Distributed setup
# ---------------------------------------------------------------------------------------------

def _setup_distributed(device_pref: str):
    """(rank, world, device); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but CUDA is not available")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def _all_gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
#                                    Training
# ---------------------------------------------------------------------------------------------

class _Log:
    """Rank-0 outputs: the metrics JSONL file (truncated to the resumed step) and messages."""

    def __init__(self, directory: str, active: bool, resume_step: Optional[int]):
        self.active = active
        self.path = os.path.join(directory, "metrics.jsonl")
        if active and resume_step is not None and os.path.isfile(self.path):
            # Lines written after the checkpoint by the interrupted run are replaced by the resumed run's.
            keep = []
            with open(self.path, "r", encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        break
            ckpt_io.write_text_atomic(self.path, "".join(keep))  # a crash here must not lose the history
        elif active and resume_step is None and os.path.isfile(self.path):
            os.remove(self.path)

    def metrics(self, row: Dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def info(self, msg: str, bar=None) -> None:
        if self.active:
            (bar.write if bar is not None else print)(msg, file=sys.stderr)


def _resolve_resume(resume: str, directory: str, warn, exclude=()):
    """(path, payload) for --resume: a checkpoint file, a run directory, or '' (this run's latest).

    In a directory, the newest checkpoint that verifies, leaving out ``exclude`` (the checkpoint
    the run was initialised from, when the published layout put it among the run's own).
    """
    if resume and os.path.isfile(resume):
        try:
            return resume, ckpt_io.load_checkpoint(resume)
        except ckpt_io.CheckpointError as err:
            others = ckpt_io.list_checkpoints(os.path.dirname(os.path.abspath(resume)), exclude=[resume])
            hint = (f"; other checkpoints in the same folder: {', '.join(others)} "
                    f"(resume from one with --resume PATH, or --resume alone for the newest valid one)"
                    if others else "")
            raise ckpt_io.CheckpointError(f"{err}{hint}") from None
    if resume and not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file or run directory")
    return ckpt_io.load_latest_valid(_checkpoint_dir(resume or directory), warn=warn, exclude=exclude)


def _checkpoint_dir(base: str) -> str:
    """Where a run folder keeps its checkpoints: base/checkpoints when it exists, else base itself."""
    sub = os.path.join(base, "checkpoints")
    return sub if os.path.isdir(sub) else base


def _source_in(cfg: Dict[str, Any], ckdir: str) -> list:
    """[the checkpoint the run starts from] when it sits in the run's own ckdir (published layout), else [].

    That file is never resumed from (it is not this run's state) nor pruned (it is the user's model).
    """
    src = _init_source(cfg, ckdir, must_exist=False)
    # The folders' real paths (a symlinked run folder is the same folder), not the file's: the
    # source may be a symlink placed in checkpoints/ that points elsewhere.
    folder = os.path.realpath(os.path.dirname(os.path.abspath(src))) if src else None
    return [src] if folder == os.path.realpath(ckdir) else []


def _init_source(cfg: Dict[str, Any], ckdir: str, must_exist: bool = True) -> Optional[str]:
    """The checkpoint to initialise from: train.init_from, else the published train.ckpt."""
    src = cfg["train"]["init_from"] or cfg["train"]["ckpt"]
    if src and not os.path.isfile(src) and os.path.isfile(os.path.join(ckdir, src)):
        src = os.path.join(ckdir, src)  # published: a file name inside the run's checkpoints/
    if src and must_exist and not os.path.isfile(src):
        raise FileNotFoundError(f"train.init_from / train.ckpt: checkpoint {src!r} does not exist")
    return src or None


def _load_optimizer(opt, payload: Dict[str, Any], cfg: Dict[str, Any], path: str, warn) -> None:
    """The checkpoint's optimizer moments, under the config's settings; none if the type changed."""
    saved = ((payload.get("config") or {}).get("optimizer") or {}).get("type")
    if saved is not None and saved != cfg["optimizer"]["type"]:
        warn(f"warning: {path} holds {saved} optimizer state but optimizer.type is {cfg['optimizer']['type']}; "
             "the optimizer starts afresh")
        return
    load_optimizer_state(opt, payload["optimizer"])


def _warn_changed_settings(saved: Dict[str, Any], cfg: Dict[str, Any], step: int, num_items: int, warn) -> None:
    """Names the settings a resumed run changed that make it other than a continuation of the saved one.

    The batch order is a function of (global_seed, step, global_batch_size), so a changed seed or batch
    size reorders the data mid-epoch; the learning rate is a function of the step, max_steps and the
    optimizer's schedule keys, so changing them moves it at once. Each is a warning, not an error:
    the run is different from the uninterrupted one, not wrong. ``saved`` is the checkpoint's config.
    """
    old_t, new_t = saved.get("train") or {}, cfg["train"]
    old_batch, new_batch = old_t.get("global_batch_size", new_t["global_batch_size"]), new_t["global_batch_size"]
    if old_batch != new_batch:
        # BatchPlan: step s reads batch s mod (N // B) of epoch s // (N // B), i.e. from item (s mod (N // B)) B.
        (e0, p0), (e1, p1) = (divmod(step, max(1, num_items // b)) for b in (old_batch, new_batch))
        warn(f"warning: train.global_batch_size is {new_batch} but the checkpoint's run used {old_batch}: the data "
             f"order changes mid-epoch (the run goes on from item {p1 * new_batch} of epoch {e1}'s order; the "
             f"checkpoint's run was at item {p0 * old_batch} of epoch {e0}): items are seen again or skipped")
    if old_t.get("global_seed", new_t["global_seed"]) != new_t["global_seed"]:
        warn(f"warning: train.global_seed is {new_t['global_seed']} but the checkpoint's run used "
             f"{old_t['global_seed']}: each epoch's permutation follows the seed, so the data order changes "
             "mid-epoch (items of this epoch are seen again or skipped) and the sample grids use other noise")
    old_o, new_o = saved.get("optimizer") or {}, cfg["optimizer"]
    keys = ("lr", "lr_schedule", "warmup_steps", "min_lr")
    if "max_steps" not in old_t or any(k not in old_o for k in keys):
        return
    changed = [f"optimizer.{k}" for k in keys if old_o[k] != new_o[k]]
    if old_t["max_steps"] != new_t["max_steps"] and {old_o["lr_schedule"], new_o["lr_schedule"]} != {"constant"}:
        changed.append("train.max_steps")  # a decay ends at max_steps; a constant schedule ignores it
    if not changed:
        return
    before = lr_at(step, old_t["max_steps"], **{k: old_o[k] for k in keys})
    after = lr_at(step, new_t["max_steps"], **new_o)
    moved = (f"the learning rate jumps from {before:.4g} to {after:.4g} at step {step}" if before != after else
             f"the learning rate ({after:.4g} at step {step}) follows another schedule from here")
    warn(f"warning: {', '.join(changed)} changed since the checkpoint ({', '.join(_was(k, saved, cfg) for k in changed)}): "
         f"{moved}")


def _was(key: str, saved: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    section, name = key.split(".")
    return f"{key} {saved[section][name]!r} -> {cfg[section][name]!r}"


def _set_aside_later(ckdir: str, step: int, warn, exclude=()) -> None:
    """Moves this run's checkpoints past ``step`` (but not ``exclude``) into checkpoints/superseded/.

    Resuming from an earlier checkpoint (or starting afresh, ``step = -1``, where an earlier run left
    checkpoints) abandons what came after it; left in place, those files would be picked by the next
    ``--resume`` and make pruning delete the new ones (it keeps the highest steps). Moved, not
    deleted: they are still the user's.
    """
    later = [p for p in ckpt_io.list_checkpoints(ckdir, exclude) if ckpt_io.checkpoint_step(p) > step]
    if not later:
        return
    aside = os.path.join(ckdir, "superseded")
    os.makedirs(aside, exist_ok=True)
    for path in later:
        dest, stem, n = os.path.join(aside, os.path.basename(path)), os.path.basename(path)[:-3], 1
        while os.path.exists(dest):  # set aside before: keep both
            dest, n = os.path.join(aside, f"{stem}.{n}.pt"), n + 1
        os.replace(path, dest)
    if step >= 0:
        warn(f"resuming at step {step}: moved {len(later)} later checkpoint(s) of this run to {aside}")
    else:
        warn(f"starting afresh: moved {len(later)} checkpoint(s) of an earlier run to {aside}")


def train(cfg: Dict[str, Any], resume: Optional[str] = None, _loaded=None) -> Dict[str, Any]:
    """Runs training as configured; returns a summary dict (rank 0: steps, final loss, paths).

    ``resume``: a checkpoint file, a run directory, or '' for this run's newest valid checkpoint.
    (``_loaded``: [path, payload] of that checkpoint when the caller has read it already; emptied here,
    so that no reference outlives the loading: the payload's tensors map the checkpoint's file.)
    """
    tcfg = cfg["train"]
    rank, world, device = _setup_distributed(tcfg["device"])
    main_proc = rank == 0
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    out_dir = run_dir(cfg)
    ckdir = os.path.join(out_dir, "checkpoints")
    warn = (lambda m: print(m, file=sys.stderr)) if main_proc else (lambda m: None)

    src_in_ckdir = _source_in(cfg, ckdir)  # the published layout may put the source among the run's own
    payload, resume_path = None, None
    if resume is not None:
        resume_path, payload = _loaded or _resolve_resume(resume, out_dir, warn, exclude=src_in_ckdir)
        if _loaded:
            _loaded.clear()
        warn(f"resuming from {resume_path} (step {payload['step']})")
    for src in src_in_ckdir:  # saving over it would replace the user's source model
        src_step = ckpt_io.checkpoint_step(src) if ckpt_io.is_checkpoint_name(src) else -1
        if (int(payload["step"]) if payload is not None else 0) < src_step <= tcfg["max_steps"]:
            raise ConfigError(f"train.ckpt / train.init_from {src} sits in this run's checkpoints/ under a step "
                              "this run may save; rename it (the published layout uses 0000000.pt) or move it; "
                              "to continue the run that wrote it, use --resume PATH instead of train.ckpt")
    if tcfg["ema_decay"] == 1.0 and not tcfg["ema_warmup"]:
        # Accepted as published (it freezes the EMA, e.g. to check what a run started from), but rarely meant.
        warn("warning: train.ema_decay is 1.0: the EMA weights never move from where they start (the random "
             "init, or the source's / checkpoint's EMA); sample grids, checkpoints' 'ema' and ucgm-sample / "
             "ucgm-eval use them by default. Set it below 1 (e.g. 0.9999) or train.ema_warmup: true")

    # Seeds first: model init, then the objective's draws, follow from them on every rank.
    torch.manual_seed(tcfg["global_seed"] * world + rank)

    dataset = build_dataset(cfg, "train", stats=payload.get("latent_stats") if payload is not None else None)
    in_chans = cfg["model"]["in_chans"] or dataset.item_shape[0]
    mcfg = model_config(cfg, in_chans)
    model = build_model(mcfg).to(device)
    check_dataset(dataset, mcfg, cfg["data"]["name"])
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    objective = build_objective(cfg)
    opt = make_optimizer(model.parameters(), **cfg["optimizer"])

    step, resumed = 0, payload is not None
    if resumed:
        check_model_config(payload["model_config"], mcfg, resume_path)
        _load_state(model, payload["model"], resume_path)
        _load_state(ema, payload["ema"], resume_path)
        _load_optimizer(opt, payload, cfg, resume_path, warn)
        objective.load_state_dict(_to_device(payload["objective"], device))
        step = int(payload["step"])
        rngs = payload.get("rng") or []
        if len(rngs) == world:
            _set_rng_state(rngs[rank], device)
        else:
            warn(f"warning: checkpoint has RNG states of {len(rngs)} processes, this run has {world}; "
                 "reseeding (the run continues but not bit-for-bit)")
            torch.manual_seed(tcfg["global_seed"] * world + rank + 7919 * step)
        if isinstance(payload.get("config"), dict):
            _warn_changed_settings(payload["config"], cfg, step, len(dataset), warn)
        payload = None  # the model, EMA, optimizer and objective hold copies: the file can be unmapped
    else:
        src = _init_source(cfg, ckdir)
        if src:
            init = read_checkpoint(src)
            check_model_config(init["model_config"], mcfg, src)
            for key in {tcfg["init_weights"], "ema"}:
                if key not in init:
                    raise ckpt_io.CheckpointError(f"train.init_from / train.ckpt: checkpoint {src!r} has no {key!r} entry")
            # As published (main.py): the online model from the source's model weights, the EMA from its
            # EMA. init_weights "ema" starts the online model from the EMA weights too (the model one
            # samples from): the EMA then also starts from there.
            _load_state(model, init[tcfg["init_weights"]], src)
            _load_state(ema, init["ema"], src)
            if not tcfg["no_reopt"]:
                if init.get("published"):
                    # Its optimizer indexes the published model's parameters, whose order differs (its
                    # pos_embed is a parameter): moments would land on the wrong tensors.
                    warn(f"warning: {src} is a published UCGM checkpoint; its optimizer state is not loaded")
                else:
                    _load_optimizer(opt, init, cfg, src, warn)
            if not tcfg["no_reuni"]:
                try:
                    objective.load_state_dict(_to_device(init.get("objective") or {}, device))
                    objective.check_target_state(model)
                except (ValueError, RuntimeError) as err:
                    raise ConfigError(f"{src}: its UCGM state (target network) does not load: {err}") from None
            warn(f"initialised from {src} (step {init['step']}): model from its {tcfg['init_weights']} weights, "
                 "EMA from its EMA weights")
            del init
        else:
            ema_init(ema, model)

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # torch 2.13 renames broadcast_buffers and warns on the old name. The new one still syncs buffers
        # once at start; the DiT's buffers are the same on every rank, so the run is unchanged.
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else "broadcast_buffers")
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                          **{sync: not tcfg["no_buffer"]})
    if tcfg["compile"]:
        # compile(DDP(model)), as PyTorch's DDP notes advise: the compiler then splits the graph at
        # DDP's bucket boundaries so gradient all-reduces overlap the backward pass. DDP(compile(model))
        # runs one opaque backward and reduces every bucket after it.
        train_model = torch.compile(train_model)

    if tcfg["global_batch_size"] % world or len(dataset) < tcfg["global_batch_size"]:
        raise ConfigError(f"train.global_batch_size ({tcfg['global_batch_size']}) must be divisible by the number "
                          f"of processes ({world}) and at most the dataset's {len(dataset)} items")
    batches = InfiniteLoader(dataset, tcfg["global_batch_size"] // world, seed=tcfg["global_seed"], device=device,
                             rank=rank, world_size=world, start=step, num_workers=cfg["data"]["num_workers"])
    ema_tail = EMA(ema, model)
    grads = FlatGrads(model.parameters())
    precision = tcfg["precision"]
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    if main_proc:
        os.makedirs(ckdir, exist_ok=True)
        ckpt_io.write_text_atomic(os.path.join(out_dir, "config.yaml"), dump_config(cfg))
    log = _Log(out_dir, main_proc, step if resumed else None)
    nparams = sum(p.numel() for p in model.parameters())
    log.info(f"{mcfg['type']} {nparams / 1e6:.2f}M params, {len(dataset)} items, global batch "
             f"{tcfg['global_batch_size']} on {world} x {device.type}, run dir {out_dir}")

    grid_n = tcfg["grid_size"]
    demo_y = grid_labels(mcfg["num_classes"], grid_n)
    bar = _progress(main_proc and tcfg["progress"], step, tcfg["max_steps"])
    deadline = time.monotonic() + 60 * tcfg["max_minutes"] if tcfg["max_minutes"] else None
    loss_sum = torch.zeros((), device=device)
    # n_timed steps since t_log: the speed logged. Checkpoints and sample grids restart the clock.
    n_loss, n_timed, t_log, last_loss = 0, 0, time.perf_counter(), float("nan")
    saved_step = step if resumed else -1

    def save(at_step: int):
        rngs = _all_gather(_rng_state(device), world)
        if main_proc:
            path = ckpt_io.checkpoint_path(ckdir, at_step)
            ckpt_io.save_checkpoint({
                "step": at_step, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "objective": objective.state_dict(), "rng": rngs,
                "config": cfg, "model_config": mcfg, "world_size": world,
                "latent_stats": dataset.latent_stats, "version": 1}, path)
            ckpt_io.prune_checkpoints(ckdir, tcfg["keep_last"], keep=src_in_ckdir)
            log.info(f"saved {path}", bar)

    def grid(at_step: int, final: bool = False):
        if main_proc:
            x = sample_images(ema, cfg, demo_y.to(device), seed=tcfg["global_seed"])
            name = "final.png" if final else f"{at_step:07d}.png"
            save_grid(images_of(dataset, x), os.path.join(out_dir, "samples", name),
                      nrow=min(mcfg["num_classes"], grid_n) if mcfg["num_classes"] <= 16 else None)

    if main_proc:
        # Every check has passed: checkpoints past the resumed step (in a fresh run all of them, an
        # earlier run's) go aside now, so a launch refused above leaves them and a run killed before
        # its first save is not resumed from them.
        _set_aside_later(ckdir, saved_step, warn, exclude=src_in_ckdir)
    stop = False
    while step < tcfg["max_steps"] and not stop:
        x, y = next(batches)
        x = x.to(device, dtype=torch.float32, non_blocking=True)
        y = y.to(device, non_blocking=True)
        lr = lr_at(step, tcfg["max_steps"], **cfg["optimizer"])
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast():
            loss = objective.loss(train_model, x, y)
        grads.zero_()
        loss.backward()
        grads.clip_(cfg["optimizer"]["max_grad_norm"], tcfg["zero_nonfinite_grads"])
        opt.step()
        objective.update_target(train_model)  # the target network's EMA step (no-op for D = 0 or 1)
        decay = tcfg["ema_decay"]
        if tcfg["ema_warmup"]:
            decay = min(decay, (1.0 + step) / (10.0 + step))
        ema_tail.update(decay)
        step += 1
        loss_sum += loss.detach().float()
        n_loss += 1
        n_timed += 1

        if deadline is not None:
            stop = _agree(time.monotonic() >= deadline, world, device)
        if step % tcfg["log_every"] == 0 or step == tcfg["max_steps"] or stop:
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            last_loss = float(loss_sum) / n_loss
            now = time.perf_counter()
            sps = n_timed / max(now - t_log, 1e-9)
            row = {"step": step, "loss": last_loss, "steps_per_s": sps,
                   "images_per_s": sps * tcfg["global_batch_size"], "lr": opt.param_groups[0]["lr"]}
            log.metrics(row)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{row['images_per_s']:.0f}", refresh=False)
            loss_sum.zero_()
            n_loss, n_timed, t_log = 0, 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        paused = False
        if tcfg["sample_every"] and step % tcfg["sample_every"] == 0:
            grid(step)
            paused = True
        if step % tcfg["ckpt_every"] == 0:
            save(step)
            saved_step, paused = step, True
        if paused:
            # Sampling and saving are not training: the speed is measured from here. Both end with
            # copies to the host, so no queued training work is left out of the next interval.
            n_timed, t_log = 0, time.perf_counter()

    if bar is not None:
        bar.close()
    if saved_step != step:
        save(step)
    summary = {"step": step, "loss": last_loss, "run_dir": out_dir, "stopped_early": stop}
    if main_proc:
        grid(step, final=True)
        save_loss_curve(log.path, os.path.join(out_dir, "loss.png"))
        summary["checkpoint"] = ckpt_io.checkpoint_path(ckdir, step)
        log.info(f"done: step {step}, loss {last_loss:.4f}, outputs in {out_dir}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _agree(flag: bool, world: int, device: torch.device) -> bool:
    # Every rank must stop at the same step, or DDP's collectives hang.
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _progress(active: bool, start: int, total: int):
    if not active:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=1.0)


# ---------------------------------------------------------------------------------------------
#                                    Command line
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ucgm-train", description="Train a DiT with the UCGM objective (see configs/).",
        epilog="Overrides: dotted.key=value, e.g. train.max_steps=30 train.ckpt_every=15 output_dir=runs/x")
    p.add_argument("--config", help="YAML recipe (sections data, model, train, optimizer, transport, sample)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue exactly from a checkpoint: a .pt file, a run directory, or (no value) the "
                        "newest valid checkpoint of this config's run directory")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return p


def _source_of_run(path: str) -> list:
    """For --resume RUN without --config: the run's source checkpoint among its own, from the
    config.yaml it wrote at its start (the checkpoints alone cannot tell it apart)."""
    if not os.path.isdir(path):
        return []
    ckdir = os.path.abspath(_checkpoint_dir(path))  # the folder _resolve_resume searches
    run = os.path.dirname(ckdir) if os.path.basename(ckdir) == "checkpoints" else ckdir
    saved = os.path.join(run, "config.yaml")
    if not os.path.isfile(saved):
        return []
    # Only the two keys that name the source: the rest need not pass today's checks (the command
    # line's overrides may be what fixes them).
    with open(saved, encoding="utf-8") as f:
        section = (read_yaml(f) or {}).get("train") or {}
    keys = {"init_from": section.get("init_from"), "ckpt": section.get("ckpt")}
    return _source_in({"train": keys}, ckdir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value`: argparse gave --resume the first override; it meant "no path".
        args.overrides.insert(0, args.resume)
        args.resume = ""
    loaded = None
    try:
        if args.config is None and args.resume:
            # Resume without a config: the checkpoint's own config, plus any overrides. The run goes
            # on in the directory it is resumed from, wherever the command runs: the stored
            # output_dir may be relative to where the run was started.
            path, payload = _resolve_resume(args.resume, args.resume, lambda m: print(m, file=sys.stderr),
                                            exclude=_source_of_run(args.resume))
            cfg = merge_config(load_config(None, []), payload["config"])
            ckdir = os.path.dirname(os.path.abspath(path))
            if os.path.basename(ckdir) == "checkpoints":
                cfg["output_dir"], cfg["exp_name"] = os.path.dirname(ckdir), None
            cfg = apply_overrides(cfg, args.overrides)
            validate_config(cfg)
            args.resume, loaded = path, [path, payload]  # train() need not read it again (and empties it)
            del payload
        elif args.config is None:
            raise ConfigError("--config is required (or --resume PATH to continue a run)")
        else:
            cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume, _loaded=loaded)
    except (ConfigError, ckpt_io.CheckpointError, FileNotFoundError) as err:
        print(f"ucgm-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
