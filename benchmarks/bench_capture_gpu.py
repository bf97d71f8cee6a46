"""GPU throughput of the capture engine on LLaVA-1.5-shaped random models, and where its time goes.

CLIP-L/336-shaped tower (24 blocks, width 1024, 576 patches) + a Llama-shaped language model: ``1b``
(22 blocks, width 2048, MLP 5632, 4 KV heads; 1.4B in all) or ``7b`` (32 blocks, width 4096, MLP 11008;
7.1B in all), bf16, 576 image + 16 prompt + 64 text tokens per pair. Timed, in samples/s:
  fwd+bwd   the floor: the batched forward and activation backward alone (hooks that reduce nothing)
  engine    gradaudit's statistics against R, `paper` and `all-linear` selections
  loop      the paper's procedure: one pair at a time, the whole model trainable, loss.backward(),
            then rows' and columns' statistics of each selected .grad against R

Time split of one engine batch (ms): its wall time; the GPU's busy time (union of kernel intervals, from
``torch.profiler``); the statistics' Triton kernels; the other kernels the statistics add (kernel time
above the floor's, less the Triton kernels: partial sums, packing); the host time inside the hooks that
reduce (timed without the profiler; also per call); and the GPU's idle time (wall less busy).

Each run is stored under ``--tag`` (e.g. "before", "after") beside the runs already in ``--merge``, so
one table shows them side by side; the card is in the file name.

    python benchmarks/bench_capture_gpu.py --model 1b 7b --tag after --out benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch

from gradaudit.capture import per_sample_text_loss
from gradaudit.capture.engine import _backward, batch_stats
from gradaudit.grads import hooks
from gradaudit.models import batch_layout, freeze, select_targets
from write_results import save

TEXT = {  # hidden, intermediate, layers, heads, KV heads
    "1b": (2048, 5632, 22, 32, 4),
    "7b": (4096, 11008, 32, 32, 32),
}
STATS_KERNELS = ("_direct_kernel", "direct_kernel_pingpong", "_gram_kernel", "_gram_apply_kernel")
REPS = 5


def build(size, device):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    hidden, inter, layers, heads, kv = TEXT[size]
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    return freeze(model)


def make_batch(n, device, n_prompt=16, n_text=64, seed=0, ragged=False):
    """``ragged``: texts of 16 to ``n_text`` tokens, right-padded (padding masked and unlabelled), as real
    pairs come; else every text ``n_text`` tokens long."""
    gen = torch.Generator().manual_seed(seed)
    length = 1 + 576 + n_prompt + n_text
    ids = torch.randint(3, 31000, (n, length), generator=gen)
    ids[:, 1:577] = 31999
    labels = ids.clone()
    labels[:, : length - n_text] = -100
    mask = torch.ones_like(ids)
    if ragged:
        for b, n_real in enumerate(torch.randint(16, n_text + 1, (n,), generator=gen).tolist()):
            mask[b, length - n_text + n_real:] = 0
            labels[b, length - n_text + n_real:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pixel_values": torch.randn(n, 3, 336, 336, generator=gen).to(torch.bfloat16)}
    return {k: v.to(device) for k, v in batch.items()}


def timed(fn, reps, after_warmup=lambda: None):
    fn()
    torch.cuda.synchronize()
    after_warmup()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


class HookClock:
    """Host time spent inside the hooks' ``on_grad`` callbacks (the per-layer reduction), and the FLOPs of
    the statistics they reduce (2·N·d_in·d_out per layer call, N counting padding positions too), by wrapping
    :class:`gradaudit.grads.hooks.LayerHooks` for the benchmark's lifetime."""

    def __init__(self):
        self.reset()
        original = hooks.LayerHooks.__init__
        clock = self

        def init(self, modules, on_grad):
            def timed_on_grad(name, module, xs, grads):
                t = time.perf_counter()
                on_grad(name, module, xs, grads)
                clock.seconds += time.perf_counter() - t
                clock.calls += 1
                clock.flops += sum(2 * x.numel() * g.shape[-1] for x, g in zip(xs, grads))

            original(self, modules, timed_on_grad)

        hooks.LayerHooks.__init__ = init

    def reset(self):
        self.seconds, self.calls, self.flops = 0.0, 0, 0


