"""PNG outputs of a run: sample grids and the loss curve."""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import List, Optional

import numpy as np
import torch

__all__ = ["save_grid", "save_loss_curve", "read_metrics", "to_display"]


def to_display(x: torch.Tensor) -> torch.Tensor:
    """Model-space tensors (N, C, H, W) with no known decoder -> [0, 1] images for viewing.

    Uses the first 3 channels (or 1) and a per-image min-max stretch: latents have no pixel meaning.
    """
    x = x.detach().float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def save_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None, scale: int = 0, pad: int = 1) -> str:
    """Saves images (N, C, H, W) in [0, 1] (C = 1 or 3) as one PNG grid, nearest-upscaled for small H.

    Images with NaN or infinite values (a diverged sample) are drawn (NaN black, infinities clipped)
    with a RuntimeWarning that counts them: a black tile alone looks like a dark sample.
    """
    from PIL import Image

    images = images.detach().float().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid: images must be (N, 1|3, H, W), got {tuple(images.shape)}")
    bad = ~torch.isfinite(images).flatten(1).all(dim=1)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[:5, 0]]
        warnings.warn(f"save_grid: {int(bad.sum())} of {len(images)} images hold NaN or infinite values (first: "
                      f"{first}); NaN is drawn black in {path}. A diverged sampler or model?", RuntimeWarning,
                      stacklevel=2)
    images = images.nan_to_num(nan=0.0).clamp(0, 1)  # NaN to uint8 is undefined: black, explicitly
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    scale = scale or max(1, 64 // max(h, w))
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):  # at most a few hundred tiles, once per grid
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    arr = (grid.numpy() * 255 + 0.5).astype(np.uint8)
    arr = np.kron(arr, np.ones((1, scale, scale), dtype=np.uint8))
    img = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0), mode="L" if c == 1 else "RGB")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def read_metrics(path: str) -> List[dict]:
    """The JSON lines of a metrics file (malformed trailing lines of a killed writer are skipped)."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def save_loss_curve(metrics_path: str, path: str, title: str = "training loss") -> Optional[str]:
    """Plots ``loss`` against ``step`` from a metrics JSONL file (log-scale y); None if no rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r and "step" in r]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, lw=1, label="loss (log interval mean)")
    if len(loss) >= 10:
        k = max(2, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"moving mean ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
