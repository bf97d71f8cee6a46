"""The drop-in backend on the GPU (issue 14): per-sample gradient norms and ⟨G_b, R⟩ of every linear layer of
a Llama-shaped decoder layer, GradAudit against the routes other tools use, and one DP-SGD step (ghost
clipping) of a Llama-1B-shaped model with Opacus' norm sampler and with GradAudit's.

Part ``layers`` (per decoder layer: the 7 linear layers q, k, v, o, gate, up, down, summed), bf16, for
B × T from 4k to 32k tokens and T from 128 to 4096, and packed variable lengths:
- norms: ``gradaudit`` (``gradaudit.grads.routes``: Gram or the fused direct kernel per sample, as
  ``gradaudit.grads`` and the Opacus integration use it), ``slice_stats`` (the primitive's row norms,
  summed), ``opacus`` (1.6's
  ``compute_linear_norm_sample``: B×T×T Gram einsums), ``fastdp-rule`` (Gram einsum when
  2T² ≤ d_in·d_out, else materialise with ``bmm``: fastDP / private-transformers' switch, in plain torch),
  ``vmap`` (``torch.func.vmap`` of the per-sample G_b), ``bmm`` (materialise all G_b);
- dots with R: ``gradaudit`` (``gradaudit.grads.routes``: norms and dots together, each sample by its
  cheapest route), ``gradaudit-direct`` (``slice_stats`` with R), ``gradaudit-projection`` (Σ_t ⟨Δ_t, R x_t⟩,
  one GEMM and a segment sum), ``bmm``.
Padded routes see the batch padded to its longest sample. Time: median of ``triton.testing.do_bench``;
memory: peak allocated above the inputs. Every route's result is checked against ``bmm`` in float32.

Part ``dp``: one step (forward, Opacus' two backwards, SGD) of a Llama-1B-shaped model (16 layers,
d = 2048, vocab 128256; embeddings and norms frozen), ghost clipping with Opacus' ``nn.Linear`` norm
sampler against GradAudit's (``gradaudit.integrations.opacus``; ``gradaudit-skip``: also the first backward without
the weight gradients Opacus discards), beside a non-private step.

    python benchmarks/bench_grads_gpu.py --part layers --model 1b --out benchmarks/results   # and 7b
    python benchmarks/bench_grads_gpu.py --part dp --batch 8 --seq 1024 --out benchmarks/results
    python benchmarks/bench_grads_gpu.py --part tables --card "NVIDIA H100 80GB HBM3" --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch

SHAPES = {  # (d_in, d_out) of q, k, v, o, gate, up, down
    "1b": [(2048, 2048), (2048, 512), (2048, 512), (2048, 2048), (2048, 8192), (2048, 8192), (8192, 2048)],
    "7b": [(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)],
}
BATCHES = [(32, 128), (8, 512), (4, 1024), (16, 1024), (4, 4096), (8, 4096), ("varlen", 16384)]
NORM_ROUTES = ("gradaudit", "slice_stats", "opacus", "fastdp-rule", "vmap", "bmm")
DOT_ROUTES = ("gradaudit", "gradaudit-direct", "gradaudit-projection", "bmm")


def _lengths(b, t, gen):
    if b == "varlen":  # packed variable lengths: 128..4096 tokens each, t tokens in all
        out, total = [], 0
        while total < t:
            n = min(int(torch.randint(128, 4097, (1,), generator=gen)), t - total)
            out.append(n)
            total += n
        return out
    return [t] * b


def _inputs(lengths, d_in, d_out, device, gen):
    n = sum(lengths)
    x = torch.randn(n, d_in, generator=gen).to(device, torch.bfloat16)
    g = (torch.randn(n, d_out, generator=gen) * 0.05).to(device, torch.bfloat16)
    offsets = torch.tensor([0] + lengths).cumsum(0).to(device)
    b, t = len(lengths), max(lengths)
    x3 = torch.zeros(b, t, d_in, device=device, dtype=torch.bfloat16)
    g3 = torch.zeros(b, t, d_out, device=device, dtype=torch.bfloat16)
    for i, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        x3[i, : e - s], g3[i, : e - s] = x[s:e], g[s:e]
    r = (torch.randn(d_out, d_in, generator=gen) * 0.01).to(device, torch.bfloat16)
    return x, g, offsets, x3, g3, r, offsets.cpu()


def _norm_routes(layer):
    from opacus.grad_sample.linear import compute_linear_norm_sample

    from gradaudit import slice_stats
    from gradaudit.grads.routes import norms_and_dots

    def fastdp(x3, g3):
        t, d_in, d_out = x3.shape[1], x3.shape[2], g3.shape[2]
        if 2 * t * t <= d_in * d_out:
            return (torch.einsum("nik,njk->nij", g3, g3) * torch.einsum("nik,njk->nij", x3, x3)).float().sum((1, 2))
        return torch.bmm(g3.transpose(1, 2), x3).float().square().sum((1, 2))

    return {
        "gradaudit": lambda x, g, o, oc, x3, g3: norms_and_dots(x, g, oc)[0],
        "slice_stats": lambda x, g, o, oc, x3, g3: slice_stats(x, g, oc).row_sq.sum(1),
        "opacus": lambda x, g, o, oc, x3, g3: compute_linear_norm_sample(layer, [x3], g3)[layer.weight].float() ** 2,
        "fastdp-rule": lambda x, g, o, oc, x3, g3: fastdp(x3, g3),
        "vmap": lambda x, g, o, oc, x3, g3: torch.func.vmap(lambda a, d: (d.T @ a).float().square().sum())(x3, g3),
        "bmm": lambda x, g, o, oc, x3, g3: torch.bmm(g3.transpose(1, 2), x3).float().square().sum((1, 2)),
    }


def _dot_routes():
    from gradaudit import slice_stats
    from gradaudit.grads.routes import norms_and_dots, projection_dots

    return {
        "gradaudit": lambda x, g, o, oc, x3, g3, r: norms_and_dots(x, g, oc, [r])[1][0],  # with the norms
        "gradaudit-direct": lambda x, g, o, oc, x3, g3, r: slice_stats(x, g, oc, r).row_dot.sum(1),
        "gradaudit-projection": lambda x, g, o, oc, x3, g3, r: projection_dots(x, g, oc[1:] - oc[:-1], r),
        "bmm": lambda x, g, o, oc, x3, g3, r: (torch.bmm(g3.transpose(1, 2), x3).float() * r.float()).sum((1, 2)),
    }


def _measure(fn):
    from triton.testing import do_bench

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, None
    return ms, peak / 2**20, out


def part_layers(model: str, log) -> list[dict]:
    device = torch.device("cuda")
    layer = torch.nn.Linear(1, 1, bias=False).to(device)  # Opacus' sampler reads only requires_grad and bias
    norms, dots = _norm_routes(layer), _dot_routes()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b, t in BATCHES:
        lengths = _lengths(b, t, gen)
        total = {k: [0.0, 0.0, 0.0] for k in (*[f"norm {r}" for r in NORM_ROUTES], *[f"dot {r}" for r in DOT_ROUTES])}
        for d_in, d_out in SHAPES[model]:
            x, g, o, x3, g3, r, oc = _inputs(lengths, d_in, d_out, device, gen)
            truth_n = norms["bmm"](x, g, o, oc, x3, g3)
            truth_d = dots["bmm"](x, g, o, oc, x3, g3, r)
            for kind, routes, truth, args in (("norm", norms, truth_n, (x, g, o, oc, x3, g3)),
                                               ("dot", dots, truth_d, (x, g, o, oc, x3, g3, r))):
                for name, fn in routes.items():
                    ms, mib, out = _measure(lambda: fn(*args))
                    key = f"{kind} {name}"
                    if ms is None or total[key] is None:
                        total[key] = None
                        continue
                    err = float((out.float() - truth).norm() / truth.norm())
                    total[key][0] += ms
                    total[key][1] = max(total[key][1], mib)
                    total[key][2] = max(total[key][2], err)
            del x, g, x3, g3, r
            torch.cuda.empty_cache()
        row = {"model": model, "batch": f"{'varlen' if b == 'varlen' else b} × {t if b != 'varlen' else max(lengths)}",
               "samples": len(lengths), "tokens": sum(lengths), "max_T": max(lengths),
               "routes": {k: (None if v is None else {"ms": v[0], "peak_mib": v[1], "rel_err": v[2]}) for k, v in total.items()}}
        rows.append(row)
        log(json.dumps(row))
    return rows


DP_MODES = ("non-private", "opacus", "gradaudit", "gradaudit-skip")  # -skip: the first backward without weight grads


def part_dp(log, batch=8, seq=1024) -> list[dict]:
    """Each mode in its own process (so each peak memory is its own), then the clipped updates compared."""
    import subprocess
    import tempfile

    rows, grads = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in DP_MODES:
            out = os.path.join(tmp, mode)
            subprocess.run([sys.executable, __file__, "--part", "dp-mode", "--mode", mode, "--batch", str(batch),
                            "--seq", str(seq), "--out", out], check=True)
            with open(os.path.join(out, "row.json")) as f:
                rows.append(json.load(f))
            log(json.dumps(rows[-1]))
            if mode != "non-private":
                grads[mode] = torch.load(os.path.join(out, "grads.pt")).float()
    for mode in DP_MODES[2:]:
        diff = float((grads[mode] - grads["opacus"]).norm() / grads["opacus"].norm())
        rows.append({"mode": mode, "clipped_update_rel_diff": diff})
        log(json.dumps(rows[-1]))
    return rows


def dp_mode(mode: str, batch: int, seq: int, out: str, steps: int = 5) -> None:
    """One mode of part ``dp`` in this process: its row (time, peak memory) and its clipped update (bf16)
    written to ``out``."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradaudit.integrations.opacus import use_gradaudit_norms

    device = torch.device("cuda")
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name and "norm" not in name)
    criterion = torch.nn.CrossEntropyLoss()
    if mode == "non-private":
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(ids).logits[:, :-1]
            criterion(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
            opt.step()
    else:
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=1.0, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD([p for p in gsm.parameters() if p.requires_grad], lr=0.0),
                                              noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=batch,
                                              loss_reduction="mean")
        dp_loss = DPLossFastGradientClipping(gsm, opt, criterion, loss_reduction="mean")

        def step():
            opt.zero_grad(set_to_none=True)
            logits = gsm(ids).logits[:, :-1]
            dp_loss(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), shape=logits.shape).backward()
            opt.step()

    context = use_gradaudit_norms(skip_discarded_weight_grads=mode == "gradaudit-skip") \
        if mode.startswith("gradaudit") else contextlib.nullcontext()
    with context:
        step(), step()  # warm-up: kernels compiled and tuned
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() / 2**30
        if mode != "non-private":  # one more step: the extra memory of the norm sampler's calls alone
            from opacus.grad_sample import GradSampleModuleFastGradientClipping as GSM

            sampler, extra = GSM.NORM_SAMPLERS[torch.nn.Linear], []

            def probe(layer, a, g):
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                norms = sampler(layer, a, g)
                torch.cuda.synchronize()
                extra.append((torch.cuda.max_memory_allocated() - before) / 2**20)
                return norms

            GSM.NORM_SAMPLERS[torch.nn.Linear] = probe
            step()
            GSM.NORM_SAMPLERS[torch.nn.Linear] = sampler
            sampler_mib = max(extra)
            os.makedirs(out, exist_ok=True)
            torch.save(torch.cat([p.grad.flatten().cpu() for p in model.parameters()
                                  if p.requires_grad and p.grad is not None]), os.path.join(out, "grads.pt"))
    row = {"mode": mode, "batch": batch, "seq": seq, "ms": sorted(times)[len(times) // 2], "peak_gib": peak}
    if mode != "non-private":
        row["norm_sampler_peak_extra_mib"] = sampler_mib
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "row.json"), "w") as f:
        json.dump(row, f)


