"""``ucgm-eval``: score a checkpoint's samples against held-out data.

    ucgm-eval --ckpt runs/digits_multistep/checkpoints/0002600.pt --steps 30 --repeats 3

Prints the Fréchet distance in the feature space of a small CNN classifier (trained once on the
train split, cached) beside the real-vs-real floor at the same number of samples, the unbiased
kernel MMD, the class accuracy of class-conditional samples, and the nearest-training-neighbour
distance of samples vs held-out images (memorisation check). ``--inception FILE`` adds FID with a
TorchScript Inception network. See :mod:`ucgm_fast.metrics`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import torch

from .checkpoint import CheckpointError
from .config import ConfigError, check_sampler_settings
from .sample_cli import add_sampler_arguments, resolve_device, sampler_overrides

__all__ = ["main", "generate"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ucgm-eval", description="Score a ucgm_fast checkpoint's samples.")
    p.add_argument("--ckpt", required=True, help="training checkpoint (.pt)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config sample.sampling_steps)")
    p.add_argument("--num", type=int, default=None, help="samples to score (default: config eval.num_samples)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: config sample.seed)")
    p.add_argument("--repeats", type=int, default=1,
                   help="score this many sample sets (seeds seed, seed+1, ...) and report mean and spread: "
                        "FD at N=1000 moves by about +-10%% between seeds")
    add_sampler_arguments(p)
    p.add_argument("--no-ema", action="store_true", help="score the online weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache-dir", default=None, help="feature-classifier cache (default ~/.cache/ucgm_fast)")
    p.add_argument("--inception", default=None, help="TorchScript Inception file: also report FID")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--grid", default=None, help="also save the first 100 samples as a PNG grid")
    return p


@torch.no_grad()
def generate(model, cfg, num: int, steps: int, seed: int = 0, labels: Optional[torch.Tensor] = None,
             progress: Optional[str] = None, **overrides):
    """(samples, labels): num samples (float32, CPU) in batches of sample.per_batch_size.

    Labels default to class-balanced ones (0..num_classes-1 cycled). Batch i is drawn with seed
    ``seed * 100_003 + i`` (its noise and its step noise), so ucgm-sample and ucgm-eval give the same
    samples for the same seed, and the sets of ucgm-eval --repeats (seeds seed, seed + 1, ...) never
    share a batch's noise. ``progress``: a label for a progress bar on stderr (shown for more than
    one batch).
    """
    from .train import grid_labels, sample_images

    device = next(model.parameters()).device
    labels = grid_labels(model.num_classes, num) if labels is None else labels
    if len(labels) != num:
        raise ValueError(f"generate: {len(labels)} labels for {num} samples")
    per = int(cfg["sample"]["per_batch_size"])
    starts = range(0, num, per)
    bar = None
    if progress and len(starts) > 1:
        from tqdm import tqdm

        bar = tqdm(total=num, desc=progress, unit="sample", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    out = []
    try:
        for i, start in enumerate(starts):
            y = labels[start:start + per].to(device)
            out.append(sample_images(model, cfg, y, seed=seed * 100_003 + i, steps=steps, **overrides).float().cpu())
            if bar is not None:
                bar.update(len(y))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out), labels


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import metrics
    from .plots import save_grid
    from .train import build_dataset, images_of, load_model_from_checkpoint

    args = _parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        model, cfg, payload = load_model_from_checkpoint(args.ckpt, use_ema=not args.no_ema)
        if args.seed is None:
            args.seed = int(cfg["sample"]["seed"])
        if cfg["data"]["name"] == "latents":
            raise ConfigError("ucgm-eval scores pixel datasets; latents need their VAE decoder first "
                              "(decode ucgm-sample --save-npz output and use an Inception FID)")
        model = model.to(device)
        train_set, heldout = build_dataset(cfg, "train"), build_dataset(cfg, "test")
        num = args.num if args.num is not None else cfg["eval"]["num_samples"]
        if not 2 <= num <= len(train_set):
            raise ConfigError(f"--num must be in [2, {len(train_set)}] (the floor draws as many train images)")
        steps = args.steps if args.steps is not None else cfg["sample"]["sampling_steps"]
        if steps < 1:
            raise ConfigError("--steps must be >= 1")
        if args.repeats < 1:
            raise ConfigError("--repeats must be >= 1")
        overrides = sampler_overrides(args)
        check_sampler_settings(cfg, steps, **overrides)  # before the classifier trains
        classifier = metrics.load_or_train_classifier(train_set, heldout=heldout, cache_dir=args.cache_dir
                                                      or cfg["eval"]["cache_dir"],
                                                      epochs=cfg["eval"]["classifier_epochs"])
        runs = []
        for seed in range(args.seed, args.seed + args.repeats):
            start = time.perf_counter()
            samples, labels = generate(model, cfg, num, steps, seed=seed, progress="ucgm-eval: sampling",
                                       **overrides)
            gen_s = time.perf_counter() - start
            if args.grid and seed == args.seed:
                save_grid(images_of(train_set, samples[:100]), args.grid,
                          nrow=model.num_classes if model.num_classes <= 16 else None)
            res = metrics.evaluate_samples(samples, labels, train_set, classifier=classifier, heldout=heldout,
                                           seed=seed)
            res.update({"steps": steps, "train_step": int(payload["step"]), "checkpoint": args.ckpt,
                        "sampling_seconds": gen_s, "weights": "online" if args.no_ema else "ema", "seed": seed})
            if args.inception:
                res["fid"] = metrics.inception_fid(samples, heldout.images, args.inception)
            _report(res, cfg["data"]["name"])
            runs.append(res)
        out = runs[0] if len(runs) == 1 else _summary(runs, cfg["data"]["name"])
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=1, default=float)
    except (ConfigError, CheckpointError, FileNotFoundError, metrics.WeakClassifierError) as err:
        print(f"ucgm-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


def _summary(runs: list, name: str) -> dict:
    """Mean and standard deviation over repeats of every number; the ratio is mean FD / mean floor."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("seed", "steps", "train_step", "n")]
    out = {k: runs[0][k] for k in runs[0] if k not in keys}
    for k in keys:
        vals = torch.tensor([float(r[k]) for r in runs], dtype=torch.float64)
        out[k], out[k + "_std"] = float(vals.mean()), float(vals.std())
    out["fd_ratio"] = out["fd"] / max(out["fd_floor"], 1e-12)
    out["repeats"] = runs
    print(f"{name}: mean of {len(runs)} sample sets (seeds {runs[0]['seed']}..{runs[-1]['seed']}): "
          f"FD {out['fd']:.4f} +- {out['fd_std']:.4f}, floor {out['fd_floor']:.4f} +- {out['fd_floor_std']:.4f}, "
          f"ratio {out['fd_ratio']:.3f}; class acc {out['accuracy']:.4f}")
    return out


def _report(r: dict, name: str) -> None:
    print(f"{name}: {r['n']} samples, {r['steps']} steps ({r['weights']} weights, training step {r['train_step']}), "
          f"sampled in {r['sampling_seconds']:.1f} s")
    print(f"  FD        {r['fd']:.4f}   real-vs-real floor at N={r['n']}: {r['fd_floor']:.4f}   "
          f"ratio {r['fd_ratio']:.3f}")
    print(f"  MMD       {r['kid']:.6f}   floor {r['kid_floor']:.6f}")
    acc = r.get("classifier_accuracy")
    print(f"  class acc {r['accuracy']:.4f}   (classifier on held-out data: "
          f"{acc:.4f})" if acc is not None else f"  class acc {r['accuracy']:.4f}")
    if "nn_dist_generated" in r:
        print(f"  nearest-train-neighbour distance: samples {r['nn_dist_generated']:.4f}, held-out "
              f"{r['nn_dist_heldout']:.4f}, ratio {r['nn_ratio']:.3f} (a ratio well below 1 would mean memorisation)")
    if "fid" in r:
        print(f"  FID       {r['fid']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
