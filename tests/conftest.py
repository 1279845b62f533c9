"""Shared test fixtures: devices to run on, the per-dtype tolerance table, error helpers."""
import contextlib

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Max error relative to the magnitude of the computation (the largest of the reference output and
# the inputs, so that cancellation such as x_t = alpha z + gamma x with nearly opposite terms is not
# mistaken for a bug), fused op vs float64 oracle. For float16/bfloat16 the bar is also relative to
# PyTorch: at most 2x the error of the eager reference in the same dtype, when that is larger.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rel_err(out: torch.Tensor, ref: torch.Tensor, *inputs: torch.Tensor) -> float:
    """max |out - ref| / max(|ref|, |inputs|) in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    scale = max([float(ref.abs().max())] + [float(x.double().abs().max()) for x in inputs])
    return float((out - ref).abs().max()) / max(scale, 1e-30)


def assert_close_to_oracle(outs, oracle, torch_outs, dtype, inputs=()):
    """Fused outputs vs the float64 oracle under TOLERANCE (see above for low precision)."""
    for out, ref, peer in zip(outs, oracle, torch_outs, strict=True):
        assert out.dtype == dtype
        err = rel_err(out, ref, *inputs)
        bound = TOLERANCE[dtype]
        if dtype in (torch.float16, torch.bfloat16):
            bound = max(2 * rel_err(peer, ref, *inputs), bound)
        assert err <= bound, f"error {err:.3g} > {bound:.3g} ({dtype})"


def assert_same_bits(outs):
    """Every list of output tensors in outs equals the first, bit for bit (dtype and shape too)."""
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            same = torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
            assert same, f"max diff {(a.double() - b.double()).abs().max()}"


@contextlib.contextmanager
def cpu_setting(set_value, value):
    """set_value(value) for the block, then the previous value back (set_value returns it)."""
    previous = set_value(value)
    try:
        yield
    finally:
        set_value(previous)


def set_num_threads(n: int) -> int:
    """torch.set_num_threads(n); returns the previous count (for cpu_setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def pytest_collection_modifyitems(config, items):
    # Every test skipped without CUDA carries the `cuda` marker, so `-k cuda` (the GPU check's
    # selection) finds it even when "cuda" is not in its name or parameters.
    for item in items:
        if any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