def tables(folder: str, card: str) -> str:
    """grads_<card>.md from the JSON files of both parts in ``folder``: per grid point each route's time and
    peak memory, GradAudit's ratio to Opacus and to the fastDP rule, and the DP steps."""
    tag = card.replace(" ", "_")
    lines = [f"# The drop-in backend: per-sample norms and dots of linear layers ({card}, bf16)", ""]
    for model in SHAPES:
        path = os.path.join(folder, f"grads_layers_{model}_{tag}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        meta, rows = data["meta"], data["rows"]
        lines += [f"## Llama-{model.upper()}-shaped decoder layer (q, k, v, o, gate, up, down summed)", "",
                  f"`{meta['command']}`, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
                  f"opacus {meta['opacus']}. Time: median of `triton.testing.do_bench`; memory: peak allocated "
                  "above the inputs (largest layer). Relative error against `bmm` in float32: "
                  + ", ".join(f"{k} ≤ {max(r['routes'][k]['rel_err'] for r in rows if r['routes'][k]):.1e}"
                              for k in rows[0]["routes"] if not k.endswith("bmm")) + ".", "",
                  "| B × T | tokens | " + " | ".join(rows[0]["routes"]) + " | × Opacus | × fastDP rule |",
                  "|---|---|" + "---|" * (len(rows[0]["routes"]) + 2)]
        for r in rows:
            routes = r["routes"]
            cells = ["OOM" if v is None else f"{v['ms']:.2f} ms, {v['peak_mib']:.0f} MiB" for v in routes.values()]
            ours = routes["norm gradaudit"]["ms"]
            lines.append(f"| {r['batch']} | {r['tokens']} | " + " | ".join(cells)
                         + f" | {routes['norm opacus']['ms'] / ours:.2f} | {routes['norm fastdp-rule']['ms'] / ours:.2f} |")
        lines.append("")
    dp = sorted(p for p in os.listdir(folder) if p.startswith("grads_dp_") and p.endswith(f"{tag}.json"))
    if dp:
        lines += ["## One DP-SGD step (ghost clipping) of a Llama-1B-shaped model", "",
                  "16 layers, d = 2048, vocab 128256, embeddings and norms frozen; forward, Opacus' two backwards and "
                  "the SGD step, median of 5 after 2 warm-up steps. Peak memory of each mode in its own process "
                  "(files noted below: all modes in one process, in the order shown); the norm sampler's own extra memory per call measured on one more step.", "",
                  "| B × T | mode | ms | × non-private | peak GiB | norm sampler extra MiB (max per call) |", "|---|---|---|---|---|---|"]
        runs = {}
        for name in dp:
            with open(os.path.join(folder, name)) as f:
                runs[name] = json.load(f)
        notes = [f"- `{name}`: {data['meta']['note']}." for name, data in runs.items() if data["meta"].get("note")]
        lines[len(lines) - 2:len(lines) - 2] = notes + ([""] if notes else [])
        for name, data in runs.items():
            rows = data["rows"]
            base = rows[0]["ms"]
            for r in rows:
                if "ms" in r:
                    extra = r.get("norm_sampler_peak_extra_mib")
                    lines.append(f"| {r['batch']} × {r['seq']} | {r['mode']} | {r['ms']:.1f} | {r['ms'] / base:.2f} | "
                                 f"{r['peak_gib']:.1f} | {'—' if extra is None else f'{extra:.0f}'} |")
                else:
                    lines.append(f"| {rows[0]['batch']} × {rows[0]['seq']} | clipped update, {r.get('mode', 'gradaudit')} "
                                 f"against Opacus | relative difference {r['clipped_update_rel_diff']:.4f} | | | |")
        lines.append("")
    out = os.path.join(folder, f"grads_{tag}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("layers", "dp", "dp-mode", "tables"), required=True)
    ap.add_argument("--mode", choices=DP_MODES, help="--part dp-mode (run by --part dp): one mode of the DP step")
    ap.add_argument("--card", default=None, help="--part tables: the card whose JSON files to tabulate")
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.part == "tables":
        print(tables(args.out, args.card))
        return 0
    if args.part == "dp-mode":
        dp_mode(args.mode, args.batch, args.seq, args.out)
        return 0
    card = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows = part_layers(args.model, log) if args.part == "layers" else part_dp(log, args.batch, args.seq)
    import opacus
    import triton

    meta = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "opacus": opacus.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "seconds": round(time.time() - t0)}
    shape = f"_{args.model}" if args.part == "layers" else f"_b{args.batch}_t{args.seq}"
    name = f"grads_{args.part}{shape}_{card.replace(' ', '_')}"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta}")
    if args.part == "layers":
        keys = list(rows[0]["routes"])
        print("| batch | " + " | ".join(keys) + " |")
        for row in rows:
            cells = ["OOM" if v is None else f"{v['ms']:.2f} ms {v['peak_mib']:.0f} MiB" for v in row["routes"].values()]
            print(f"| {row['batch']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
