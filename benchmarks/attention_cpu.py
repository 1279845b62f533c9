"""CPU attention: explicit softmax(QK^T/sqrt(d))V vs F.scaled_dot_product_attention, forward + backward.

Decides ucgm_fast.models.dit.CPU_SDPA_MIN_TOKENS. Run: python benchmarks/attention_cpu.py [--threads 2]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def math_attention(q, k, v):
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


def median_ms(fn, q, k, v, repeat):
    times = []
    for i in range(repeat + 3):
        start = time.perf_counter()
        out = fn(q, k, v)
        out.sum().backward()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 49, 64, 196])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.heads} heads x {args.head_dim}")
    for n in args.tokens:
        shape = (args.batch, args.heads, n, args.head_dim)
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        t_math = median_ms(math_attention, q, k, v, args.repeat)
        t_sdpa = median_ms(F.scaled_dot_product_attention, q, k, v, args.repeat)
        print(f"tokens {n:4d}: math {t_math:8.2f} ms   sdpa {t_sdpa:8.2f} ms   sdpa/math {t_sdpa / t_math:5.2f}")


if __name__ == "__main__":
    main()
