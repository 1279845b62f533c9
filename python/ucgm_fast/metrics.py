"""Sample-quality metrics for small real datasets, in the feature space of a small CNN classifier.

Inception features mean little on 8x8 digits or 28x28 clothes, so the Fréchet distance (FD) and the
kernel MMD here use the penultimate features of a small CNN trained on the dataset's train split
(trained once, cached on disk, checked for held-out accuracy). Every generated-sample score has a
real-data counterpart at the same sample count, so a number can be read against its floor:

- :func:`frechet_distance` of N generated samples vs the held-out set, beside
  :func:`frechet_floor`: N train-split images vs the same held-out set.
- :func:`kernel_mmd`: unbiased MMD^2 with the cubic polynomial kernel of KID.
- :func:`class_accuracy`: how often the classifier gives a generated sample its conditioning label.
- :func:`nearest_neighbour_distance`: pixel L2 to the closest training image, generated vs held-out
  (a generated mean far below the held-out one means the model copies its training set).
- :func:`inception_fid`: FID from a user-supplied TorchScript Inception file (nothing is downloaded).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageDataset, get_dataset

class WeakClassifierError(RuntimeError):
    """The feature classifier's held-out accuracy is below the floor asked for."""


#: Default cache of trained classifiers: $UCGM_CACHE_DIR or ~/.cache/ucgm_fast.
DEFAULT_CACHE_DIR = Path(os.environ.get("UCGM_CACHE_DIR", Path.home() / ".cache" / "ucgm_fast"))


#: Images with at most this many pixels per channel run the classifier on one thread. Its convolutions
#: on 8x8 digits are too small to split: measured on this project's 2-core machine (busy with other
#: jobs), training the digits classifier took 12 s on 1 thread and 98 s on 2 threads.
SINGLE_THREAD_MAX_PIXELS = 256


@contextlib.contextmanager
def _threads_for(images: torch.Tensor):
    """One intra-op thread for small images (see SINGLE_THREAD_MAX_PIXELS), torch's setting otherwise."""
    before = torch.get_num_threads()
    small = images.shape[-1] * images.shape[-2] <= SINGLE_THREAD_MAX_PIXELS
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small and before > 1:
            torch.set_num_threads(before)


#################################################################################
#                              Feature classifier                               #
#################################################################################

class FeatureClassifier(nn.Module):
    """Three 3x3 conv layers (two of stride 2), global average pool -> features (B, width * 4) -> logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * width), nn.SiLU(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def features(self, x):
        """Penultimate features: the spatial mean of the last conv block, (B, 4 * width)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _evaluate_accuracy(model: FeatureClassifier, data: ImageDataset, batch_size: int = 1000) -> float:
    return class_accuracy(model, data.images, data.labels, batch_size=batch_size)


def train_classifier(train: ImageDataset, heldout: ImageDataset, epochs: int = 10, batch_size: int = 64,
                     lr: float = 5e-3, seed: int = 0, width: int = 32, verbose: bool = False):
    """(classifier, held-out accuracy): AdamW with a one-cycle schedule, light shift augmentation."""
    with _threads_for(train.images):
        return _train_classifier(train, heldout, epochs, batch_size, lr, seed, width, verbose)


