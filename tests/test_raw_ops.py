"""torch.ops.ucgm_fast.* called directly (as torch.compile'd code calls them) with arguments the
public functions would refuse: an error, never a kernel reading or writing past a tensor."""
import pytest
import torch

import ucgm_fast  # noqa: F401  (registers the ops)

ops = torch.ops.ucgm_fast
x, F = torch.randn(4, 16), torch.randn(4, 16)
t = torch.rand(4)
sched = torch.tensor([0.7, 0.4, 0.0, 0.2], dtype=torch.float64)
seed = torch.tensor([0])
buf = torch.zeros(64)

CALLS = {
    "buffers shorter than x": lambda: ops.sampler_step(F, x, buf[:4], buf[:4], sched, seed, 0, 0, 1, False),
    "model output of another shape": lambda: ops.sampler_step(F[:2], x, buf[:0], buf[:0], sched, seed, 0, 0, 0,
                                                              False),
    "float32 schedule": lambda: ops.sampler_step(F, x, buf[:0], buf[:0], sched.float(), seed, 0, 0, 0, False),
    "int32 seed": lambda: ops.sampler_step(F, x, buf[:0], buf[:0], sched, seed.int(), 0, 0, 0, False),
    "short schedule": lambda: ops.sampler_correct(F, x, x, x, sched[:2], 0),
    "one time for four rows": lambda: ops.interpolate(x, F, t[:1], 0),
    "z of another dtype": lambda: ops.fd_inputs(x, F.double(), t, 1.0, 0.005, 0),
    "model outputs of two dtypes": lambda: ops.fd_target(F, F.half(), F, x, x, t, 1.0, 0.005, 0),
    "enhance: F_w of another shape": lambda: ops.enhance_target(x, x, F[:, :8], None, t, 0, 1.0, 0.0, 0.75, 0,
                                                                False),
    "loss: target of another shape": lambda: ops.ucgm_loss(F, x[:2], t, 0.0, False, False),
    "loss backward: root of 3 rows": lambda: ops.ucgm_loss_backward(torch.ones(()), F, x, t, t[:3], False, False,
                                                                    True),
    "integer data": lambda: ops.decode(x.long(), x.long(), t, 0),
    "negative numel": lambda: ops.philox_noise(seed, 0, -1, False),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_raw_op_refuses_what_would_leave_its_tensors(call):
    with pytest.raises((ValueError, TypeError), match="ucgm_fast::"):
        call()


def test_raw_ops_run_on_what_the_public_functions_pass():
    x_prev, z_prev = torch.zeros_like(x), torch.zeros_like(x)
    out = ops.sampler_step(F, x, x_prev, z_prev, sched, seed, 0, 0, 1, True)
    assert out[0].shape == x.shape and not torch.equal(x_prev, torch.zeros_like(x))
    loss, root = ops.ucgm_loss(F, x, t, 0.5, False, True)
    g = ops.ucgm_loss_backward(torch.ones(()), F, x, t, root, False, True, True)
    assert g[0].shape == F.shape and g[1].shape == x.shape
    assert ops.coefficients(t, 4)[0].shape == t.shape
