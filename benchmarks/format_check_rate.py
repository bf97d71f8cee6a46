"""How often the prompt-format check warns wrongly (issue 12): the capture warns when the known members fit
another candidate format better than the stated one (``capture.passes._warn_if_another_format_fits``, at
most 32 members). On the embedded models, trained in LLaVA-1.5's chat template, the stated
``chat-template`` is the truth: every warning is a false one. Drawn ``--draws`` times per size from the
model's members, the check's ranking of ``chat-template`` against ``plain`` is recorded with the losses.

    python benchmarks/format_check_rate.py --root demo --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from gradaudit.capture.format_check import rank_formats
from gradaudit.models.loading import load_model
from gradaudit.store.manifest import read_manifest
from gradaudit.toy.scenarios import Corpus, prepare_corpus, train_model
from write_results import save

SCENARIOS = [("finetune", "scenes"), ("pretrain", "radiographs")]  # the demo's model and its base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="demo")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--sizes", default="4,8,32")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, t0 = [], time.time()
    for training, corpus in SCENARIOS:
        m = train_model(args.root, training, corpus, "tiny", Corpus(), log=lambda s: None)
        model, processor = load_model(m["model"], adapter=m["adapter"])
        members = read_manifest(prepare_corpus(args.root, corpus, "tiny", Corpus())["members"], allow_outside=True)[0]
        for size in map(int, args.sizes.split(",")):
            wrong, gaps = 0, []
            for _ in range(args.draws):
                pick = [members[i] for i in rng.choice(len(members), size, replace=False)]
                fits = {f.spec: f.loss for f in rank_formats(model, processor, pick, ["chat-template", "plain"])}
                wrong += fits["plain"] <= fits["chat-template"]
                gaps.append(fits["plain"] - fits["chat-template"])
            rows.append({"model": f"{training}-{corpus}-tiny", "members": size, "draws": args.draws,
                         "false_warnings": int(wrong), "loss_gap_min": float(min(gaps)),
                         "loss_gap_median": float(np.median(gaps))})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["# The prompt-format check on the embedded models (trained in the chat template)", "",
             f"`python {' '.join(sys.argv)}` — {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
             f"{time.time() - t0:.0f} s. Each draw: that many random members, mean text loss in each format; a "
             "warning when `plain` fits at least as well as the stated `chat-template` (a false warning here).", "",
             "| model | members per draw | draws | false warnings | loss gap plain − chat-template: min | median |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['members']} | {r['draws']} | {r['false_warnings']} | {r['loss_gap_min']:.3f} | "
              f"{r['loss_gap_median']:.3f} |" for r in rows]
    save(args.out, "format_check_tiny", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
