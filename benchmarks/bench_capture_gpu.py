"""GPU throughput of the capture engine on a LLaVA-1.5-shaped random model, in one run.

CLIP-L/336-shaped tower (24 blocks, width 1024, 576 patches) + a 1.1B Llama-shaped language model
(22 blocks, width 2048, MLP 5632), bf16, 576 image + ~16 prompt + 64 text tokens per pair. Timed, in
samples/s:
  fwd+bwd   the batched forward and activation backward alone (hooks that reduce nothing)
  engine    gradaudit's statistics against R, `paper` and `all-linear` selections
  loop      the paper's procedure: one pair at a time, the whole model trainable, loss.backward(),
            then rows' and columns' statistics of each selected .grad against R
Usage: python benchmarks/bench_capture_gpu.py --out benchmarks/results
"""

import argparse
import json
import os
import sys
import time

import torch

from gradaudit.capture.engine import _backward, batch_stats
from gradaudit.capture import per_sample_text_loss
from gradaudit.models import batch_layout, freeze, select_targets


def build(device):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    return freeze(model)


def make_batch(n, device, n_prompt=16, n_text=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = 1 + 576 + n_prompt + n_text
    ids = torch.randint(3, 31000, (n, length), generator=gen)
    ids[:, 1:577] = 31999
    labels = ids.clone()
    labels[:, : length - n_text] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(n, 3, 336, 336, generator=gen).to(torch.bfloat16)}
    return {k: v.to(device) for k, v in batch.items()}


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build(dev)
    n_params = sum(p.numel() for p in model.parameters())
    batch = make_batch(args.batch_size, dev)
    layout = batch_layout(model, batch)
    res = dict(card=torch.cuda.get_device_name(), params=n_params, batch_size=args.batch_size,
               tokens_per_pair=batch["input_ids"].shape[1], command="python " + " ".join(sys.argv),
               date=time.strftime("%Y-%m-%d"), torch=torch.__version__, rows={})
    for preset in ("paper", "all-linear"):
        targets = select_targets(model, preset)
        refs = {t.name: torch.randn(t.module.weight.shape, device=dev) * 1e-3 for t in targets}
        s_fb = timed(lambda: _backward(model, batch, targets, lambda *a: None), 3)
        s_engine = timed(lambda: batch_stats(model, batch, layout, targets, refs), 3)
        loop_batch = {k: v[:4] for k, v in batch.items()}
        s_loop = timed(lambda: paper_loop(model, loop_batch, targets, refs), 1) / 4 * args.batch_size
        res["rows"][preset] = dict(weights=len(targets), fwd_bwd=args.batch_size / s_fb,
                                   engine=args.batch_size / s_engine, loop=args.batch_size / s_loop)
        print(preset, res["rows"][preset], flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"capture_{res['card'].replace(' ', '_')}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"`{res['command']}`, {res['date']}, {res['card']}, torch {res['torch']}; {n_params / 1e9:.2f}B "
             f"parameters, bf16, {res['tokens_per_pair']} tokens a pair, batch {args.batch_size}. Samples/s.", "",
             "| selection | weights | paper's loop | engine | batched fwd+bwd alone | engine / loop | engine / fwd+bwd |",
             "|---|---|---|---|---|---|---|"]
    for preset, r in res["rows"].items():
        lines.append(f"| {preset} | {r['weights']} | {r['loop']:.1f} | {r['engine']:.1f} | {r['fwd_bwd']:.1f} | "
                     f"{r['engine'] / r['loop']:.1f}× | {r['engine'] / r['fwd_bwd']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