def kernel_times(fn):
    """(busy ms: union of the kernels' intervals, {kernel name: ms}) of one call of ``fn``, profiled."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans, by_name = [], {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA or e.duration_ns() <= 0:
            continue
        if "Memcpy" in e.name() or "Memset" in e.name():
            continue
        spans.append((e.start_ns(), e.start_ns() + e.duration_ns()))
        by_name[e.name()] = by_name.get(e.name(), 0.0) + e.duration_ns() / 1e6
    busy, end = 0, None
    for s, t in sorted(spans):
        if end is None or s > end:
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
    return busy / 1e6, by_name


def digest(tensors: dict) -> str:
    """A hash of a batch's stored results (every statistic, loss and token quantity), bit for bit."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def paper_loop(model, batch, targets, refs):
    model.requires_grad_(True)
    weights = [(t.name, t.module.weight) for t in targets]
    for b in range(batch["input_ids"].shape[0]):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        labels = one.pop("labels")
        model.zero_grad(set_to_none=True)
        per_sample_text_loss(model(**one).logits, labels)[0].backward()
        for name, w in weights:
            g, r = w.grad.float(), refs[name]
            torch.stack([(g * g).sum(1), (g * r).sum(1)]), torch.stack([(g * g).sum(0), (g * r).sum(0)])
    model.zero_grad(set_to_none=True)
    freeze(model)


