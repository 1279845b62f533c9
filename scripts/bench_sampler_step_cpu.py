"""Quick CPU timing (not a test, not the benchmark suite): fused sampler_step vs the eager
published-style step at 4M elements. Run: python scripts/bench_sampler_step_cpu.py"""
import time, torch, ucgm_fast
torch.manual_seed(0)
n = 4 * 1024 * 1024
shape = (16, 4, 256, 256)
assert torch.Size(shape).numel() == n

def eager_step(F, x, t, t1, kappa, e, xp, zp):
    # published uni_sample step (Linear): decode, extrapolate, stochastic mix with torch.randn
    ai, gi, at, gt = t, 1 - t, 1.0, -1.0
    ai1, gi1 = t1, 1 - t1
    den = ai * gt - gi * at
    x_hat = (F * ai - x * at) / den
    z_hat = (x * gt - F * gi) / den
    x_hat, z_hat = x_hat.to(x.dtype), z_hat.to(x.dtype)
    xr, zr = x_hat, z_hat
    z_hat = z_hat + e * (z_hat - zp)
    x_hat = x_hat + e * (x_hat - xp)
    out = gi1 * x_hat + ai1 * (z_hat * (1 - kappa) ** 0.5 + torch.randn(x.size(), dtype=x.dtype) * kappa ** 0.5)
    return out, xr, zr

def bench(fn, reps=7):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3

print("threads", torch.get_num_threads())
for sdt in (torch.float32, torch.float64):
    for fdt in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, dtype=sdt)
        F = torch.randn(shape, dtype=fdt)
        xp, zp = torch.randn_like(x), torch.randn_like(x)
        for kappa in (0.0, 0.5):
            for e in (0.0, 0.5):
                kw = dict(x_prev=xp, z_prev=zp) if e else {}
                fused = bench(lambda: ucgm_fast.sampler_step(F, x, 0.7, 0.5, "Linear", step=3, stochast_ratio=kappa,
                                                             extrapol_ratio=e, seed=1, **kw))
                eager = bench(lambda: eager_step(F.to(sdt), x, 0.7, 0.5, kappa, e, xp, zp))
                print(f"state {str(sdt)[6:]:8s} F {str(fdt)[6:]:9s} kappa {kappa} e {e}: fused {fused:7.2f} ms  "
                      f"eager {eager:7.2f} ms  speedup {eager / fused:5.2f}x")
