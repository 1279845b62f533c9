"""Where one objective step's time goes: torch.profiler over the fused and the eager objective.

    python benchmarks/profile_objective.py [--device cuda] [--variant lambda=1,enhanced] [--out FILE]

The step is the ``objective`` benchmark row's (``benchmarks/cases/objective.py``): ``UCGM.loss`` or
the published-style ``reference.training_loss`` around a one-multiply model, then the gradient of
the model's one parameter. At the training size (256x4x32x32) every kernel takes microseconds, so
the row measures host work (Python, dispatch, allocation, launches) more than device work, and on
an H100 host-side cuts on a CPU did not move it (benchmarks/results/nvidia-h100_notes.md). For
each peer this prints the wall time per step, the ops and kernel launches per step, and the
profiler's top entries by self CPU time and by device time. Last, the measure #3 names: the
objective's work outside the model calls, each peer's step less the same model calls made alone
(same inputs and grad modes, the backward into the model's parameter included).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases.objective import OBJECTIVES, ScaleModel, _objective_workload  # noqa: E402
from harness.case import Plan  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(step, device: torch.device, repeats: int) -> float:
    """Median wall time of one step in ms, the device synchronized around each."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def profile_peer(name: str, step, device: torch.device, steps: int, rows: int) -> list[str]:
    """Report lines for one peer: wall time, counts per step, the profiler's top tables."""
    for _ in range(5):  # warm-up: allocator pools, lazy init, first-call dispatch caches
        step()
    wall = _wall_ms(step, device, max(steps, 5))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    lines = [f"== {name}: {wall:.3f} ms per step (median wall, device synchronized; unprofiled)",
             f"   per step: {ops / steps:.0f} aten ops, {launches / steps:.0f} kernel launches"]
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    if device.type == "cuda":
        lines.append(events.table(sort_by="self_device_time_total", row_limit=rows))
    return lines


@contextlib.contextmanager
def _recording_calls(calls: list):
    """Records (x, t, y, grad enabled) of every ScaleModel call, the objective's target copy included."""
    forward = ScaleModel.forward

    def record(self, x, t, y):
        calls.append((x, t, y, torch.is_grad_enabled()))
        return forward(self, x, t, y)
    ScaleModel.forward = record
    try:
        yield
    finally:
        ScaleModel.forward = forward


def model_calls_step(step, model):
    """A step that makes only ``step``'s model calls: the same inputs, the same grad modes, and the
    backward of the outputs that need one into the model's parameter; nothing of the objective."""
    calls = []
    with _recording_calls(calls):
        step()
    calls = [(x.detach().clone(), t.detach().clone(), y.clone(), grad) for x, t, y, grad in calls]
    seeds = [torch.full_like(x, 0.5) for x, _, _, grad in calls if grad]

    def only_calls():
        outs = []
        for x, t, y, grad in calls:
            with torch.set_grad_enabled(grad):
                out = model(x, t, y)
            if grad:
                outs.append(out)
        return torch.autograd.grad(outs, model.a, seeds)
    return only_calls, len(calls)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=sorted(OBJECTIVES), default="lambda=1,enhanced")
    parser.add_argument("--shape", default="256,4,32,32", help="data shape, comma-separated (default: the training size)")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps per peer")
    parser.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_objective.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    w = _objective_workload(Plan(device), args.variant, "Linear", shape, torch.float32)
    lines = [f"objective {args.variant}, {'x'.join(map(str, shape))} float32 on "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads"]
    own = []  # (peer, step ms, model calls alone ms, calls)
    for name, fn in (("fused (UCGM.loss)", w.fused), ("eager (reference.training_loss)", w.eager)):
        step = (lambda f=w.around(fn): f(*w.args))
        lines += profile_peer(name, step, device, args.steps, args.rows)
        calls_only, count = model_calls_step(step, w.args[0])
        for _ in range(5):
            calls_only()
        own.append((name.split()[0], _wall_ms(step, device, max(args.steps, 5)),
                    _wall_ms(calls_only, device, max(args.steps, 5)), count))
    # The measure is the objective's work outside the model calls: each step less the same
    # model calls (inputs, grad modes, backward into the model) made alone. Timed again here, in one
    # stretch, so the differences compare like with like.
    lines.append("== the objective outside the model calls (median wall ms; step less its model calls alone)")
    for peer, total, calls, count in own:
        lines.append(f"   {peer}: step {total:.3f} - {count} model calls alone {calls:.3f} = {total - calls:.3f}")
    (_, tf, cf, _), (_, te, ce, _) = own
    if tf - cf > 0:
        lines.append(f"   eager / fused: {(te - ce) / (tf - cf):.2f}x outside the model calls "
                     f"({te / tf:.2f}x whole steps)")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
