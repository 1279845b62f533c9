"""Times the UCGM objective's own work -- everything in a training step except the model calls --
fused (ucgm_fast.UCGM.loss) vs the eager step-by-step reference (ucgm_fast.reference.training_loss).

The model is a stub that hands back precomputed outputs (F_t requires grad), so what is timed is
the objective: interpolation, decode, enhanced target, finite-difference inputs and target, loss
and its backward. t and z are given (the sampling of t, z is excluded from both).

    python scripts/bench_objective.py [--device cpu|cuda] [--batch 256] [--shape 4 32 32] [--reps 20]

Reports the median over reps (CUDA: device events after warm-up). Not a test.
"""
import argparse
import statistics
import time

import torch

import ucgm_fast
from ucgm_fast import reference


class StubModel(torch.nn.Module):
    """Returns the next precomputed output of the right batch size; costs nothing."""

    num_classes = 1000

    def __init__(self, F_t, others):
        super().__init__()
        self.F_t, self.others = F_t, others
        self.first = True

    def reset(self):
        self.first = True

    def forward(self, x, t, y):
        if self.first:
            self.first = False
            return self.F_t
        return self.others[x.shape[0]]


CASES = {
    "lambda=1, enhanced (few-step recipe)": dict(consistency_ratio=1.0, enhanced_ratio=2.0, huber_eps=5.0,
                                                 time_weighting="cosine", target_ema_decay=1.0),
    "lambda=0, enhanced (multi-step recipe)": dict(consistency_ratio=0.0, enhanced_ratio=0.5, cosine_loss=True,
                                                   target_ema_decay=0.999),
    "lambda=0, plain flow matching": dict(consistency_ratio=0.0),
}


def timeit(fn, reps, device):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--transport", default="Linear")
    args = ap.parse_args()
    dev, B = args.device, args.batch
    gen = torch.Generator().manual_seed(0)
    shape = (B, *args.shape)
    x, z = (torch.randn(shape, generator=gen).to(dev) for _ in range(2))
    F_t = (0.5 * torch.randn(shape, generator=gen)).to(dev).requires_grad_()
    F_b = (F_t.detach() + 0.003 * torch.randn(shape, generator=gen).to(dev))
    F_2 = torch.cat([F_t.detach() - 0.003 * torch.randn(shape, generator=gen).to(dev), F_b])
    y = torch.randint(0, 1000, (B,), generator=gen).to(dev)
    t = (torch.rand(B, generator=gen) * 0.9 + 0.05).to(dev)
    stub = StubModel(F_t, {B: F_b, 2 * B: F_2})
    print(f"device={dev} batch={B} shape={tuple(args.shape)} transport={args.transport} "
          f"threads={torch.get_num_threads()} build={ucgm_fast.build_info()}")
    for name, kw in CASES.items():
        kw = dict(transport=args.transport, label_drop_ratio=0.1, **kw)
        ucgm = ucgm_fast.UCGM(**kw)
        ref_kw = {k: v for k, v in kw.items() if k != "target_ema_decay"}

        def fused():
            stub.reset()
            loss = ucgm.loss(stub, x, y, t=t, z=z)
            torch.autograd.grad(loss, F_t)

        def eager():
            stub.reset()
            loss = reference.training_loss(stub, x, y, t, z, target_model=stub, **ref_kw)
            torch.autograd.grad(loss, F_t)

        stub.reset()
        ucgm.loss(stub, x, y, t=t, z=z)  # creates the target network copy (of the stub) outside the timing
        ucgm._target_call = stub  # the target pass is a model call too: route it to the stub
        tf, te = timeit(fused, args.reps, dev), timeit(eager, args.reps, dev)
        print(f"{name:42s} fused {tf:8.3f} ms   eager {te:8.3f} ms   speedup {te / tf:5.2f}x")


if __name__ == "__main__":
    main()
