"""CPU attention: explicit softmax(QK^T/sqrt(d))V ("math") vs F.scaled_dot_product_attention ("sdpa").

Two measurements, forward + backward, the two variants interleaved and the minimum of --repeat runs
reported (the minimum is the least disturbed by other jobs on a shared machine):
1. one attention call at DiT-S width (6 heads x 64) for several token counts;
2. a whole DiT-S training step (forward, backward) with attention="math" vs "sdpa".
Decides ucgm_fast.models.dit.CPU_SDPA_MIN_TOKENS. Run: python benchmarks/attention_cpu.py --threads 2
"""
import argparse
import time

import torch
import torch.nn.functional as F

from ucgm_fast.models import get_model


def math_attention(q, k, v):
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


def interleaved_min_ms(fns, repeat):
    """min over repeat runs of each fn (after one warm-up), run round-robin."""
    best = [float("inf")] * len(fns)
    for i in range(repeat + 1):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if i:
                best[j] = min(best[j], time.perf_counter() - start)
    return [1e3 * b for b in best]


def attention_call(fn, q, k, v):
    def run():
        fn(q, k, v).sum().backward()
        q.grad = k.grad = v.grad = None
    return run


def model_step(model, x, t, y):
    def run():
        model(x, t, y).square().mean().backward()
        model.zero_grad(set_to_none=True)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 49, 64, 196])
    parser.add_argument("--model", default="DiT-S")
    parser.add_argument("--model-batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"1. attention call, batch {args.batch}, 6 heads x 64, forward + backward (min of {args.repeat})")
    for n in args.tokens:
        q, k, v = (torch.randn(args.batch, 6, n, 64, requires_grad=True) for _ in range(3))
        t_math, t_sdpa = interleaved_min_ms([attention_call(math_attention, q, k, v),
                                             attention_call(F.scaled_dot_product_attention, q, k, v)], args.repeat)
        print(f"   tokens {n:4d}: math {t_math:8.2f} ms   sdpa {t_sdpa:8.2f} ms   sdpa/math {t_sdpa / t_math:5.2f}")
    print(f"2. {args.model} training step (forward + backward), batch {args.model_batch}")
    for size, patch in ((8, 2), (28, 4), (16, 2)):
        name = f"{args.model}/{patch}"
        torch.manual_seed(0)
        models = [get_model(name, input_size=size, in_channels=1, num_classes=10, attention=a) for a in ("math", "sdpa")]
        models[1].load_state_dict(models[0].state_dict())
        x = torch.randn(args.model_batch, 1, size, size)
        t, y = torch.rand(args.model_batch), torch.randint(0, 11, (args.model_batch,))
        t_math, t_sdpa = interleaved_min_ms([model_step(m, x, t, y) for m in models], max(3, args.repeat // 3))
        tokens = (size // patch) ** 2
        print(f"   {name} {size}x{size} ({tokens} tokens): math {t_math:8.1f} ms   sdpa {t_sdpa:8.1f} ms   "
              f"sdpa/math {t_sdpa / t_math:5.2f}")


if __name__ == "__main__":
    main()
