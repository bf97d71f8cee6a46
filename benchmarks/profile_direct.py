"""Where the time of slice_stats goes on a GPU: host overhead per call (cProfile) and the direct
kernel's time under each tuning configuration.

Usage: python benchmarks/profile_direct.py             (CUDA only; prints a table)
       python benchmarks/profile_direct.py --configs   every configuration's registers, spills, shared
                                                       memory and time at the capture engine's shapes, the
                                                       Triton kernel's and (on Hopper) the Gluon kernel's
"""

import cProfile
import pstats
import sys
import time

import numpy as np

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


EXTRA_CONFIGS = [("triton", 64, 128, 64, 4, 3), ("triton", 128, 64, 64, 4, 3), ("triton", 64, 256, 64, 4, 3),
                 ("triton", 64, 128, 64, 4, 4)]


def random_case(d_in, d_out, n_samples, n_tok):
    """bf16 inputs x (N, d_in) and Δ (N, d_out) of n_samples samples of n_tok tokens, an fp32 R, the sample
    boundaries (numpy), and cuBLAS's time for Δᵀx over all tokens (the rate's reference, ms)."""
    n = n_samples * n_tok
    x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(n, d_out, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(d_out, d_in, device="cuda")
    bounds = np.arange(0, n + 1, n_tok, dtype=np.int64)
    return x, g, r, bounds, do_bench(lambda: torch.mm(g.T, x), return_mode="median")


def config_table():
    """Each configuration the tuner may try (ks.CONFIGS, on Hopper the Gluon kernel's) and EXTRA_CONFIGS
    (tiles outside the partial sums' memory bound) compiled and timed at the LLaVA-1.5 shapes of
    benchmarks/bench_capture_gpu.py, with R, through the package's own launch."""
    for d_in, d_out, n_samples, n_tok in [(1024, 1024, 16, 577), (1024, 4096, 16, 577), (2048, 2048, 16, 657),
                                          (2048, 5632, 16, 657), (5632, 2048, 16, 657), (4096, 4096, 8, 657),
                                          (4096, 11008, 8, 657), (4096, 4096, 32, 256), (4096, 4096, 8, 2048)]:
        x, g, r, bounds, rate_ms = random_case(d_in, d_out, n_samples, n_tok)
        samples = np.arange(n_samples)
        first = None
        for cfg in ks.candidates(x, g) + EXTRA_CONFIGS:
            row, col, k = ks.launch_direct(x, g, r, bounds, samples, cfg)
            ms = do_bench(lambda: ks.launch_direct(x, g, r, bounds, samples, cfg, (row, col)), return_mode="median")
            first = first or ms
            regs, spills = getattr(k, "n_regs", "?"), getattr(k, "n_spills", "?")  # as the launcher reports them
            print(f"| {d_in}x{d_out} | {n_samples} | {n_tok} | {cfg} | {regs} | {spills} | "
                  f"{k.metadata.shared // 1024} KiB | {ms:.3f} | {rate_ms / ms:.2f} | {first / ms:.2f} |", flush=True)


def main():
    if "--configs" in sys.argv:
        print("| shape | B | T | config (kernel, BM, BN, BK, warps, stages) | registers | spilled | shared | ms | of rate "
              "| speed / first |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        return config_table()
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
        shape = f"|{d_in}x{d_out}|ref=True|T~{1 << n_tok.bit_length()}"
        key = next(k for k in ks._tune.best if k.endswith(shape) or k.endswith(shape + "|tma"))
        chosen = ks._tune.best[key]
        times = ks._tune.times.get(key, {})
        print(f"{d_in}x{d_out} B={n_samples} T={n_tok}: " + " ".join(f"{c}={v:.3f}" for c, v in times.items()))
        rows.append((d_in, d_out, n_samples, n_tok, 2 * n * d_in * d_out / rate_ms / 1e9, rate_ms, e2e_ms, host_ms,
                     chosen, times.get(chosen, float("nan"))))
    print("| shape | B | T | rate TF/s | rate ms | e2e ms | host ms/call | config (kernel, BM, BN, BK, warps, stages) | kernel ms | of rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d_in, d_out, b, t, tf, rate_ms, e2e, host, cfg, ms in rows:
        print(f"| {d_in}x{d_out} | {b} | {t} | {tf:.0f} | {rate_ms:.3f} | {e2e:.3f} | {host:.3f} | {cfg} | "
              f"{ms:.3f} | {rate_ms / ms:.2f} |")


if __name__ == "__main__":
    main()
