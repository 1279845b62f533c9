"""``ucgm-sample``: a sample grid (and optionally the raw samples) from a training checkpoint.

    ucgm-sample --ckpt runs/digits_fewstep/checkpoints/0000600.pt --steps 2 --out grid.png

Sampler settings default to the checkpoint config's ``sample`` section; each flag overrides one.
Samples are drawn in batches of ``sample.per_batch_size`` with one seed per batch, as ucgm-eval
draws them: the same --seed gives the same samples in both.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError
from .config import ConfigError, check_sampler_settings
from .plots import save_grid

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ucgm-sample", description="Sample a grid from a ucgm_fast checkpoint.")
    p.add_argument("--ckpt", required=True, help="training checkpoint (.pt)")
    p.add_argument("--out", default="grid.png", help="output PNG grid (default grid.png)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config sample.sampling_steps)")
    p.add_argument("--num", type=int, default=100, help="number of samples (default 100)")
    p.add_argument("--labels", default=None,
                   help="comma-separated class labels, cycled (default: 0..num_classes-1 cycled)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: config sample.seed)")
    add_sampler_arguments(p)
    p.add_argument("--no-ema", action="store_true", help="use the online weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--save-npz", default=None,
                   help="also save the samples (model space) and labels to .npz; for latent data also the "
                        "autoencoder's latents (to decode) and the scaling between the two")
    return p


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler options shared by ucgm-sample and ucgm-eval (read back by :func:`sampler_overrides`)."""
    p.add_argument("--order", type=int, choices=(1, 2), default=None, help="sampler order")
    p.add_argument("--stochast-ratio", default=None, help="stochastic ratio in [0, 1] or Auto")
    p.add_argument("--extrapol-ratio", type=float, default=None)
    p.add_argument("--time-dist-ctrl", type=float, nargs=3, default=None, metavar=("A", "B", "C"))
    p.add_argument("--rfba-gap-steps", type=float, nargs=2, default=None, metavar=("G0", "G1"))
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="times where guidance applies (inclusive)")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N channels (the published networks: 3; default: all)")


def sampler_overrides(args) -> dict:
    """The sample-section keys set on the command line."""
    out = {}
    if args.order is not None:
        out["sampling_order"] = args.order
    if args.stochast_ratio is not None:
        value = args.stochast_ratio
        if value.lower() == "auto":
            out["stochast_ratio"] = "Auto"
        else:
            try:
                out["stochast_ratio"] = float(value)
            except ValueError:
                raise ConfigError(f"--stochast-ratio must be a number in [0, 1] or auto, got {value!r}") from None
    if args.extrapol_ratio is not None:
        out["extrapol_ratio"] = args.extrapol_ratio
    if args.time_dist_ctrl is not None:
        out["time_dist_ctrl"] = list(args.time_dist_ctrl)
    if args.rfba_gap_steps is not None:
        out["rfba_gap_steps"] = list(args.rfba_gap_steps)
    if args.cfg_scale is not None:
        out["cfg_scale"] = args.cfg_scale
    if args.cfg_interval is not None:
        out["cfg_interval"] = list(args.cfg_interval)
    if args.cfg_channels is not None:
        out["cfg_channels"] = args.cfg_channels
    return out


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work: a CUDA call returns when its kernels are launched, not run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_since(start: float, device: torch.device) -> float:
    """Seconds since ``start`` (time.perf_counter) once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter() - start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available")
    return torch.device(name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .eval_cli import generate
    from .train import build_dataset, grid_labels, images_of, load_model_from_checkpoint, to_autoencoder_latents

    args = _parser().parse_args(argv)
    try:
        if args.num < 1 or (args.steps is not None and args.steps < 1):
            raise ConfigError("--num and --steps must be >= 1")
        device = resolve_device(args.device)
        model, cfg, payload = load_model_from_checkpoint(args.ckpt, use_ema=not args.no_ema)
        if args.seed is None:
            args.seed = int(cfg["sample"]["seed"])
        model = model.to(device)
        if args.labels:
            try:
                base = torch.tensor([int(v) for v in args.labels.split(",")])
            except ValueError:
                raise ConfigError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
            if (base < 0).any() or (base > model.num_classes).any():
                raise ConfigError(f"--labels must lie in [0, {model.num_classes}] "
                                  f"({model.num_classes} = unconditional)")
            labels = base[torch.arange(args.num) % len(base)]
        else:
            labels = grid_labels(model.num_classes, args.num)
        steps = args.steps or cfg["sample"]["sampling_steps"]
        overrides = sampler_overrides(args)
        check_sampler_settings(cfg, steps, **overrides)
        synchronize(device)  # the model's copy to the device is not sampling time
        start = time.perf_counter()
        x, _ = generate(model, cfg, args.num, steps, seed=args.seed, labels=labels, progress="ucgm-sample",
                        **overrides)
        elapsed = elapsed_since(start, device)
        try:
            dataset = build_dataset(cfg, "train")  # only for its decoder to [0, 1] images
        except Exception:  # the data may not be on this machine: fall back to a min-max view
            dataset = None
        nrow = model.num_classes if model.num_classes <= 16 and not args.labels else None
        save_grid(images_of(dataset, x), args.out, nrow=nrow)
        if args.save_npz:
            arrays = {"samples": x.float().cpu().numpy(), "labels": labels.numpy()}
            if cfg["data"]["name"] == "latents":
                stats = payload.get("latent_stats") or getattr(dataset, "latent_stats", None)
                if stats is None:
                    print("ucgm-sample: warning: the checkpoint holds no latent statistics (an older or a published "
                          "one) and the latent file is not here: --save-npz holds model-space samples only",
                          file=sys.stderr)
                else:
                    arrays.update(latents=to_autoencoder_latents(x, stats).cpu().numpy(),
                                  latent_mean=stats["mean"].numpy(), latent_std=stats["std"].numpy(),
                                  latent_multiplier=np.float32(stats["multiplier"]))
            np.savez(args.save_npz, **arrays)
        print(f"{args.num} samples, {steps} steps, {elapsed:.2f} s ({payload['step']} training steps) -> {args.out}")
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"ucgm-sample: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
