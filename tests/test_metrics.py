"""Metrics on real digits: the cached classifier, FD and its floor, KID, accuracy, memorisation, FID."""
import numpy as np
import pytest
import torch

from ucgm_fast import metrics
from ucgm_fast.data import ImageDataset, get_dataset


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits"), get_dataset("digits", split="test")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def classifier(digits, cache_dir):
    train, test = digits
    return metrics.load_or_train_classifier(train, heldout=test, cache_dir=cache_dir)


def test_classifier_is_accurate_and_cached(classifier, digits, cache_dir):
    train, test = digits
    assert classifier.accuracy >= 0.9
    files = list(cache_dir.glob("classifier-digits-*.pt"))
    assert len(files) == 1
    again = metrics.load_or_train_classifier(train, heldout=test, cache_dir=cache_dir)  # loads, no training
    for a, b in zip(again.state_dict().values(), classifier.state_dict().values()):
        assert torch.equal(a, b)
    assert again.accuracy == classifier.accuracy
    assert metrics.class_accuracy(again, test.images, test.labels) == pytest.approx(classifier.accuracy)


def test_corrupt_cache_is_retrained_and_low_accuracy_raises(digits, tmp_path):
    train, test = digits
    small = train.subset(torch.arange(64))
    path = tmp_path / f"classifier-digits-{metrics._dataset_digest(small)}-e1-b64.pt"
    path.write_bytes(b"not a checkpoint")
    # 64 images, 1 epoch: far from accurate, so the check refuses it (and the corrupt file was not trusted).
    with pytest.raises(RuntimeError, match="held-out accuracy"):
        metrics.load_or_train_classifier(small, heldout=test, cache_dir=tmp_path, epochs=1, min_accuracy=0.95)


def test_cache_is_per_training_setting_and_checks_the_floor(digits, tmp_path):
    train, test = digits
    small = train.subset(torch.arange(64))
    weak = metrics.load_or_train_classifier(small, heldout=test, cache_dir=tmp_path, epochs=1, min_accuracy=0.0)
    assert weak.accuracy < 0.9
    with pytest.raises(RuntimeError, match="held-out accuracy"):  # cached, but below the floor asked for now
        metrics.load_or_train_classifier(small, heldout=test, cache_dir=tmp_path, epochs=1, min_accuracy=0.9)
    more = metrics.load_or_train_classifier(small, heldout=test, cache_dir=tmp_path, epochs=3, min_accuracy=0.0)
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 2  # more epochs: trained, not the cached one
    assert any(not torch.equal(a, b) for a, b in zip(weak.state_dict().values(), more.state_dict().values()))


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((4000, 3)))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Same covariance, shifted mean: FD = ||shift||^2.
    assert metrics.frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-9)
    # Scaled by s: mean s mu, covariance s^2 S, so FD = (1 - s)^2 (||mu||^2 + tr S).
    s = 3.0
    expected = (1 - s) ** 2 * (float(a.mean(0).square().sum()) + float(torch.cov(a.T).trace()))
    assert metrics.frechet_distance(a, a * s) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="feature widths differ"):
        metrics.frechet_distance(a, a[:, :2])


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6)) + 0.3
    ca, cb = np.cov(a.T), np.cov(b.T)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert metrics.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-8)


