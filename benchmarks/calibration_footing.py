"""Does scoring probes on the out-of-fold footing help exposure and the collection test? (docs/protocol.md)

The audit scores a probe by the mean of the 5 fold models; calibration and the collection test read
out-of-fold reference scores, each from one fold model. This compares, on run folders that
``eval_membership.py`` captured (paper preset, 200 reference pairs), the exposure estimate and the
collection test's p-value at member shares 0/0.1/0.3/0.5 with probes scored

* ``mean``: by the mean of the fold models (what the audit does), and
* ``single``: by one fold model each, in turn (the same footing as the out-of-fold scores),

for the true reference labels and for one permutation of them.

    python benchmarks/calibration_footing.py --root demo --size tiny --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from eval_membership import SCENARIOS, SHARES

from gradaudit import workflow
from gradaudit.audit.calibration import Calibrator, collection_test
from gradaudit.audit.method import SliceSet
from gradaudit.audit.per_pair import oof_auroc_ci
from gradaudit.audit.protocol import choose, cross_validate


def footings(estimate, pairs: SliceSet) -> dict[str, np.ndarray]:
    folds = estimate.fold_scores(pairs)
    return {"mean": folds.mean(axis=0), "single": folds[np.arange(pairs.num_pairs) % len(folds), np.arange(pairs.num_pairs)]}


def rows_of(run: str, protocol: str, seed: int = 0) -> list[dict]:
    ref_members = workflow.load_set(run, "reference_members").pairs
    ref_nonmembers = workflow.load_set(run, "reference_nonmembers" + ("" if protocol == "iid" else "_shifted")).pairs
    probes = workflow.load_set(run, "probes")
    y = np.array(probes.labels, dtype=bool)
    members = probes.pairs.subset(y)
    nonmembers = (probes.pairs.subset(~y) if protocol == "iid"
                  else workflow.load_set(run, "probe_nonmembers_shifted").pairs)
    n_m = ref_members.num_pairs
    pool = SliceSet.concat(ref_members, ref_nonmembers)
    order = np.random.default_rng(seed + 1).permutation(pool.num_pairs)
    out = []
    for labels_kind, estimates in (("true", cross_validate(ref_members, ref_nonmembers)),
                                   ("permuted", cross_validate(pool.subset(order[:n_m]), pool.subset(order[n_m:]), seed=seed))):
        chosen = choose(estimates)
        oof = estimates[chosen].scores
        calibrator = Calibrator().fit(oof[:n_m], oof[n_m:])
        pos, neg = footings(estimates[chosen], members), footings(estimates[chosen], nonmembers)
        n = min(members.num_pairs, nonmembers.num_pairs)
        for footing in ("mean", "single"):
            cells = []
            for share in SHARES:
                k = int(round(share * n))
                collection = np.concatenate([pos[footing][:k], neg[footing][:n - k]])
                cells.append((calibrator.estimate_prior(collection), collection_test(collection, oof[n_m:])["p_value"]))
            out.append(dict(labels=labels_kind, chosen=chosen, oof_auroc=estimates[chosen].auroc,
                            oof_auroc_ci_low=oof_auroc_ci(oof, n_m)[0], footing=footing, cells=cells))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="demo", help="the evaluation's root (run folders under ROOT/eval)")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    lines = [f"# Probe scores on the calibration's footing ({args.size} models, CPU)", "",
             f"`python {' '.join(sys.argv)}`. Exposure estimate and collection-test p at the true member share; "
             "`mean`: probes scored by the mean of the 5 fold models (the audit), `single`: by one fold model each, "
             "as the out-of-fold reference scores are.", "",
             "| scenario | protocol | reference labels | chosen | OOF AUROC (CI low) | footing | "
             + " | ".join(f"true {100 * s:.0f}%" for s in SHARES) + " |", "|---|---|---|---|---|---|" + "---|" * len(SHARES)]
    for scenario in SCENARIOS:
        run = os.path.join(args.root, "eval", f"{scenario}-{args.size}", "paper-ref200")
        for protocol in ("iid", "shifted"):
            for r in rows_of(run, protocol):
                line = (f"| {scenario} | {protocol} | {r['labels']} | {r['chosen']} | {r['oof_auroc']:.3f} "
                        f"({r['oof_auroc_ci_low']:.2f}) | {r['footing']} | "
                        + " | ".join(f"{100 * e:.0f}%, p = {p:.2g}" for e, p in r["cells"]) + " |")
                print(line, flush=True)
                lines.append(line)
    with open(os.path.join(args.out, f"calibration_footing_{args.size}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
