"""Shared test fixtures: devices to run on, the per-dtype tolerance table, error helpers."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Max error relative to the largest reference magnitude, fused op vs float64 oracle.
# For float16/bfloat16 the bar is relative instead: at most 2x PyTorch's own error in that dtype
# (both against float64), with this as a floor for outputs PyTorch happens to round exactly.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(|ref|) in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def assert_close_to_oracle(outs, oracle, torch_outs, dtype):
    """Fused outputs vs the float64 oracle under TOLERANCE (see above for low precision)."""
    for out, ref, peer in zip(outs, oracle, torch_outs):
        assert out.dtype == dtype
        err = rel_err(out, ref)
        bound = TOLERANCE[dtype]
        if dtype in (torch.float16, torch.bfloat16):
            bound = max(2 * rel_err(peer, ref), bound)
        assert err <= bound, f"error {err:.3g} > {bound:.3g} ({dtype})"