def test_kernel_mmd_unbiased_near_zero_for_same_distribution():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=gen).double(), torch.randn(300, 8, generator=gen).double()
    same = metrics.kernel_mmd(a, b, subsets=20, subset_size=200)
    shifted = metrics.kernel_mmd(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.02 and shifted > 0.1
    # One subset of all rows equals the closed-form unbiased estimator.
    k = lambda x, y: (x @ y.T / 8 + 1) ** 3
    m = 300
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    exact = (kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean()
    assert metrics.kernel_mmd(a, b, subsets=1, subset_size=m) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


def test_fd_floor_and_separation_on_digits(classifier, digits):
    train, test = digits
    n = len(test)
    ref = metrics.extract_features(classifier, test.images)
    floor = metrics.frechet_floor(classifier, train.images, test.images, n, heldout_features=ref)
    noise = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = metrics.frechet_distance(metrics.extract_features(classifier, noise), ref)
    blurred = torch.nn.functional.avg_pool2d(train.images[:n], 3, 1, 1)
    fd_blur = metrics.frechet_distance(metrics.extract_features(classifier, blurred), ref)
    assert 0 < floor < fd_blur < fd_noise
    assert fd_noise > 10 * floor
    # Fewer samples give a higher floor (the estimator's bias): the floor must be taken at the same N.
    assert metrics.frechet_floor(classifier, train.images, test.images, 60, heldout_features=ref) > floor


def test_class_accuracy_of_wrong_labels_is_low(classifier, digits):
    _, test = digits
    assert metrics.class_accuracy(classifier, test.images, (test.labels + 1) % 10) < 0.1
    with pytest.raises(ValueError, match="labels have shape"):
        metrics.class_accuracy(classifier, test.images, test.labels[:5])
    with pytest.raises(ValueError, match="channels"):
        metrics.class_accuracy(classifier, test.images.expand(-1, 3, -1, -1), test.labels)


def test_memorisation_check_flags_copies(digits):
    train, test = digits
    copies = metrics.memorisation_check(train.images[:100], train.images, test.images)
    assert copies["nn_dist_generated"] == 0.0 and copies["nn_ratio"] == 0.0
    fresh = metrics.memorisation_check(test.images[100:200], train.images, test.images)
    assert 0.7 < fresh["nn_ratio"] < 1.3
    d = metrics.nearest_neighbour_distance(train.images[:3] + 0.5, train.images)
    assert d.shape == (3,) and (d <= 0.5 + 1e-6).all()


def test_evaluate_samples_reports_every_metric(classifier, digits):
    train, test = digits
    samples, labels = test.images[:120], test.labels[:120]
    out = metrics.evaluate_samples(samples, labels, train, classifier=classifier, heldout=test, kid_subsets=5)
    assert out["n"] == 120 and out["accuracy"] > 0.9
    assert out["fd_ratio"] < 2.5 and out["fd_floor"] > 0
    for key in ("fd", "kid", "kid_floor", "nn_dist_generated", "nn_dist_heldout", "nn_ratio", "classifier_accuracy"):
        assert np.isfinite(out[key])
    with pytest.raises(ValueError, match="samples have shape"):
        metrics.evaluate_samples(torch.zeros(4, 1, 6, 6), labels[:4], train, classifier=classifier, heldout=test)


def test_evaluate_samples_floor_is_frechet_floor(classifier, digits):
    # One floor: evaluate_samples' fd_floor is frechet_floor's at the same N and seed, and it refuses
    # more samples than the train split holds instead of taking the floor at a smaller N.
    train, test = digits
    samples, labels = test.images[:100], test.labels[:100]
    out = metrics.evaluate_samples(samples, labels, train, classifier=classifier, heldout=test, kid_subsets=2, seed=3)
    assert out["fd_floor"] == metrics.frechet_floor(classifier, train.images, test.images, 100, seed=3)
    small = ImageDataset(train.images[:50], train.labels[:50], train.num_classes, train.name)
    with pytest.raises(ValueError, match=r"evaluate_samples: the floor needs n in \[2, 50\]"):
        metrics.evaluate_samples(samples, labels, small, classifier=classifier, heldout=test, kid_subsets=2)
    with pytest.raises(ValueError, match="frechet_floor: the floor needs n"):
        metrics.frechet_floor(classifier, train.images, test.images, 1)


class TinyInception(torch.nn.Module):
    """Stand-in for an exported Inception: checks its input contract, returns (N, 6) features."""

    def forward(self, x):
        assert x.shape[1:] == (3, 32, 32)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 255.0
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).repeat(1, 2) / 255.0 \
            + x[:, :, :2, :2].flatten(1)[:, :6] / 255.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, still what users have
def test_inception_fid_with_scripted_stand_in(tmp_path, digits):
    train, test = digits
    path = tmp_path / "inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    same = metrics.inception_fid(test.images[:100], test.images[:100], path, resize=32)
    other = metrics.inception_fid(torch.full((100, 1, 8, 8), 1.0), test.images[:100], path, resize=32)
    assert same == pytest.approx(0.0, abs=1e-9) and other > same
    with pytest.raises(FileNotFoundError, match="no TorchScript file"):
        metrics.inception_fid(test.images, test.images, tmp_path / "missing.pt")
