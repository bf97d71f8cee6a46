"""Where the host's time goes (GPU machine), for benchmarks/results/NOTES.md.

``--part call``: one small ``slice_stats`` call (8 × 64 tokens, 256², bf16, with R) repeated: the wall
time per call, then a cProfile of 2000 calls (the Python functions and Triton's launch path by own time).
``--part capture``: one all-linear batch of the capture benchmark's model (``--model``, ``--batch-size``)
profiled with torch.profiler: the CUDA runtime calls that make the host wait or that it waits in
(stream synchronisations, copies, allocations, kernel launches), counted and summed; the allocator's
retries over three batches; and the GPU's idle time between kernels, with the longest gaps and the
kernels around them.

    python benchmarks/profile_host.py --part call
    python benchmarks/profile_host.py --part capture --model 7b --batch-size 8
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


def capture(size: str, batch_size: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from bench_capture_gpu import build, make_batch
    from gradaudit.capture.engine import batch_stats
    from gradaudit.models import batch_layout, select_targets

    dev = torch.device("cuda")
    model = build(size, dev)
    batch = make_batch(batch_size, dev)
    layout = batch_layout(model, batch)
    targets = select_targets(model, "all-linear")
    refs = {t.name: torch.randn(t.module.weight.shape, device=dev) * 1e-3 for t in targets}
    for _ in range(2):
        batch_stats(model, batch, layout, targets, refs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["num_alloc_retries"]
    t = time.perf_counter()
    for _ in range(3):
        batch_stats(model, batch, layout, targets, refs)
    torch.cuda.synchronize()
    print(f"{size}, batch {batch_size}: {(time.perf_counter() - t) / 3 * 1e3:.1f} ms a batch; allocator retries "
          f"{torch.cuda.memory_stats()['num_alloc_retries'] - before} in 3 batches; peak allocated "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        batch_stats(model, batch, layout, targets, refs)
        torch.cuda.synchronize()
    waits: dict[str, list] = {}
    kernels = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
            kernels.append((e.start_ns(), e.start_ns() + e.duration_ns(), name))
        elif any(w in name for w in ("Synchronize", "Memcpy", "Malloc", "Free", "LaunchKernel")):
            entry = waits.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.duration_ns() / 1e6
    for name, (count, ms) in sorted(waits.items(), key=lambda kv: -kv[1][1]):
        print(f"{name}: {count} calls, {ms:.2f} ms")
    kernels.sort()
    gaps, end, last = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append(((start - end) / 1e6, last[:60], name[:60]))
        if stop > end:
            end, last = stop, name
    long = [g for g in gaps if g[0] > 0.2]
    print(f"GPU idle between kernels: {sum(g[0] for g in gaps):.1f} ms in {len(gaps)} gaps; "
          f"{sum(g[0] for g in long):.1f} ms of it in {len(long)} gaps over 0.2 ms")
    for ms, before_gap, after_gap in sorted(gaps, reverse=True)[:8]:
        print(f"  {ms:.2f} ms after {before_gap} | before {after_gap}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("call", "capture"), required=True)
    ap.add_argument("--model", choices=("1b", "7b"), default="1b", help="--part capture: the model's size")
    ap.add_argument("--batch-size", type=int, default=16, help="--part capture: pairs a batch")
    args = ap.parse_args()
    call() if args.part == "call" else capture(args.model, args.batch_size)


if __name__ == "__main__":
    main()
