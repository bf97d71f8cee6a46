"""The embedded default, end to end with nothing downloaded (``make demo``): generate the corpora, train
a tiny vision-language model here in the finetune scenario, and audit two collections with the public
commands: one the model was trained on, one it never saw.

The model: a LLaVA-wired model pretrained from scratch on generated radiograph–report pairs, then
LoRA-fine-tuned on 1200 generated scene–caption pairs, the members (``gradaudit.toy.scenarios``; the
scenario whose collection test has the most power in ``benchmarks/results/eval_collection_tiny.md`` —
the radiograph fine-tune is weaker: a whole-member collection of 200 to be found in 80% of draws). The audit
(``scenarios.collection_sets``): 200 known members, 500 known non-members, and two collections of 500
pairs — the *used* one of members, the *fresh* one of non-members, both drawn from the members' own
generator (the i.i.d. protocol: nothing but training separates them). Each collection is audited against
the known non-members (``gradaudit audit`` for the first, ``gradaudit extract`` and ``gradaudit report``
for the second), and the per-pair scores of both are compared on their labels.

    python -m gradaudit.toy.demo [--root demo] [--collection 500]

Data and models are cached under the root folder; every run audits afresh (``ROOT/run``).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

from gradaudit.audit import metrics
from gradaudit.audit.claims import verdict
from gradaudit.store import RunFolder
from gradaudit.toy.scenarios import Corpus, collection_sets, train_model

CORPUS, TRAINING, SIZE = "scenes", "finetune", "tiny"
PER_PAIR = ("score", "paper_score", "loss", "min_k_plus_plus", "zlib", "gradient_norm")


def _gradaudit(*args: str) -> None:
    print("\n$ gradaudit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "gradaudit", *args], check=True)


def _collection_line(name: str, c: dict) -> str:
    t, g = c["test"], c["blind_guard"]
    share = t.get("share", {})
    used = (f"{100 * share['estimate']:.0f}% [{100 * share['ci'][0]:.0f}–{100 * share['ci'][1]:.0f}%]"
            if share.get("kind") == "estimate" else f"≥ {100 * share['ci'][0]:.0f}%")
    return (f"  {name:28s} {t['p_value']:10.2g}  {t['auroc']:.3f} [{t['auroc_ci'][0]:.3f}, {t['auroc_ci'][1]:.3f}]"
            f"  {used:16s} {g['p_value']:8.2g}")


def _per_pair_table(folder: RunFolder) -> list[str]:
    """Per-pair AUROC of each score, used collection against fresh one (their pairs.csv, their labels)."""
    rows = {}
    for name in ("probes", "fresh"):
        with open(folder.pairs_csv_path(name)) as f:
            rows[name] = list(csv.DictReader(f))
    lines = [f"  {'score':24s} AUROC [95% CI]"]
    for column in PER_PAIR:
        pos, neg = ([float(r[column]) for r in rows[k]] for k in ("probes", "fresh"))
        auc, low, high = metrics.auroc_ci(pos, neg, n_boot=2000)
        label = {"score": "gradaudit (per pair)", "paper_score": "paper"}.get(column, column)
        lines.append(f"  {label:24s} {auc:.3f} [{low:.3f}, {high:.3f}]")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="demo", help="cache of data and models, and the audit's run folder")
    ap.add_argument("--collection", type=int, default=500, help="pairs in each audited collection")
    ap.add_argument("--reference", type=int, default=200, help="known members")
    ap.add_argument("--nonmembers", type=int, default=500, help="known non-members")
    ap.add_argument("--members", type=int, default=Corpus.members,
                    help="members (and non-members) the corpus holds; fewer make a faster, weaker check (tests)")
    args = ap.parse_args(argv)
    counts = Corpus(members=args.members, nonmembers=args.members, held_out=min(Corpus.held_out, args.members // 4))
    root = os.path.abspath(args.root)
    times = {}

    t = time.time()
    model = train_model(root, TRAINING, CORPUS, SIZE, counts, log=lambda m: print(m, flush=True))
    sets = collection_sets(root, CORPUS, SIZE, args.reference, args.nonmembers, args.collection, counts)
    times["data and training (cached)"] = time.time() - t
    print(f"model: {model['model']} + LoRA adapter {model['adapter']}; held-out caption loss "
          f"{model['held_out_loss_before']:.3f} before the fine-tune, {model['held_out_loss']:.3f} after "
          f"(members' training loss {model['history'][-1]['train_loss']:.3f})", flush=True)

    run = os.path.join(root, "run")
    shutil.rmtree(run, ignore_errors=True)
    config = os.path.join(root, "audit.toml")
    with open(config, "w") as f:
        f.write(f'model = "{model["model"]}"\nadapter = "{model["adapter"]}"\nrun = "{run}"\npreset = "paper"\n'
                f'[data]\nreference_members = "{sets["reference_members"]}"\n'
                f'reference_nonmembers = "{sets["reference_nonmembers"]}"\nprobes = "{sets["used"]}"\n'
                # the audit's manifests name images in the corpus folder beside them
                '[options]\nbatch_size = 16\nallow_outside = true\nprompt_format = "chat-template"\n')
    t = time.time()
    _gradaudit("audit", config)
    capture = ["--model", model["model"], "--adapter", model["adapter"], "--run", run, "--batch-size", "16",
               "--allow-images-outside", "--prompt-format", "chat-template"]
    _gradaudit("extract", "--manifest", sets["fresh"], "--set", "fresh", *capture)
    _gradaudit("report", "--run", run, "--set", "fresh")
    times["audit"] = time.time() - t

    folder = RunFolder(run)
    used, fresh = folder.read_metrics("probes"), folder.read_metrics("fresh")
    print(f"\nTwo collections of {args.collection} pairs, each against {args.nonmembers} known non-members "
          f"(i.i.d. protocol; {args.reference} known members):")
    print(f"  {'collection':28s} {'p-value':>10s}  {'held-out AUROC [95% CI]':24s}  {'share used':16s} {'blind p':>8s}")
    print(_collection_line("used (all trained on)", used["collection"]))
    print(_collection_line("fresh (none trained on)", fresh["collection"]))
    print(f"\nused:  {verdict(used)}\nfresh: {verdict(fresh)}")
    print(f"\nPer pair, the used collection's pairs against the fresh one's (method '{used['method']}', "
          "cross-validated on the reference pairs only):")
    print("\n".join(_per_pair_table(folder)))
    print(f"\nreports: {folder.report_path('probes')}  {folder.report_path('fresh')}")
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
