"""CPU benchmark: the C++ extension (backend="cpp") against the fp32 PyTorch routes, in one run.

fp32, torch's own thread count (2 on the development machine). Routes timed beside ``cpp``:
  torch      gradaudit's torch backend: one materialised G_b at a time, then the reductions
  bmm        all G_b at once with a batched matmul, then the reductions
  proj_gram  projection for the dot products + Gram for the norms (only with R)
  gram       Gram for the norms (only without R)
Reports the median of repeated rounds (the routes in turn each round) and ``cpp`` against the best
of the others. Usage:
  python benchmarks/bench_cpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from gradaudit import slice_stats
from baseline_routes import gram_norms, reduce_materialised


def _median_s(routes, repeats):
    """Median seconds per route, the routes taken in turn each round so that a noisy shared
    machine's slow spells spread over all of them."""
    times = {name: [] for name in routes}
    for fn in routes.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in routes.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def _routes(x, g, off, ref, n_samples, n_tok):
    xp, gp = x.view(n_samples, n_tok, -1), g.view(n_samples, n_tok, -1)

    def proj_gram():
        return gram_norms(xp, gp) + [((x @ ref.T) * g).view(n_samples, n_tok, -1).sum(1),
                                     ((g @ ref) * x).view(n_samples, n_tok, -1).sum(1)]

    routes = {
        "cpp": lambda: slice_stats(x, g, off, ref, backend="cpp"),
        "torch": lambda: slice_stats(x, g, off, ref, backend="torch"),
        "bmm": lambda: reduce_materialised(torch.bmm(gp.transpose(1, 2), xp), ref),
    }
    routes["proj_gram" if ref is not None else "gram"] = proj_gram if ref is not None else (lambda: gram_norms(xp, gp))
    return routes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", nargs="+", default=["1024x1024", "1024x4096"], help="d_inxd_out")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--tokens", nargs="+", type=int, default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    points = []
    for shape in args.shapes:
        d_in, d_out = map(int, shape.split("x"))
        for n_samples in args.batches:
            for n_tok in args.tokens:
                for with_ref in (True, False):
                    n = n_samples * n_tok
                    x, g = torch.randn(n, d_in), torch.randn(n, d_out)
                    ref = torch.randn(d_out, d_in) if with_ref else None
                    off = torch.arange(0, n + 1, n_tok)
                    times = _median_s(_routes(x, g, off, ref, n_samples, n_tok), args.repeats)
                    best = min((v, k) for k, v in times.items() if k != "cpp")
                    p = dict(d_in=d_in, d_out=d_out, B=n_samples, T=n_tok, ref=with_ref,
                             ms={k: v * 1e3 for k, v in times.items()}, best_torch=best[1],
                             cpp_speedup=best[0] / times["cpp"],
                             cpp_gflops=2 * n * d_in * d_out / times["cpp"] / 1e9)
                    points.append(p)
                    print(f"{shape} B={n_samples} T={n_tok} ref={with_ref}: "
                          + " ".join(f"{k}={v:.2f}ms" for k, v in p["ms"].items())
                          + f"  cpp/best torch ({best[1]}) = {p['cpp_speedup']:.2f}x", flush=True)
    meta = dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "slice_stats_cpu.json"), "w") as f:
        json.dump(dict(meta=meta, points=points), f, indent=1)
    names = ["cpp", "torch", "bmm", "proj_gram", "gram"]
    lines = [f"`{meta['command']}`, {meta['date']}, torch {meta['torch']}, {meta['threads']} threads, fp32. "
             "Median ms; the last column is the best torch route's time over cpp's.", "",
             "| d_in×d_out | B | T | R | " + " | ".join(names) + " | cpp GFLOP/s | best torch | cpp speed-up |",
             "|" + "---|" * (7 + len(names))]
    for p in points:
        cells = [f"{p['d_in']}×{p['d_out']}", str(p["B"]), str(p["T"]), "R" if p["ref"] else "-"]
        cells += [f"{p['ms'][n]:.2f}" if n in p["ms"] else "–" for n in names]
        cells += [f"{p['cpp_gflops']:.0f}", p["best_torch"], f"{p['cpp_speedup']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "slice_stats_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
