"""GPU benchmark of slice_stats against every plain-PyTorch baseline of docs/kernels.md, in one run.

For each grid point (bf16, B samples of T tokens, d_in × d_out, with/without R) it times, with
``triton.testing.do_bench`` (median):

  rate       cuBLAS bf16 Δᵀ X over all tokens (d_out × N_tok × d_in): the contract's rate and floor
  ours       gradaudit.slice_stats(backend="triton")
  bmm        per-sample bmm of padded Δᵀ X, then the reductions
  gram       norms only via batched bf16 Gram products (with R it adds nothing for the dots: norms only)
  proj_gram  projection (row_dot = Σ_t Δ ⊙ X Rᵀ, col_dot = Σ_t X ⊙ Δ R) + Gram norms (only with R)
  vmap       torch.func.vmap(grad) per-sample gradients, then the reductions
  einsum     Opacus-style einsum("bti,btj->bij"), then the reductions

and reports median ms, TFLOP/s (2·ΣT·d_in·d_out over the time), the fraction of the rate, each
method's time over its own FLOP floor at the rate, ours relative to each baseline, and peak extra memory.
Writes one JSON line per point to OUT/slice_stats_<card>.jsonl as it goes, then a JSON and a Markdown
table. Usage:  python benchmarks/bench_slice_stats.py --out benchmarks/results [--shapes 1024x1024 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench

from gradaudit import gram_is_cheaper, slice_stats
from gradaudit.ops.backends import BY_NAME
from baseline_routes import gram_norms, reduce_materialised

SHAPES = ["1024x1024", "1024x4096", "4096x4096", "4096x11008", "11008x4096"]  # d_in x d_out


def _methods(x, g, off, ref, n_samples, n_tok):
    xp = x.view(n_samples, n_tok, -1)
    gp = g.view(n_samples, n_tok, -1)
    ref16 = ref.to(x.dtype) if ref is not None else None
    weight = torch.zeros(g.shape[1], x.shape[1], dtype=x.dtype, device=x.device)

    def surrogate(w, xb, gb):  # ∂/∂w = gbᵀ xb, the sample's weight gradient
        return (gb * (xb @ w.T)).sum()

    per_sample_grad = torch.func.vmap(torch.func.grad(surrogate), in_dims=(None, 0, 0))

    def proj_gram():
        xr = (x @ ref16.T).float() * g.float()
        dr = (g @ ref16).float() * x.float()
        return gram_norms(xp, gp) + [xr.view(n_samples, n_tok, -1).sum(1), dr.view(n_samples, n_tok, -1).sum(1)]

    methods = {
        "ours": lambda: slice_stats(x, g, off, ref, backend="triton"),
        "bmm": lambda: reduce_materialised(torch.bmm(gp.transpose(1, 2), xp), ref),
        "gram": lambda: gram_norms(xp, gp),
        "vmap": lambda: reduce_materialised(per_sample_grad(weight, xp, gp), ref),
        "einsum": lambda: reduce_materialised(torch.einsum("bti,btj->bij", gp, xp), ref),
    }
    if ref is not None:
        methods["proj_gram"] = proj_gram
    return methods


def _floor_flops(name, n_samples, n_tok, d_in, d_out, with_ref):
    direct = 2 * n_samples * n_tok * d_in * d_out
    gram = 4 * n_samples * n_tok**2 * (d_in + d_out)
    if name == "ours":
        return direct if with_ref or not gram_is_cheaper(n_tok, d_in, d_out, BY_NAME["triton"].gram_slowdown) else gram
    if name == "gram":
        return gram
    if name == "proj_gram":
        return 2 * direct + gram
    return direct


def _time(fn, budget_ms):
    fn()  # compile and tune outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(fn, warmup=max(5, budget_ms // 4), rep=budget_ms, return_mode="median")
    return ms, peak


def _check(x, g, n_tok, ref):
    """Largest relative error of ours against float32 materialised G_b on the first and last sample."""
    got = slice_stats(x, g, torch.arange(0, x.shape[0] + 1, n_tok), ref, backend="triton")
    worst = 0.0
    for b in (0, x.shape[0] // n_tok - 1):
        s = slice(b * n_tok, (b + 1) * n_tok)
        gb = g[s].float().T @ x[s].float()
        want = [(gb * gb).sum(1), (gb * gb).sum(0)]
        have = [got.row_sq[b], got.col_sq[b]]
        if ref is not None:
            want += [(gb * ref).sum(1), (gb * ref).sum(0)]
            have += [got.row_dot[b], got.col_dot[b]]
        worst = max(worst, *[((h - w).norm() / w.norm()).item() for h, w in zip(have, want)])
    return worst


def run_point(d_in, d_out, n_samples, n_tok, with_ref, budget_ms, mem_limit):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = n_samples * n_tok
    x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(n, d_out, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = torch.randn(d_out, d_in, device="cuda", generator=gen) if with_ref else None
    off = torch.arange(0, n + 1, n_tok, dtype=torch.int64)  # on the host, as the capture engine has it
    flops = 2 * n * d_in * d_out
    rate_ms, _ = _time(lambda: torch.mm(g.T, x), budget_ms)
    rate = flops / (rate_ms * 1e-3)
    point = dict(d_in=d_in, d_out=d_out, B=n_samples, T=n_tok, ref=with_ref, flops=flops,
                 rate_ms=rate_ms, rate_tflops=rate / 1e12, methods={})
    per_sample_bytes = 3 * n_samples * d_in * d_out * 4  # bf16 G, fp32 copy and a product
    for name, fn in _methods(x, g, off, ref, n_samples, n_tok).items():
        if name in ("bmm", "vmap", "einsum") and per_sample_bytes > mem_limit:
            point["methods"][name] = dict(skipped=f"needs > {per_sample_bytes / 2**30:.0f} GiB")
            continue
        try:
            ms, peak = _time(fn, budget_ms)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            point["methods"][name] = dict(skipped="out of memory")
            continue
        floor_ms = _floor_flops(name, n_samples, n_tok, d_in, d_out, with_ref) / rate * 1e3
        point["methods"][name] = dict(ms=ms, peak_mib=peak / 2**20, tflops=flops / (ms * 1e-3) / 1e12,
                                      of_rate=(flops / (ms * 1e-3)) / rate, of_own_floor=floor_ms / ms)
        torch.cuda.empty_cache()
    point["max_rel_err"] = _check(x, g, n_tok, ref)
    ours = point["methods"]["ours"]["ms"]
    for name, m in point["methods"].items():
        if "ms" in m and name != "ours":
            m["ours_speedup"] = m["ms"] / ours
    return point


def _markdown(points, card):
    names = ["bmm", "gram", "proj_gram", "vmap", "einsum"]
    lines = [
        f"Slice statistics, bf16, {card}. Times are medians (ms); `rate` is cuBLAS on Δᵀ X of the same shape; "
        "`of rate` = ours' 2·ΣT·d_in·d_out throughput over that rate; `×name` = baseline time / ours; "
        "`floor` = a method's FLOP floor at the rate over its time; peak = extra memory of ours (MiB).",
        "",
        "| d_in×d_out | B | T | R | rate TF/s | ours ms | ours TF/s | of rate | peak MiB | "
        + " | ".join(f"×{n}" for n in names) + " | " + " | ".join(f"floor {n}" for n in names) + " |",
        "|" + "---|" * (9 + 2 * len(names)),
    ]
    for p in points:
        o = p["methods"]["ours"]
        cells = [f"{p['d_in']}×{p['d_out']}", str(p["B"]), str(p["T"]), "R" if p["ref"] else "-",
                 f"{p['rate_tflops']:.0f}", f"{o['ms']:.3f}", f"{o['tflops']:.0f}", f"{o['of_rate']:.2f}",
                 f"{o['peak_mib']:.0f}"]
        for key in ("ours_speedup", "of_own_floor"):
            for n in names:
                m = p["methods"].get(n)
                cells.append(f"{m[key]:.2f}" if m and key in m else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _goals(points):
    """The goals of docs/kernels.md over the points they cover: bf16, with R, T ≥ 256, d ≥ 1024."""
    sel = [p for p in points if p["ref"] and p["T"] >= 256 and min(p["d_in"], p["d_out"]) >= 1024]
    if not sel:
        return {}
    of_rate = [p["methods"]["ours"]["of_rate"] for p in sel]
    vs_pg = [p["methods"]["proj_gram"]["ours_speedup"] for p in sel if "ours_speedup" in p["methods"]["proj_gram"]]
    vs_bmm = [p["methods"]["bmm"]["ours_speedup"] for p in sel if "ours_speedup" in p["methods"].get("bmm", {})]
    med = lambda v: sorted(v)[len(v) // 2] if v else math.nan  # noqa: E731
    return dict(points=len(sel), of_rate_min=min(of_rate), of_rate_median=med(of_rate),
                vs_proj_gram_min=min(vs_pg, default=math.nan), vs_proj_gram_median=med(vs_pg),
                vs_bmm_min=min(vs_bmm, default=math.nan), vs_bmm_median=med(vs_bmm))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="d_inxd_out, e.g. 4096x11008")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--tokens", nargs="+", type=int, default=[64, 256, 640, 2048])
    ap.add_argument("--ref", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--budget-ms", type=int, default=40, help="do_bench rep time per method")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    mem_limit = int(torch.cuda.get_device_properties(0).total_memory * 0.6)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"slice_stats_{card.replace(' ', '_')}{args.tag}")
    refs = {"both": [True, False], "yes": [True], "no": [False]}[args.ref]
    points, t0 = [], time.time()
    with open(stem + ".jsonl", "a") as log:
        for shape in args.shapes:
            d_in, d_out = map(int, shape.split("x"))
            for n_samples in args.batches:
                for n_tok in args.tokens:
                    for with_ref in refs:
                        p = run_point(d_in, d_out, n_samples, n_tok, with_ref, args.budget_ms, mem_limit)
                        points.append(p)
                        log.write(json.dumps(p) + "\n")
                        log.flush()
                        o = p["methods"]["ours"]
                        print(f"[{time.time() - t0:6.0f}s] {shape} B={n_samples} T={n_tok} ref={with_ref}: "
                              f"ours {o['ms']:.3f} ms = {o['of_rate']:.2f} of rate, err {p['max_rel_err']:.1e}",
                              flush=True)
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d"), goals=_goals(points))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, points=points), f, indent=1)
    table = _markdown(points, card)
    with open(stem + ".md", "w") as f:
        f.write(f"`{meta['command']}` on {card}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}\n\n")
        f.write(table + "\n**Goals (bf16, with R, T ≥ 256, d ≥ 1024):** " + json.dumps(meta["goals"]) + "\n")
    print(table)
    print("goals:", json.dumps(meta["goals"]))


if __name__ == "__main__":
    main()
