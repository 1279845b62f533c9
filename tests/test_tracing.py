"""Tracers that see only the dispatcher (make_fx, torch.jit.trace) record the fused ops: the eager
fast path, which runs the kernels on raw pointers, steps aside for them."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ucgm_fast


def step(x, z, t):
    x_t, target = ucgm_fast.interpolate(x, z, t, "EDM")
    return ucgm_fast.ucgm_loss(x_t, target, t, huber_eps=0.5)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g), torch.rand(3, generator=g)


def test_make_fx_records_the_ops_and_replays_them():
    graph = make_fx(step)(*_inputs(0))
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"ucgm_fast.interpolate.default", "ucgm_fast.ucgm_loss.default"} <= targets
    other = _inputs(1)
    torch.testing.assert_close(graph(*other), step(*other), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_replays_on_new_inputs():
    traced = torch.jit.trace(lambda x, z, t: ucgm_fast.decode(x, z, t, "Linear")[0], _inputs(0))
    other = _inputs(2)
    torch.testing.assert_close(traced(*other), ucgm_fast.decode(*other, "Linear")[0])
