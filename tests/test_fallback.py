"""The path every op takes where the build has no kernel for the device (e.g. a GPU newer than the
compiled architectures): the eager reference behind the same op. Here, on CPU, each op runs once
with its kernel and once with every kernel reported missing, and the two must agree."""
import pytest
import torch

import ucgm_fast
from ucgm_fast import _kernels

TRANSPORTS = ("Linear", "EDM", "TrigFlow")
SHAPE = (6, 3, 5, 7)


@pytest.fixture
def without_kernels(monkeypatch):
    """Runs fn() with every compiled kernel reported unavailable, after checking that one is there."""
    def run(fn):
        assert _kernels.Kernel("mix").available(torch.zeros(1)), "this build has no CPU kernels to compare with"
        with monkeypatch.context() as m:
            m.setattr(_kernels.Kernel, "available", lambda self, like: False)
            return fn()
    return run


def _same(a, b, tol):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)  # rows of no elements: NaN means
    else:
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v, tol)


def _data(dtype, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, z, F, G = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x, z, F, G, t.to(torch.float32 if dtype != torch.float64 else dtype)


TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_ops(without_kernels, transport, dtype):
    x, z, F, _, t = _data(dtype)

    def run():
        xr, Fr = x.clone().requires_grad_(), F.clone().requires_grad_()
        out = ucgm_fast.decode(xr, Fr, t, transport)
        grads = torch.autograd.grad(out[0].sum() + 2 * out[1].sum(), (xr, Fr))
        return ucgm_fast.coefficients(t, transport), ucgm_fast.interpolate(x, z, t, transport), out, grads

    _same(run(), without_kernels(run), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_objective_ops(without_kernels, transport, dtype):
    x, z, F, G, t = _data(dtype)

    def run():
        enhanced = ucgm_fast.enhance_target(x, z, F, G, t, transport, 1.5, num_dropped=2)
        emitted = ucgm_fast.enhance_target(x, z, F, G, t, transport, 1.5, num_dropped=2, return_target=True)
        inputs = ucgm_fast.fd_inputs(x, z, t, transport, 1.0)
        fd = [ucgm_fast.fd_target(F, G, F + 0.01 * G, x, z, t, transport, lam) for lam in (1.0, 0.5)]
        return enhanced, emitted, inputs, fd

    # In float32 the finite-difference target divides a difference of nearby outputs by 2 eps = 0.01:
    # both paths round, and the quotient carries their last-bit differences a hundredfold.
    _same(run(), without_kernels(run), 1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("shape", [SHAPE, (4, 0, 5), (4, 3, 0)], ids=["data", "no-channels", "no-positions"])
@pytest.mark.parametrize("cosine", [False, True])
def test_loss_and_its_backward(without_kernels, cosine, shape):
    F, T, _, _, t = _data(torch.float64, shape)

    def run():
        Fr, Tr = F.clone().requires_grad_(), T.clone().requires_grad_()
        loss = ucgm_fast.ucgm_loss(Fr, Tr, t, huber_eps=0.5, cosine=cosine, time_weighting=True)
        return (loss, *torch.autograd.grad(loss, (Fr, Tr)))

    _same(run(), without_kernels(run), 1e-12)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sampler_ops(without_kernels, transport):
    F, x, G, H, _ = _data(torch.float32)
    start = (G.clone(), H.clone())

    def run():
        x_prev, z_prev = (v.clone() for v in start)
        step = ucgm_fast.sampler_step(F, x, 0.7, 0.4, transport, step=3, stochast_ratio=0.5, extrapol_ratio=0.2,
                                      seed=11, x_prev=x_prev, z_prev=z_prev, return_hats=True)
        corrected = ucgm_fast.sampler_correct(G, step[0], x, step[2], 0.7, 0.4, transport)
        noise = ucgm_fast.sampler_noise((5, 7), seed=3, step=2), ucgm_fast.sampler_noise(9, seed=3, raw=True)
        return step, (x_prev, z_prev), corrected, noise

    _same(run(), without_kernels(run), 2e-6)


def test_training_loss_and_sampling(without_kernels):
    class Model(torch.nn.Module):
        num_classes = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3).reshape(1, 3, 1, 1).double())
            self.emb = torch.nn.Parameter(torch.linspace(-1, 1, 5).double())

        def forward(self, x, t, y):
            return torch.tanh(x * self.w) * t.reshape(-1, 1, 1, 1).to(x.dtype) + self.emb[y].reshape(-1, 1, 1, 1)

    model = Model()
    x, z, _, _, t = _data(torch.float64, (10, 3, 4, 4))
    y = torch.arange(10) % 4
    ucgm = ucgm_fast.UCGM(consistency_ratio=1.0, enhanced_ratio=2.0, label_drop_ratio=0.1, cosine_loss=True)

    def run():
        loss = ucgm.loss(model, x, y, t=t, z=z)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            s = ucgm_fast.sample(model, z, steps=3, order=2, stochast_ratio=0.3, extrapol_ratio=0.1, y=y,
                                 cfg_scale=1.5, state_dtype=torch.float64, seed=0)
        return loss, grads, s

    _same(run(), without_kernels(run), 1e-10)


def test_every_op_has_its_cpu_kernel():
    # The fallback is silent by design, so the tests above would pass against a build that lost a
    # kernel: here each op's compiled entry point must exist (and a CUDA one wherever CUDA was built).
    from ucgm_fast.ops import objective, sampler, transport
    kernels = [k for mod in (objective, sampler, transport) for k in vars(mod).values()
               if isinstance(k, _kernels.Kernel)]
    assert len(kernels) == 10
    cuda_built = ucgm_fast.build_info()["cuda"]
    for k in kernels:
        assert k.cpu is not None, f"no CPU kernel for {k.name}"
        assert (k.cuda is not None) == cuda_built, f"CUDA kernel of {k.name}: built {cuda_built}"


def test_fallback_outputs_keep_the_ops_contract(without_kernels):
    # What the fakes promise (fresh contiguous outputs) must hold on the fallback too, or torch.compile
    # fails its stride asserts on a GPU the build has no code for. Inputs: transposed views, and a
    # Linear t, which the reference returns itself as alpha_in.
    x, z, F, G, t = _data(torch.float64, (5, 4, 3))
    x, z, F, G = (v.transpose(1, 2) for v in (x, z, F, G))
    ops = torch.ops.ucgm_fast
    calls = [(ops.interpolate, (x, z, t, 0)), (ops.decode_backward, (x, z, t, 4)), (ops.coefficients, (t, 0)),
             (ops.enhance_target, (x, z, F, G, t, 1, 1.5, 0.0, 0.75, 4, False)),
             (ops.fd_inputs, (x, z, t, 1.0, 0.005, 4)), (ops.fd_target, (F, G, F, x, z, t, 0.5, 0.005, 4)),
             (ops.ucgm_loss, (F, G, t, 0.5, True, True))]

    def run():
        for op, args in calls:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        return torch.zeros(())

    without_kernels(run)
