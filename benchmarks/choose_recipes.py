"""Chooses the embedded default's training recipes by the models' own quality — the held-out caption
loss — and by nothing else (no audit is run here). For each candidate recipe it trains the scenario's
model on both corpora and records the final held-out loss; the recipe with the lowest mean wins.
The finetune candidates start from the pretrain winner of the other corpus (as
``gradaudit.toy.scenarios.train_model`` does). Copy the winners into ``gradaudit.toy.scenarios.RECIPES``.
Rows are written as they come; a rerun with the same ``--out`` measures only the candidates not yet there
(so a grid can be extended, and a cut-off run continued).

    python benchmarks/choose_recipes.py --size tiny --out benchmarks/results          # CPU, ~20 min
    python benchmarks/choose_recipes.py --size small --device cuda --out DIR          # GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

from gradaudit.store import read_manifest
from gradaudit.toy.corpora import KINDS
from gradaudit.toy.models import SIZES, Recipe, build_llava, train
from gradaudit.toy.scenarios import Corpus, other, prepare_corpus, tokenizer

GRIDS = {  # (epochs, lr) per size and training; LoRA rank width / 4, α = 2r
    ("tiny", "pretrain"): [(5, 3e-3), (10, 1e-3), (10, 3e-3), (20, 3e-3)],
    ("tiny", "finetune"): [(5, 1e-3), (5, 3e-3), (10, 3e-4), (10, 1e-3), (10, 3e-3), (10, 1e-2), (20, 3e-3),
                           (20, 1e-2)],
    ("small", "pretrain"): [(5, 1e-3), (10, 5e-4), (10, 1e-3), (20, 1e-3)],
    ("small", "finetune"): [(5, 5e-4), (10, 2e-4), (10, 5e-4), (10, 1e-3), (10, 2e-3), (20, 1e-3), (20, 2e-3)],
}
BATCH = {"pretrain": 32, "finetune": 16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default="demo", help="the scenarios' cache folder (corpora, tokenizer)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--table-only", action="store_true", help="no training: the table of what was measured")
    ap.add_argument("--only", action="append", metavar="TRAINING:EPOCHS:LR", help="measure just these candidates "
                    "(repeatable; e.g. finetune:10:2e-3), so that separate processes can share a grid")
    args = ap.parse_args()
    counts = Corpus()
    tok = tokenizer(args.root, args.size)
    path = os.path.join(args.out, f"recipes_{args.size}.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)["rows"]
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    if args.table_only and rows:
        card = " / ".join(sorted({r.get("device", "CPU") for r in rows}))
    winners, bases = {}, {}

    def measured(training, epochs, lr, corpus):
        return [r for r in rows if (r["training"], r["epochs"], r["lr"], r["corpus"]) == (training, epochs, lr, corpus)]

    def wanted(training, epochs, lr):
        return not args.only or any(o.split(":")[0] == training and int(o.split(":")[1]) == epochs
                                    and float(o.split(":")[2]) == lr for o in args.only)

    def fit(training, epochs, lr, corpus):
        rank = SIZES[args.size]["width"] // 4 if training == "finetune" else 0
        recipe = Recipe(epochs=epochs, lr=lr, batch_size=BATCH[training], lora_rank=rank)
        data = {k: read_manifest(v)[0] for k, v in prepare_corpus(args.root, corpus, args.size, counts).items()}
        if training == "pretrain":
            model, processor = build_llava(args.size, tok, seed=recipe.seed)
        else:
            model, processor = copy.deepcopy(bases[other(corpus)])
            for p in model.parameters():
                p.requires_grad_(False)
        model.to(args.device)
        t = time.time()
        model, history = train(model, processor, data["members"], recipe, held_out=data["held_out"], device=args.device)
        row = dict(training=training, corpus=corpus, epochs=epochs, lr=lr, lora_rank=rank, device=card,
                   held_out_loss=history[-1]["held_out_loss"], train_loss=history[-1]["train_loss"],
                   curve=[round(h["held_out_loss"], 4) for h in history], seconds=time.time() - t)
        return row, (model.to("cpu"), processor)

    for training in ("pretrain", "finetune"):
        for epochs, lr in GRIDS[(args.size, training)]:
            for corpus in KINDS:
                if args.table_only or measured(training, epochs, lr, corpus) or not wanted(training, epochs, lr):
                    continue
                row, model = fit(training, epochs, lr, corpus)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                rows.append(row)
                if training == "pretrain":
                    bases[(epochs, lr, corpus)] = model
                os.makedirs(args.out, exist_ok=True)
                with open(path, "w") as f:
                    json.dump(dict(size=args.size, rows=rows), f, indent=1)
        complete = [c for c in GRIDS[(args.size, training)] if all(measured(training, *c, k) for k in KINDS)]
        if not complete:
            continue
        best = min(complete, key=lambda c: sum(measured(training, *c, k)[0]["held_out_loss"] for k in KINDS))
        winners[training] = dict(epochs=best[0], lr=best[1], batch_size=BATCH[training],
                                 lora_rank=SIZES[args.size]["width"] // 4 if training == "finetune" else 0)
        if training == "pretrain" and not args.table_only:  # the finetune bases: the pretrain winners (trained again if from an earlier run)
            bases = {c: bases.get((best[0], best[1], c)) or fit("pretrain", best[0], best[1], c)[1] for c in KINDS}
    out = dict(size=args.size, device=card, corpus=dataclasses.asdict(counts), winners=winners, rows=rows,
               command=" ".join(sys.argv))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# Training recipes, {args.size} models — chosen by held-out caption loss ({card})", "",
             f"`{out['command']}`; members {counts.members} per corpus, held-out {counts.held_out}. "
             "Final held-out loss (mean text-token cross-entropy) per candidate; the lowest mean over the "
             "two corpora wins. No audit was run to choose.", "",
             "| training | epochs | lr | LoRA r | scenes held-out | radiographs held-out | mean | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for training in ("pretrain", "finetune"):
        for epochs, lr in GRIDS[(args.size, training)]:
            loss = {k: measured(training, epochs, lr, k) for k in KINDS}
            cells = [f"{loss[k][0]['held_out_loss']:.3f}" if loss[k] else "not run" for k in KINDS]
            mean = f"{sum(loss[k][0]['held_out_loss'] for k in KINDS) / 2:.3f}" if all(loss.values()) else "-"
            won = training in winners and (winners[training]["epochs"], winners[training]["lr"]) == (epochs, lr)
            rank = SIZES[args.size]["width"] // 4 if training == "finetune" else "-"
            lines.append(f"| {training} | {epochs} | {lr:g} | {rank} | {' | '.join(cells)} | {mean} | "
                         f"{'**yes**' if won else ''} |")
    with open(os.path.join(args.out, f"recipes_{args.size}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
