"""How much of a DiT training step (CPU) a fused norm + modulate / gated-residual kernel could save.

Times (a) a whole training step (forward, backward, AdamW) and (b) the block's elementwise work alone,
forward + backward, at the same shapes: LayerNorm -> modulate and x + gate * h, twice per block
(attention and MLP branches), minus a baseline that only reads and backpropagates the same tensors.
A fused kernel still does (b)'s memory traffic once, so (b) / (a) bounds its gain from above.
Run: python benchmarks/block_elementwise_cpu.py --threads 1
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ucgm_fast.models import get_model
from ucgm_fast.models.dit import modulate


def timed(fn, repeat):
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times[1:]), 1e3 * statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = get_model(args.model, input_size=args.size, in_channels=1, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 1, args.size, args.size)
    t, y = torch.rand(args.batch), torch.randint(0, 11, (args.batch,))

    def step():
        loss = (model(x, t, y) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    B, N, D = args.batch, model.x_embedder.num_patches, model.hidden_size
    a, h = (torch.randn(B, N, D, requires_grad=True) for _ in range(2))
    shift, scale, gate = (torch.randn(B, D, requires_grad=True) for _ in range(3))

    def elementwise():
        out = modulate(F.layer_norm(a, (D,), eps=1e-6), shift, scale).sum() + (a + gate.unsqueeze(1) * h).sum()
        out.backward()
        a.grad = h.grad = shift.grad = scale.grad = gate.grad = None

    def baseline():
        (a.sum() + h.sum()).backward()
        a.grad = h.grad = None

    step_min, step_med = timed(step, args.repeat)
    el_min, el_med = timed(elementwise, 50)
    base_min, base_med = timed(baseline, 50)
    per_step = 2 * model.depth
    el_step = per_step * (el_min - base_min)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.model} {args.size}x{args.size} ({N} tokens) "
          f"batch {B}")
    print(f"training step: min {step_min:.1f} ms (median {step_med:.1f})")
    print(f"block elementwise work, forward + backward, x{per_step} per step: {el_step:.1f} ms "
          f"(median {per_step * (el_med - base_med):.1f}) = {100 * el_step / step_min:.1f}% of the step")


if __name__ == "__main__":
    main()