def measure(size, batch_size, clock, dev, loop=True, ragged=False):
    model = build(size, dev)
    batch = make_batch(batch_size, dev, ragged=ragged)
    layout = batch_layout(model, batch)
    rows = {}
    for preset in ("paper", "all-linear"):
        targets = select_targets(model, preset)
        refs = {t.name: torch.randn(t.module.weight.shape, device=dev) * 1e-3 for t in targets}

        def floor():
            return _backward(model, batch, layout, targets, lambda *a: None)

        def engine():
            return batch_stats(model, batch, layout, targets, refs)

        s_fb = timed(floor, REPS)
        s_engine = timed(engine, REPS, after_warmup=clock.reset)  # warm-up: compiles and tunes the kernels
        host_ms, calls, flops = clock.seconds / REPS * 1e3, clock.calls / REPS, clock.flops / REPS
        busy_floor, k_floor = kernel_times(floor)
        busy, k_engine = kernel_times(engine)
        stats_ms = sum(v for k, v in k_engine.items() if any(s in k for s in STATS_KERNELS))
        extra_ms = sum(k_engine.values()) - sum(k_floor.values()) - stats_ms
        row = dict(weights=len(targets), fwd_bwd=batch_size / s_fb, engine=batch_size / s_engine,
                   split=dict(floor_ms=s_fb * 1e3, engine_ms=s_engine * 1e3, busy_ms=busy, floor_busy_ms=busy_floor,
                              stats_kernels_ms=stats_ms, other_added_kernels_ms=extra_ms, host_hooks_ms=host_ms,
                              hook_calls=calls, idle_ms=s_engine * 1e3 - busy,
                              stats_tflop=flops / 1e12, stats_tflops_per_s=flops / 1e9 / max(stats_ms, 1e-9)))
        row["rerun_identical"] = digest(engine().tensors()) == digest(engine().tensors())
        if loop:
            loop_batch = {k: v[:4] for k, v in batch.items()}
            row["loop"] = batch_size / (timed(lambda: paper_loop(model, loop_batch, targets, refs), 1) / 4 * batch_size)
        rows[preset] = row
        print(size, preset, json.dumps(row), flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n_params, rows


def markdown(res):
    lines = [f"# Capture engine on the GPU ({res['card']})", "",
             f"LLaVA-1.5-shaped random models, bf16, {res['tokens_per_pair']} tokens a pair. Throughput in samples/s; the floor is the batched forward and activation "
             "backward alone. Each tag is one run (date, torch, commit); a tag's rows come from one machine, and "
             "machines of one kind differ by up to 10% (the same floor ran at 70–85 samples/s), so compare within "
             "a before/after pair made in one call. The engine's results are not bit-identical from run to run "
             "on the GPU (`rerun_identical` in the JSON: the model's own backward is not), here or before.", "",
             "| tag | model | batch | selection | weights | paper's loop | engine | floor | engine / loop | engine / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    runs = res["runs"]
    for tag, run in runs.items():
        for size, m in run["models"].items():
            for preset, r in m["rows"].items():
                loop = f"{r['loop']:.1f}" if "loop" in r else "—"
                ratio = f"{r['engine'] / r['loop']:.1f}×" if "loop" in r else "—"
                pad = ", ragged texts" if m.get("ragged") else ""
                lines.append(f"| {tag} | {size} ({m['params'] / 1e9:.2f}B) | {m.get('batch_size', 16)}{pad} | {preset} | "
                             f"{r['weights']} | {loop} | {r['engine']:.1f} | {r['fwd_bwd']:.1f} | {ratio} | "
                             f"{r['engine'] / r['fwd_bwd']:.2f} |")
    lines += ["", "## Where an engine batch's time goes (ms per batch)", "",
              "GPU busy: union of kernel intervals (torch.profiler); statistics kernels: the slice-statistics kernels, with "
              "the statistics' FLOPs (2·N·d_in·d_out per layer) and their rate; "
              "added kernels: the engine's other kernel time above the floor's; host in hooks: time inside the "
              "reducing callbacks (unprofiled), with µs per call; idle: wall less busy.", "",
              "| tag | model | selection | floor wall | floor GPU busy | engine wall | GPU busy | statistics kernels "
              "(TFLOP, TFLOP/s) | added kernels | host in hooks (µs/call) | GPU idle |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for tag, run in runs.items():
        for size, m in run["models"].items():
            for preset, r in m["rows"].items():
                s = r.get("split")
                if s is None:
                    continue
                per_call = 1e3 * s["host_hooks_ms"] / max(s["hook_calls"], 1)
                flops = (f" ({s['stats_tflop']:.1f}, {s['stats_tflops_per_s']:.0f})" if "stats_tflop" in s else "")
                lines.append(f"| {tag} | {size} | {preset} | {s['floor_ms']:.1f} | {s['floor_busy_ms']:.1f} | "
                             f"{s['engine_ms']:.1f} | {s['busy_ms']:.1f} | {s['stats_kernels_ms']:.1f}{flops} | "
                             f"{s['other_added_kernels_ms']:.1f} | "
                             f"{s['host_hooks_ms']:.1f} ({per_call:.0f}) | {s['idle_ms']:.1f} |")
    lines += ["", "Runs: " + "; ".join(f"{t}: `{r['command']}`, {r['date']}, torch {r['torch']}, commit {r['commit']}"
                                      for t, r in runs.items())]
    lines += [f"Note on {t}: {r['note']}" for t, r in runs.items() if r.get("note")]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", nargs="+", choices=sorted(TEXT), default=["1b"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tag", default="latest", help="name of this run in the results (e.g. before, after)")
    ap.add_argument("--merge", default="benchmarks/results", help="folder whose capture_<card>.json runs to keep")
    ap.add_argument("--no-loop", action="store_true", help="skip the paper's loop (slow at 7B)")
    ap.add_argument("--ragged", action="store_true", help="texts of 16–64 tokens, right-padded (else all 64)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    stem = f"capture_{card.replace(' ', '_')}"
    res = dict(card=card, tokens_per_pair=1 + 576 + 16 + 64, runs={})
    try:
        with open(os.path.join(args.merge, stem + ".json")) as f:
            old = json.load(f)
        res["runs"] = old.get("runs", {})
    except (OSError, ValueError):
        pass
    commit = os.environ.get("GRADAUDIT_COMMIT") or os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or "?"
    run = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, commit=commit,
               command="python " + " ".join(sys.argv), models={})
    clock = HookClock()
    for size in args.model:
        n_params, rows = measure(size, args.batch_size, clock, dev, loop=not args.no_loop, ragged=args.ragged)
        run["models"][size] = dict(params=n_params, batch_size=args.batch_size, ragged=args.ragged, rows=rows)
    if args.tag in res["runs"]:  # another model of the same run (e.g. 1b and 7b in two calls): kept together
        run["models"] = {**res["runs"][args.tag]["models"], **run["models"]}
        run["command"] = f"{res['runs'][args.tag]['command']}; {run['command']}"
    res["runs"][args.tag] = run
    text = markdown(res)
    save(args.out, stem, res, text)
    print(text)


if __name__ == "__main__":
    main()
