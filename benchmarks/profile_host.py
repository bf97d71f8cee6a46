"""Where the host's time goes (GPU machine), for benchmarks/results/NOTES.md.

``--part call``: one small ``slice_stats`` call (8 × 64 tokens, 256², bf16, with R) repeated: the wall
time per call, then a cProfile of 2000 calls (the Python functions and Triton's launch path by own time).
``--part capture``: one all-linear batch of the capture benchmark's 1.4B model profiled with
torch.profiler: the CUDA runtime calls that make the host wait (stream synchronisations, copies,
allocations), counted and summed.

    python benchmarks/profile_host.py --part call
    python benchmarks/profile_host.py --part capture
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def call() -> None:
    from gradaudit import slice_stats

    dev = "cuda"
    x = torch.randn(8 * 64, 256, device=dev, dtype=torch.bfloat16)
    g = torch.randn(8 * 64, 256, device=dev, dtype=torch.bfloat16)
    off, ref = torch.arange(0, 9 * 64, 64), torch.randn(256, 256, device=dev)

    def loop(n):
        for _ in range(n):
            slice_stats(x, g, off, ref)

    loop(100)
    torch.cuda.synchronize()
    t = time.perf_counter()
    loop(2000)
    torch.cuda.synchronize()
    print(f"per call: {(time.perf_counter() - t) / 2000 * 1e6:.1f} µs (unprofiled)")
    prof = cProfile.Profile()
    prof.enable()
    loop(2000)
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


def capture() -> None:
    from torch.profiler import ProfilerActivity, profile

    from bench_capture_gpu import build, make_batch
    from gradaudit.capture.engine import batch_stats
    from gradaudit.models import batch_layout, select_targets

    dev = torch.device("cuda")
    model = build("1b", dev)
    batch = make_batch(16, dev)
    layout = batch_layout(model, batch)
    targets = select_targets(model, "all-linear")
    refs = {t.name: torch.randn(t.module.weight.shape, device=dev) * 1e-3 for t in targets}
    for _ in range(2):
        batch_stats(model, batch, layout, targets, refs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        batch_stats(model, batch, layout, targets, refs)
        torch.cuda.synchronize()
    waits: dict[str, list] = {}
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if any(w in name for w in ("Synchronize", "Memcpy", "Malloc", "Free")):
            entry = waits.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.duration_ns() / 1e6
    for name, (count, ms) in sorted(waits.items(), key=lambda kv: -kv[1][1]):
        print(f"{name}: {count} calls, {ms:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("call", "capture"), required=True)
    args = ap.parse_args()
    call() if args.part == "call" else capture()


if __name__ == "__main__":
    main()