def _train_classifier(train, heldout, epochs, batch_size, lr, seed, width, verbose):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(train.in_channels, train.num_classes, width)
    steps = epochs * max(1, len(train) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    pad = max(1, train.input_size // 8)
    model.train()
    start, step = time.time(), 0
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(len(train) // batch_size or 1):
            index = perm[i * batch_size:(i + 1) * batch_size]
            x, y = train.images[index], train.labels[index]
            # Random translations by up to `pad` pixels: features robust to small shifts generalise better.
            dx, dy = torch.randint(-pad, pad + 1, (2,), generator=gen).tolist()
            x = torch.roll(F.pad(x, (pad,) * 4, value=-1.0), shifts=(dy, dx), dims=(2, 3))[..., pad:-pad, pad:-pad]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step < steps - 1:
                sched.step()
            step += 1
        if verbose:
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} ({time.time() - start:.1f}s)")
    model.eval()
    return model, _evaluate_accuracy(model, heldout)


def _dataset_digest(data: ImageDataset) -> str:
    """A short hash of the training images and labels: the cache key changes when the data does."""
    h = hashlib.sha1()
    h.update(str((tuple(data.images.shape), data.num_classes)).encode())
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _train_and_heldout(op: str, dataset, heldout, **dataset_kw):
    """(train split, held-out split) from a dataset name, or from an ImageDataset plus heldout=."""
    if isinstance(dataset, str):
        train = get_dataset(dataset, split="train", **dataset_kw)
        return train, heldout if heldout is not None else get_dataset(dataset, split="test", **dataset_kw)
    if isinstance(dataset, ImageDataset):
        if heldout is None:
            raise ValueError(f"{op}: pass heldout= when dataset is an ImageDataset")
        return dataset, heldout
    raise TypeError(f"dataset must be a dataset name or an ImageDataset, got {type(dataset).__name__}")


def load_or_train_classifier(dataset, heldout: ImageDataset = None, cache_dir=None, min_accuracy: float = 0.8,
                             epochs: int = None, verbose: bool = False, **dataset_kw) -> FeatureClassifier:
    """The cached classifier for a dataset, trained on its train split if absent (then saved atomically).

    Parameters
    ----------
    dataset : str or ImageDataset
        A :func:`~ucgm_fast.data.get_dataset` name (its train / test splits are used) or a train split.
    heldout : ImageDataset, optional
        The held-out split for the accuracy check (required when ``dataset`` is an ImageDataset).
    cache_dir : path, optional
        Where classifiers are kept (default ``$UCGM_CACHE_DIR`` or ``~/.cache/ucgm_fast``), one file per
        dataset name, content hash, epochs and batch size.
    min_accuracy : float
        A classifier (fresh or cached) below this held-out accuracy raises RuntimeError: features of a
        classifier that did not learn the classes make every score meaningless.
    epochs : int, optional
        Training epochs (default: 10 for datasets under 5000 images, else 4). Measured on this busy
        2-core machine, 1 thread: digits (1438 train images), 10 epochs of batch 64, ~10 s, ~98% held-out
        accuracy; Fashion-MNIST, 2 epochs of batch 128, 770 s, 80.0% (hence 4 by default).
    """
    train, heldout = _train_and_heldout("load_or_train_classifier", dataset, heldout, **dataset_kw)
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    name = (train.name or "dataset").replace("/", "_")
    if epochs is None:
        epochs = 10 if len(train) < 5000 else 4
    batch_size = 64 if len(train) < 5000 else 128
    # One file per data and training settings: a classifier trained for other epochs is another one.
    path = cache_dir / f"classifier-{name}-{_dataset_digest(train)}-e{epochs}-b{batch_size}.pt"
    model = None
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = FeatureClassifier(saved["in_channels"], saved["num_classes"], saved["width"])
            model.load_state_dict(saved["state_dict"])
            accuracy = float(saved["accuracy"])
        except Exception as exc:  # a corrupt cache entry is retrained, never trusted
            model = None
            if verbose:
                print(f"classifier cache {path} unreadable ({exc}); retraining")
    fresh = model is None
    if fresh:
        model, accuracy = train_classifier(train, heldout, epochs=epochs, batch_size=batch_size, verbose=verbose)
    if accuracy < min_accuracy:  # also for a cached one: the floor asked for now is what counts
        raise WeakClassifierError(f"the feature classifier for {name} reached only {accuracy:.3f} held-out accuracy "
                           f"(< min_accuracy={min_accuracy}); its features would not measure sample quality")
    model.eval()
    model.accuracy = accuracy
    if not fresh:
        return model
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"in_channels": model.in_channels, "num_classes": model.num_classes, "width": model.width,
                "accuracy": accuracy, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return model


#################################################################################
#                                Feature metrics                                #
#################################################################################

@torch.no_grad()
def extract_features(classifier: FeatureClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """classifier.features of images (N, C, H, W) in float64, (N, F), computed in batches on CPU."""
    _check_images("extract_features", images, classifier)
    with _threads_for(images):
        feats = [classifier.features(images[i:i + batch_size].float().cpu())
                 for i in range(0, len(images), batch_size)]
    return torch.cat(feats).double()


def _check_images(op, images, classifier=None):
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{op}: images must be a (N, C, H, W) tensor, got {shape}")
    if len(images) == 0:
        raise ValueError(f"{op}: images is empty")
    if classifier is not None and images.shape[1] != classifier.in_channels:
        raise ValueError(f"{op}: images have {images.shape[1]} channels but the classifier takes "
                         f"{classifier.in_channels}")


def _as_features(op, x):
    x = torch.as_tensor(x).double()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{op}: features must have shape (N >= 2, F), got {tuple(x.shape)}")
    return x


def frechet_distance(feats_a, feats_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, F).

    tr((S_a S_b)^(1/2)) is computed as the sum of sqrt of the eigenvalues of the symmetric PSD matrix
    S_a^(1/2) S_b S_a^(1/2) (same spectrum), in float64: stable where scipy's sqrtm returns complex noise.
    """
    a, b = _as_features("frechet_distance", feats_a), _as_features("frechet_distance", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature widths differ ({a.shape[1]} vs {b.shape[1]})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)


def kernel_mmd(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, degree: int = 3, coef0: float = 1.0,
               seed: int = 0) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / F + coef0)^degree (KID), averaged over random subsets.

    Per subset of m rows from each set: sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (m(m-1))
    - 2 sum_{i,j} k(a_i, b_j) / m^2; m = min(subset_size, N_a, N_b).
    """
    a, b = _as_features("kernel_mmd", feats_a), _as_features("kernel_mmd", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_mmd: feature widths differ ({a.shape[1]} vs {b.shape[1]})")
    dim = a.shape[1]
    m = min(subset_size, len(a), len(b))
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=gen)[:m]]
        y = b[torch.randperm(len(b), generator=gen)[:m]]
        kxx = (x @ x.T / dim + coef0) ** degree
        kyy = (y @ y.T / dim + coef0) ** degree
        kxy = (x @ y.T / dim + coef0) ** degree
        total += float((kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                       - 2 * kxy.mean())
    return total / subsets


@torch.no_grad()
def class_accuracy(classifier: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 1000) -> float:
    """Fraction of images whose classifier argmax equals the label they were generated for."""
    _check_images("class_accuracy", images, classifier)
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != (len(images),):
        raise ValueError(f"class_accuracy: labels have shape {tuple(labels.shape)}; expected ({len(images)},)")
    correct = 0
    with _threads_for(images):
        for i in range(0, len(images), batch_size):
            pred = classifier(images[i:i + batch_size].float().cpu()).argmax(1)
            correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / len(images)


@torch.no_grad()
def nearest_neighbour_distance(images: torch.Tensor, train_images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """min_j ||images_i - train_j||_2 / sqrt(D) for each image i: (N,) per-pixel RMS distance to the closest."""
    _check_images("nearest_neighbour_distance", images)
    _check_images("nearest_neighbour_distance", train_images)
    if images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"nearest_neighbour_distance: images of shape {tuple(images.shape[1:])} vs training "
                         f"images of shape {tuple(train_images.shape[1:])}")
    x = images.flatten(1).float().cpu()
    ref = train_images.flatten(1).float().cpu()
    dists = [torch.cdist(x[i:i + chunk], ref).min(dim=1).values for i in range(0, len(x), chunk)]
    return torch.cat(dists) / x.shape[1] ** 0.5


def memorisation_check(generated: torch.Tensor, train_images: torch.Tensor, heldout_images: torch.Tensor,
                       seed: int = 0) -> dict:
    """Mean nearest-training-image distance of generated vs held-out images (same count); ratio < 1 hints at copying."""
    n = min(len(generated), len(heldout_images))
    gen = torch.Generator().manual_seed(seed)
    heldout = heldout_images[torch.randperm(len(heldout_images), generator=gen)[:n]]
    d_gen = float(nearest_neighbour_distance(generated[:n], train_images).mean())
    d_held = float(nearest_neighbour_distance(heldout, train_images).mean())
    return {"nn_dist_generated": d_gen, "nn_dist_heldout": d_held, "nn_ratio": d_gen / max(d_held, 1e-12)}


def _floor_features(op: str, classifier: FeatureClassifier, train_images: torch.Tensor, n: int,
                    seed: int) -> torch.Tensor:
    """Features of the floor's real sample: n train-split images drawn without replacement by seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n > len(train_images):
        raise ValueError(f"{op}: the floor needs n in [2, {len(train_images)}] train images (as many as the "
                         f"samples scored), got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    return extract_features(classifier, train_images[torch.randperm(len(train_images), generator=gen)[:n]])


def frechet_floor(classifier: FeatureClassifier, train_images: torch.Tensor, heldout_images: torch.Tensor, n: int,
                  seed: int = 0, heldout_features: torch.Tensor = None) -> float:
    """FD of n random train-split images vs the held-out set: the best a model can score with n samples."""
    ref = heldout_features if heldout_features is not None else extract_features(classifier, heldout_images)
    return frechet_distance(_floor_features("frechet_floor", classifier, train_images, n, seed), ref)


def evaluate_samples(samples: torch.Tensor, labels: torch.Tensor, dataset, classifier: FeatureClassifier = None,
                     heldout: ImageDataset = None, cache_dir=None, kid_subsets: int = 100, seed: int = 0) -> dict:
    """Every metric of this module for generated samples (N, C, H, W) in [-1, 1] conditioned on labels (N,).

    Returns a dict: n, fd, fd_floor (N train images vs held-out), fd_ratio, kid, kid_floor, accuracy,
    classifier_accuracy (on held-out), nn_dist_generated, nn_dist_heldout, nn_ratio.
    """
    train, heldout = _train_and_heldout("evaluate_samples", dataset, heldout)
    _check_images("evaluate_samples", samples)
    if samples.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"evaluate_samples: samples have shape {tuple(samples.shape[1:])} but {train.name} "
                         f"images have shape {tuple(train.images.shape[1:])}")
    if classifier is None:
        classifier = load_or_train_classifier(train, heldout=heldout, cache_dir=cache_dir)
    n = len(samples)
    # frechet_floor's real sample (same n and seed: fd_floor == frechet_floor(..., n, seed)), kept for
    # the MMD floor too rather than extracted twice. More samples than train images is an error, not a
    # floor taken at a smaller N.
    real_feats = _floor_features("evaluate_samples", classifier, train.images, n, seed)
    samples = samples.detach().float().cpu().clamp(-1, 1)
    ref = extract_features(classifier, heldout.images)
    gen_feats = extract_features(classifier, samples)
    fd, floor = frechet_distance(gen_feats, ref), frechet_distance(real_feats, ref)
    out = {
        "n": n,
        "fd": fd,
        "fd_floor": floor,
        "fd_ratio": fd / max(floor, 1e-12),
        "kid": kernel_mmd(gen_feats, ref, subsets=kid_subsets, seed=seed),
        "kid_floor": kernel_mmd(real_feats, ref, subsets=kid_subsets, seed=seed),
        "accuracy": class_accuracy(classifier, samples, labels),
        "classifier_accuracy": getattr(classifier, "accuracy", None),
    }
    out.update(memorisation_check(samples, train.images, heldout.images, seed=seed))
    return out


#################################################################################
#                         FID from a TorchScript Inception                      #
#################################################################################

@torch.no_grad()
def inception_features(model, images: torch.Tensor, batch_size: int = 100, resize: int = 299,
                       input_range=(0.0, 255.0), device=None) -> torch.Tensor:
    """Features (N, F) of a TorchScript feature extractor for images in [-1, 1]: grey -> RGB, resized, rescaled.

    ``input_range`` is the pixel range the module expects ((0, 255) for the common exported Inception-v3
    of the FID literature, (-1, 1) or (0, 1) for others); outputs with more than two dims are flattened.
    """
    _check_images("inception_features", images)
    lo, hi = input_range
    device = torch.device(device) if device is not None else torch.device("cpu")
    feats = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().to(device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"inception_features: images need 1 or 3 channels, got {x.shape[1]}")
        if resize and x.shape[-1] != resize:
            x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
        x = (x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        feats.append(out.flatten(1).double().cpu())
    return torch.cat(feats)


def inception_fid(generated: torch.Tensor, reference: torch.Tensor, inception_path, **kw) -> float:
    """FID: frechet_distance of a TorchScript Inception's features (``torch.jit.load(inception_path)``)."""
    path = Path(inception_path)
    if not path.is_file():
        raise FileNotFoundError(f"inception_fid: no TorchScript file at {path}")
    device = kw.get("device")
    model = torch.jit.load(str(path), map_location=device or "cpu").eval()
    return frechet_distance(inception_features(model, generated, **kw), inception_features(model, reference, **kw))
