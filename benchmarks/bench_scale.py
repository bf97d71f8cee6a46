"""Scale-out of the capture (issues 16 and 17): samples/s of the reference pass and the statistics pass on a
LLaVA-1.5-shaped random model (bf16, 576 image + 16 prompt + 64 text tokens a pair, the `paper` selection),

- data parallel under torchrun: each rank builds the model on its GPU and captures every world-size-th
  batch of one process's batches (``gradaudit.distributed.share``, as the capture passes share them);
  R's sums all-reduced in float64, as ``gradaudit reference`` does. Each batch's statistics are summed into
  a checksum (float64 sum of absolute values, per batch index), so runs on 1 and N GPUs are compared batch by batch: equal checksums
  mean identical statistics;
- one model placed across the node's GPUs by a device map (``--device-map auto``; accelerate's
  ``infer_auto_device_map`` and ``dispatch_model`` on a model built on the meta device), in one process:
  samples/s and peak memory per GPU.

The engine is timed without the manifest reading and chunk writing around it (the same on every rank).

    python benchmarks/bench_scale.py --shape 7b --out benchmarks/results                         # 1 GPU
    torchrun --nproc_per_node=2 benchmarks/bench_scale.py --shape 7b --out benchmarks/results    # 2 GPUs
    python benchmarks/bench_scale.py --shape 34b --device-map auto --out benchmarks/results      # split
    python benchmarks/bench_scale.py --tables --card "NVIDIA H100 80GB HBM3" --out benchmarks/results

Writes scale_<shape>_<how>_<card>.json per run; --tables joins them into scale_<card>.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch

from gradaudit import distributed
from gradaudit.capture.engine import batch_stats, reference_sums
from gradaudit.models import batch_layout, freeze, select_targets

# Language models: Llama-2-7B (LLaVA-1.5-7B) and a Yi-34B-shaped one (LLaVA-1.6-34B); the tower is CLIP-L/336.
# "tiny": a check of this script on a CPU (--device cpu), not a measurement.
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
SHAPES = {"7b": (CLIP_L, dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32)),
          "34b": (CLIP_L, dict(vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                               num_attention_heads=56, num_key_value_heads=8)),
          "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2),
                   dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2))}
IMAGE_TOKENS, PROMPT, TEXT = 576, 16, 64


def config(shape: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tower, language = SHAPES[shape]
    vision = CLIPVisionConfig(**tower, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(**language, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=language["vocab_size"] - 1,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def _init(model) -> None:
    """Random weights where each lives, the same on every GPU (a seed per weight): normal(0, 0.02) for
    matrices, ones for norm weights, zeros for biases."""
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        if p.dim() > 1:
            p.data.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(i))
        else:
            p.data.fill_(1.0 if name.endswith("weight") else 0.0)


def build(shape: str, device_map: str | None, device: str):
    """(model, placement): whole on ``device``, or placed by accelerate across every GPU of the machine.
    Built on the meta device and materialised where it is placed: no copy of the whole model anywhere."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import LlavaForConditionalGeneration

    with init_empty_weights():  # parameters on meta; buffers (positions, rotary frequencies) computed
        model = LlavaForConditionalGeneration(config(shape)).to(torch.bfloat16)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    if device_map is None:
        placement = {"": device}
    else:
        budget = {i: int(torch.cuda.get_device_properties(i).total_memory * 0.8) for i in range(torch.cuda.device_count())}
        placement = infer_auto_device_map(model, no_split_module_classes=["CLIPEncoderLayer", "LlamaDecoderLayer"],
                                          dtype=torch.bfloat16, max_memory=budget)
        placement = {k: f"cuda:{v}" if isinstance(v, int) else v for k, v in placement.items()}
    for name, where in placement.items():
        (model.get_submodule(name) if name else model).to_empty(device=where)
    for name, value in buffers.items():  # to_empty left them uninitialised
        owner, _, leaf = name.rpartition(".")
        buf = (model.get_submodule(owner) if owner else model)._buffers[leaf]
        buf.copy_(value.to(buf.dtype))
    _init(model)
    if device_map is not None:
        model = dispatch_model(model, placement)
    return freeze(model.eval()), placement


