"""Which class models fit the per-pair scores' shape (issue 13): the audit's calibration (P(member) at the
collection's own estimated share, docs/protocol.md) with one Gaussian per class against a kernel density
per class, on labelled collections mixed at known member shares from two audited sets of a run folder —
one of members, one of non-members (``make demo`` leaves both: ``probes``, all members, and ``fresh``,
none) — scored by the run's stored fit, calibrated on its out-of-fold reference scores. Paired: both
shapes see the same draws.

    python benchmarks/calibration_shape.py --run demo/run --members probes --nonmembers fresh --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from gradaudit import workflow
from gradaudit.audit.calibration import SHAPES, Calibrator
from gradaudit.audit.per_pair import expected_calibration_error
from write_results import save


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="demo/run")
    ap.add_argument("--members", default="probes")
    ap.add_argument("--nonmembers", default="fresh")
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    t0 = time.time()
    fit = workflow.fit(args.run)
    pos = workflow.score(args.run, args.members, fit).scores["gradaudit"]
    neg = workflow.score(args.run, args.nonmembers, fit).scores["gradaudit"]
    oof, n_m = fit.chosen.scores, fit.n_members
    calibrators = {shape: Calibrator(shape).fit(oof[:n_m], oof[n_m:]) for shape in SHAPES}
    rng = np.random.default_rng(0)
    rows = []
    for share in (0.0, 0.1, 0.3, 0.5, 0.9):
        result = {shape: {"ece": [], "share_error": []} for shape in SHAPES}
        for _ in range(args.draws):
            k = int(round(share * args.size))
            s = np.r_[rng.choice(pos, k, replace=False), rng.choice(neg, args.size - k, replace=False)]
            y = np.r_[np.ones(k), np.zeros(args.size - k)]
            for shape, cal in calibrators.items():
                prior = cal.estimate_prior(s)
                result[shape]["ece"].append(expected_calibration_error(cal.predict_proba(s, prior), y))
                result[shape]["share_error"].append(prior - share)
        rows.append({"share": share, **{shape: {k: float(np.mean(v)) for k, v in r.items()} |
                                        {"share_abs_error": float(np.mean(np.abs(r["share_error"])))}
                                        for shape, r in result.items()}})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["# Calibration: one Gaussian per class against a kernel density per class", "",
             f"`python {' '.join(sys.argv)}` — {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
             f"{time.time() - t0:.0f} s. Method `{fit.method}`, calibrated on {n_m} + {len(oof) - n_m} out-of-fold "
             f"reference scores; collections of {args.size} mixed from sets `{args.members}` ({len(pos)} members) "
             f"and `{args.nonmembers}` ({len(neg)} non-members), {args.draws} draws per share, both shapes on the "
             "same draws. ECE: 10 equal-width bins, P(member) at the collection's own estimated share.", "",
             "| true share | ECE normal | ECE kde | share estimate − truth, normal (mean; mean abs) | kde |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['share']:.0%} | {r['normal']['ece']:.3f} | {r['kde']['ece']:.3f} | "
                     f"{r['normal']['share_error']:+.3f}; {r['normal']['share_abs_error']:.3f} | "
                     f"{r['kde']['share_error']:+.3f}; {r['kde']['share_abs_error']:.3f} |")
    save(args.out, "calibration_shape_tiny", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
