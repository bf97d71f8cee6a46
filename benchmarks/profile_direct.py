"""Where the time of slice_stats goes on a GPU: host overhead per call (cProfile) and the direct
kernel's time under each tuning configuration.

Usage: python benchmarks/profile_direct.py   (CUDA only; prints a table)
"""

import cProfile
import pstats
import time

import torch
from triton.testing import do_bench

from gradaudit import slice_stats
from gradaudit.kernels import slice_stats as ks


def host_profile(x, g, off, ref, calls=200):
    slice_stats(x, g, off, ref)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        slice_stats(x, g, off, ref)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main():
    rows = []
    for d_in, d_out, n_samples, n_tok in [(1024, 1024, 1, 256), (1024, 4096, 32, 256), (4096, 4096, 32, 256),
                                          (4096, 4096, 8, 2048), (4096, 11008, 32, 640), (11008, 4096, 8, 2048)]:
        n = n_samples * n_tok
        x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(n, d_out, device="cuda", dtype=torch.bfloat16)
        ref = torch.randn(d_out, d_in, device="cuda")
        off = torch.arange(0, n + 1, n_tok)
        rate_ms = do_bench(lambda: torch.mm(g.T, x), return_mode="median")
        e2e_ms = do_bench(lambda: slice_stats(x, g, off, ref), return_mode="median")
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            slice_stats(x, g, off, ref)
        host_ms = (time.perf_counter() - t) / 50 * 1e3
        torch.cuda.synchronize()
        if not rows:
            host_profile(x, g, off, ref)
        key = next(k for k in ks._tune.best if k.endswith(f"|{d_in}x{d_out}|ref=True|T~{1 << n_tok.bit_length()}"))
        chosen = ks._tune.best[key]
        times = ks._tune.times.get(key, {})
        print(f"{d_in}x{d_out} B={n_samples} T={n_tok}: " + " ".join(f"{c}={v:.3f}" for c, v in times.items()))
        rows.append((d_in, d_out, n_samples, n_tok, 2 * n * d_in * d_out / rate_ms / 1e9, rate_ms, e2e_ms, host_ms,
                     chosen, times.get(chosen, float("nan"))))
    print("| shape | B | T | rate TF/s | rate ms | e2e ms | host ms/call | config (BM, BN, BK, warps, stages) | kernel ms | of rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d_in, d_out, b, t, tf, rate_ms, e2e, host, cfg, ms in rows:
        print(f"| {d_in}x{d_out} | {b} | {t} | {tf:.0f} | {rate_ms:.3f} | {e2e:.3f} | {host:.3f} | {cfg} | "
              f"{ms:.3f} | {rate_ms / ms:.2f} |")


if __name__ == "__main__":
    main()
