"""Host overhead of the registered custom op ``gradaudit::slice_stats`` against calling its implementation
directly: both run the same offsets check, route choice and backend (``gradaudit.ops.slice_stats._run``);
the op adds the dispatcher and its schema handling. The public ``gradaudit.slice_stats`` (argument checks
first) is timed beside them for scale.

Small shapes, where the host's share is largest: per-call wall time over many calls (synchronised once at
the end), the op/direct ratio, and the difference in µs per call. Both paths return bit-identical results.

    python benchmarks/bench_dispatch.py --out benchmarks/results            # CUDA if present, else CPU
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
from gradaudit.ops.slice_stats import _run, _slice_stats_op

SHAPES = [  # (samples, tokens per sample, d_in, d_out, with R)
    (2, 16, 64, 64, True), (8, 64, 256, 256, True), (8, 256, 1024, 1024, True), (8, 256, 1024, 1024, False),
    (16, 640, 1024, 4096, True),
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_call(fn, device, calls: int) -> float:
    """Median over 5 rounds of the mean wall time of ``calls`` back-to-back calls, in µs."""
    fn()
    _sync(device)
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        rounds.append((time.perf_counter() - t) / calls * 1e6)
    return sorted(rounds)[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    rows = []
    for b, t, d_in, d_out, with_ref in SHAPES:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b * t, d_in, device=device, dtype=dtype, generator=gen)
        g = torch.randn(b * t, d_out, device=device, dtype=dtype, generator=gen)
        ref = torch.randn(d_out, d_in, device=device, generator=gen) if with_ref else None
        off = torch.arange(0, b * t + 1, t, dtype=torch.int64)
        direct = [t for t in _run(x, g, off, ref, "auto") if t is not None]
        via_op = _slice_stats_op(x, g, off, ref, "auto")
        same = len(direct) == len(via_op) and all(torch.equal(a, c) for a, c in zip(direct, via_op))
        calls = args.calls if b * t * d_in * d_out < 2**30 else max(20, args.calls // 10)
        t_public = per_call(lambda: slice_stats(x, g, off, ref), device, calls)
        t_direct = per_call(lambda: _run(x, g, off, ref, "auto"), device, calls)
        t_op = per_call(lambda: _slice_stats_op(x, g, off, ref, "auto"), device, calls)
        rows.append(dict(samples=b, tokens=t, d_in=d_in, d_out=d_out, ref=with_ref, public_us=t_public,
                         direct_us=t_direct, op_us=t_op, op_minus_direct_us=t_op - t_direct, identical=bool(same)))
        print(f"B={b} T={t} {d_in}x{d_out} ref={with_ref}: public {t_public:.1f} µs, direct {t_direct:.1f} µs, "
              f"op {t_op:.1f} µs, identical {same}", flush=True)
    res = dict(card=card, dtype=str(dtype), torch=torch.__version__, command="python " + " ".join(sys.argv),
               date=time.strftime("%Y-%m-%d"), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"dispatch_{card.replace(' ', '_').replace('(', '').replace(')', '')}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Host overhead: the custom op against a direct call ({card}, {dtype})", "", f"`{res['command']}`, "
             f"{res['date']}, torch {torch.__version__}. Wall time per call, median of 5 rounds; 'public' is "
             "`gradaudit.slice_stats` with its argument checks.", "",
             "| B × T | d_in × d_out | R | public µs | direct µs | op µs | op − direct µs | op / direct | identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['samples']} × {r['tokens']} | {r['d_in']} × {r['d_out']} | {'yes' if r['ref'] else 'no'} | "
                     f"{r['public_us']:.1f} | {r['direct_us']:.1f} | {r['op_us']:.1f} | {r['op_minus_direct_us']:+.1f} | "
                     f"{r['op_us'] / r['direct_us']:.2f} | {r['identical']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