def make_batch(n: int, vocab: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    length = 1 + IMAGE_TOKENS + PROMPT + TEXT
    ids = torch.randint(3, vocab - 100, (n, length), generator=gen)
    ids[:, 1:1 + IMAGE_TOKENS] = vocab - 1
    labels = ids.clone()
    labels[:, : length - TEXT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(n, 3, 336, 336, generator=gen).to(torch.bfloat16)}


def run(args) -> dict:
    w, device = distributed.join(args.device)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, placement = build(args.shape, args.device_map, device)
    into = model.get_input_embeddings().weight.device
    targets = select_targets(model, "paper")
    vocab = SHAPES[args.shape][1]["vocab_size"]
    batches = list(enumerate(range(args.batches)))
    mine = distributed.share(batches)

    def on_device(i):
        return {k: v.to(into) for k, v in make_batch(args.batch_size, vocab, seed=i).items()}

    # the reference pass: this rank's batches summed in float64, all-reduced
    warm = on_device(10_000)
    reference_sums(model, [(warm, batch_layout(model, warm))], targets)
    sync()
    distributed.barrier()
    t0 = time.perf_counter()
    sums = {t.name: torch.zeros(t.module.weight.shape, dtype=torch.float64, device=t.module.weight.device)
            for t in targets}
    for _, seed in mine:
        batch = on_device(seed)
        part, _ = reference_sums(model, [(batch, batch_layout(model, batch))], targets)
        for k, v in part.items():
            sums[k] += v.to(sums[k])
    distributed.all_reduce_sum(sums)
    sync()
    distributed.barrier()
    t_ref = time.perf_counter() - t0
    refs = {k: (v / (args.batches * args.batch_size)).float() for k, v in sums.items()}

    # the statistics pass against that R
    batch_stats(model, warm, batch_layout(model, warm), targets, refs)
    gpus = [] if not cuda else range(torch.cuda.device_count()) if args.device_map else [torch.cuda.current_device()]
    for i in gpus:
        torch.cuda.reset_peak_memory_stats(i)
    sync()
    distributed.barrier()
    t0 = time.perf_counter()
    checksums = {}
    for index, seed in mine:
        batch = on_device(seed)
        result = batch_stats(model, batch, batch_layout(model, batch), targets, refs)
        checksums[index] = sum(float(v.double().abs().sum()) for k, v in result.tensors().items() if "|" in k)
    sync()
    distributed.barrier()
    t_stats = time.perf_counter() - t0
    # the noise floor of the comparison: one batch again in the same process (attention's backward on a
    # GPU accumulates with atomics, so two runs of one process differ too)
    index, seed = mine[0]
    again = batch_stats(model, on_device(seed), batch_layout(model, on_device(seed)), targets, refs)
    repeat = sum(float(v.double().abs().sum()) for k, v in again.tensors().items() if "|" in k)
    peaks = distributed.gather({str(i): torch.cuda.max_memory_allocated(i) / 2**30 for i in gpus})
    merged = {k: v for part in distributed.gather(checksums) for k, v in part.items()}
    pairs = args.batches * args.batch_size
    return dict(shape=args.shape, how="device_map" if args.device_map else "data_parallel", world=w.size,
                gpus_per_process=max(len(gpus), 1), card=torch.cuda.get_device_name() if cuda else "cpu",
                torch=torch.__version__,
                params=sum(p.numel() for p in model.parameters()), batch_size=args.batch_size, pairs=pairs,
                tokens_per_pair=1 + IMAGE_TOKENS + PROMPT + TEXT, reference_pairs_per_s=pairs / t_ref,
                stats_pairs_per_s=pairs / t_stats, peak_gib=peaks,
                placement={k: str(v) for k, v in placement.items()} if args.device_map else None,
                checksums={str(k): merged[k] for k in sorted(merged)},
                repeat_rel_diff=max(abs(r - c) / abs(c) for r, c in distributed.gather((repeat, checksums[index]))),
                command=(f"torchrun --nproc_per_node={w.size} " if w.size > 1 else "python ") + " ".join(sys.argv),
                date=time.strftime("%Y-%m-%d"))


def tables(folder: str, card: str) -> str:
    tag = card.replace(" ", "_")
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, f"scale_*_{tag}.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    lines = [f"# Scale-out of the capture ({card}, bf16, `paper` selection)", "",
             "Engine only (no manifest reading or chunk writing); pairs of 657 tokens (576 image). Against 1 GPU: "
             "each batch's checksum of its statistics (float64 sum of absolute values) compared with the one-GPU run's — identical, or "
             "the largest relative difference; beside it the same process's difference on one batch computed twice "
             "(attention's backward on a GPU is not deterministic).", "",
             "| shape | how | processes × GPUs | pairs | reference pairs/s | statistics pairs/s | × 1 GPU | efficiency | "
             "against 1 GPU | one batch twice | peak GiB per GPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["shape"]: r for r in runs if r["how"] == "data_parallel" and r["world"] == 1}
    for r in sorted(runs, key=lambda r: (r["shape"], r["how"], r["world"])):
        one, n_gpus = base.get(r["shape"]), r["world"] * r["gpus_per_process"]
        speed = r["stats_pairs_per_s"] / one["stats_pairs_per_s"] if one else None
        diff = None if not one or one is r else max(abs(v - one["checksums"][k]) / abs(one["checksums"][k])
                                                    for k, v in r["checksums"].items())
        same = "—" if diff is None else "identical" if diff == 0 else f"{diff:.1e}"
        noise = r.get("repeat_rel_diff")
        peaks = ", ".join(f"{v:.1f}" for part in r["peak_gib"] for v in part.values())
        lines.append(f"| {r['shape']} | {r['how']} | {r['world']} × {r['gpus_per_process']} | {r['pairs']} | "
                     f"{r['reference_pairs_per_s']:.1f} | {r['stats_pairs_per_s']:.1f} | "
                     f"{'—' if speed is None else f'{speed:.2f}'} | {'—' if speed is None else f'{speed / n_gpus:.2f}'} | "
                     f"{same} | {'—' if noise is None else 'identical' if noise == 0 else f'{noise:.1e}'} | {peaks} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}` ({r['date']})" for r in runs)]
    out = os.path.join(folder, f"scale_{tag}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device-map", choices=("auto",), default=None)
    ap.add_argument("--device", default="cuda", help="cuda (under torchrun: each rank's GPU), or cpu for a check")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tables", action="store_true")
    ap.add_argument("--card", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.tables:
        print(open(tables(args.out, args.card)).read())
        return 0
    result = run(args)
    if distributed.world().main:
        os.makedirs(args.out, exist_ok=True)
        name = f"scale_{result['shape']}_{result['how']}_{result['world']}x{result['gpus_per_process']}_" \
               f"{result['card'].replace(' ', '_')}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k not in ("checksums", "placement")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
