"""CPU throughput of the capture engine against the paper's batch-of-one loop, in one run.

Tiny LLaVA (CLIP-style tower + Llama-style LM, width 128, 4 blocks each, ≈1.3M parameters), captions
of 64 text tokens, the `paper` selection, R from the same pairs. The paper's loop (as the authors'
code runs it): the whole model trainable, per pair a backward pass with weight gradients, then the rows'
and columns' statistics of each selected .grad against R.
The engine: batches, no weight gradients, statistics from the layers' inputs and output gradients.
Usage: python benchmarks/bench_capture_cpu.py --out benchmarks/results
"""

import argparse
import json
import os
import sys
import time

import torch

from gradaudit.capture import batch_stats, per_sample_text_loss, reference_sums
from gradaudit.models import PromptFormat, batch_layout, encode_pairs, freeze, select_targets
from gradaudit.toy.tiny import random_images, tiny_llava

CHAT = PromptFormat("chat-template")  # the tiny models' own format (their chat template)


def paper_loop(model, processor, images, texts, targets, refs):
    """As the authors' code does it: the whole model trainable, one pair at a time."""
    weights = [(t.name, t.module.weight) for t in targets]
    model.requires_grad_(True)
    out = []
    for im, text in zip(images, texts):
        batch = encode_pairs(model, processor, [im], ["Describe the image."], [text], CHAT)
        labels = batch.pop("labels")
        model.zero_grad(set_to_none=True)
        per_sample_text_loss(model(**batch).logits, labels)[0].backward()
        for name, w in weights:
            g, r = w.grad, refs[name]
            out.append(((g * g).sum(1), (g * g).sum(0), (g * r).sum(1), (g * r).sum(0)))
    model.zero_grad(set_to_none=True)
    freeze(model)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    model, processor = tiny_llava(seed=0, width=128, blocks=4)
    freeze(model)
    n_params = sum(p.numel() for p in model.parameters())
    targets = select_targets(model, "paper")
    images = random_images(args.pairs, seed=1)
    texts = [("a picture of item %03d with words " % i * 4)[:63] for i in range(args.pairs)]
    batches = []
    for s in range(0, args.pairs, args.batch_size):
        b = encode_pairs(model, processor, images[s:s + args.batch_size], ["Describe the image."] * len(texts[s:s + args.batch_size]),
                               texts[s:s + args.batch_size], CHAT)
        batches.append(b)
    n_text = int((batches[0]["labels"][0] != -100).sum())
    sums, n = reference_sums(model, [(b, batch_layout(model, b)) for b in batches[:1]], targets)
    refs = {k: v / n for k, v in sums.items()}

    paper_loop(model, processor, images[:2], texts[:2], targets, refs)  # warm-up
    t = time.perf_counter()
    paper_loop(model, processor, images, texts, targets, refs)
    loop_s = time.perf_counter() - t

    batch_stats(model, batches[0], batch_layout(model, batches[0]), targets, refs)  # warm-up
    t = time.perf_counter()
    for b in batches:
        batch_stats(model, b, batch_layout(model, b), targets, refs)
    engine_s = time.perf_counter() - t
    # the engine's time includes its encoding of nothing: batches were encoded up front, as the
    # loop's per-pair encoding is part of the paper's procedure; encode time for the engine:
    t = time.perf_counter()
    for s in range(0, args.pairs, args.batch_size):
        encode_pairs(model, processor, images[s:s + args.batch_size], ["Describe the image."] * args.batch_size,
                           texts[s:s + args.batch_size], CHAT)
    encode_s = time.perf_counter() - t

    res = dict(params=n_params, pairs=args.pairs, text_tokens=n_text, batch_size=args.batch_size,
               weights=len(targets), threads=torch.get_num_threads(),
               paper_loop_pairs_per_s=args.pairs / loop_s, engine_pairs_per_s=args.pairs / (engine_s + encode_s),
               speedup=loop_s / (engine_s + encode_s), engine_capture_s=engine_s, engine_encode_s=encode_s,
               paper_loop_s=loop_s, command="python " + " ".join(sys.argv),
               date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "capture_cpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    table = (f"`{res['command']}`, {res['date']}, 2-core CPU, torch {res['torch']}\n\n"
             "| model params | text tokens | weights (paper) | paper loop pairs/s | engine pairs/s | speed-up |\n"
             "|---|---|---|---|---|---|\n"
             f"| {n_params / 1e6:.2f}M | {n_text} | {len(targets)} | {res['paper_loop_pairs_per_s']:.1f} | "
             f"{res['engine_pairs_per_s']:.1f} | {res['speedup']:.1f}× |\n")
    with open(os.path.join(args.out, "capture_cpu.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
