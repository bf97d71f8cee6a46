"""The evaluation of issue 5 on the embedded default: models trained here (``gradaudit.toy.scenarios``),
audited the way the paper measures, against every baseline, on both protocols.

Per scenario (pretrain / finetune × scenes / radiographs):
- run folders with R built from half of the first n known members (n = 25, 50, 100, 200; the other half
  fit, as ``gradaudit audit`` does by default) and the `paper` layer preset, plus `all-linear` at n = 200
  (i.i.d. membership only);
- membership on 1000 member and 1000 non-member probes, i.i.d. and shifted protocols: GradAudit's
  cross-validated choice ("auto"), every variant, the paper's variant exactly ("paper-exact": its mask
  fitted on the members that built R, in-sample, as the paper does), and every baseline; AUROC and TPR at
  1% FPR with bootstrap intervals; auto − best baseline as a paired-bootstrap interval;
- τ ∈ {0, 0.05, 0.10, 0.2} for the paper's variant; the association test (the member probes against
  their images with other member probes' texts); exposure of probe collections with member shares 0,
  0.1, 0.3, 0.5, and the same with permuted reference labels (a control that should read as no exposure).

    python benchmarks/eval_membership.py --out benchmarks/results                  # tiny, CPU
    python benchmarks/eval_membership.py --size small --device cuda --scenarios finetune-radiographs

Writes eval_<size>.json (everything) and eval_<size>.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from gradaudit import workflow
from gradaudit.audit import metrics
from gradaudit.audit.calibration import Calibrator, collection_test
from gradaudit.audit.method import GradAudit, SliceSet
from gradaudit.audit.per_pair import fit_reference, oof_auroc_ci
from gradaudit.audit.protocol import choose, cross_validate
from gradaudit.capture import run_extract, run_reference
from gradaudit.store import RunFolder, read_manifest, write_pairs
from gradaudit.toy.corpora import KINDS
from gradaudit.toy.models import FORMAT
from gradaudit.toy.scenarios import REFERENCE_POOL, TRAININGS, audit_sets, train_model

REFERENCE_SIZES = (25, 50, 100, 200)
TAUS = (0.0, 0.05, 0.10, 0.2)
SHARES = (0.0, 0.1, 0.3, 0.5)
PRESETS = ("paper", "all-linear")
GRADIENT = ("auto", "paper", "paper-exact", "loo", "signed", "head-cosine", "head-lognorm", "head-both", "combined")
N_BOOT = 2000
SCENARIOS = [f"{t}-{c}" for t in TRAININGS for c in KINDS]


def capture(root, model, corpus, size, preset, n_ref, n_probes, full, device, batch_size) -> str:
    """One run folder: R from half of the first ``n_ref`` members, every set the evaluation scores."""
    run = os.path.join(root, "eval", os.path.basename(model["adapter"] or model["model"]), f"{preset}-ref{n_ref}")
    iid = audit_sets(root, corpus, size, n_ref, n_probes, "iid")
    # audit_sets' manifests name images in the corpus folder, outside their own folder
    builders, fit_members = workflow.split_members(iid["reference_members"], run, "stop", allow_outside=True)
    opts = dict(adapter=model["adapter"], preset=preset, batch_size=batch_size, device=device, progress=False,
                allow_outside=True, prompt_format=FORMAT.spec)
    run_reference(model["model"], builders, run, **opts)
    sets = {"r_builders": builders, "reference_members": fit_members,
            "reference_nonmembers": iid["reference_nonmembers"], "probes": iid["probes"]}
    if full:
        shifted = audit_sets(root, corpus, size, n_ref, n_probes, "shifted")
        shifted_probes = [p for p in read_manifest(shifted["probes"], allow_outside=True)[0] if p.label == 0]
        sets.update(reference_nonmembers_shifted=shifted["reference_nonmembers"],
                    probe_nonmembers_shifted=write_pairs(RunFolder(run).manifest_path("shifted"), shifted_probes),
                    shuffled=workflow.association_manifest(iid["probes"], run, "stop", allow_outside=True))
    for name, manifest in sets.items():
        run_extract(model["model"], manifest, run, name, **opts)
    return run


def scores_of(estimates, chosen: str, paper_exact: GradAudit, pairs: SliceSet) -> dict[str, np.ndarray]:
    """Every gradient score and every baseline of ``pairs`` (none of them a reference pair)."""
    fresh = np.full(pairs.num_pairs, -1)
    out = {name: e.score_probes(pairs, fresh) for name, e in estimates.items()}
    out["auto"] = out[chosen]
    out["paper-exact"] = paper_exact.score_samples(pairs)
    return {**out, **pairs.extra}


def membership(pos: dict, neg: dict) -> dict:
    table = {k: metrics.summary(pos[k], neg[k], n_boot=N_BOOT) for k in pos}
    baselines = [k for k in pos if k not in GRADIENT]
    best = max(baselines, key=lambda k: table[k]["auroc"])
    diff = metrics.paired_auroc_difference(pos["auto"], neg["auto"], pos[best], neg[best], n_boot=N_BOOT)
    return dict(scores=table, best_baseline=best, auto_minus_best_baseline=list(diff))


def exposure(estimates, chosen, pos, neg, oof_n_members) -> dict:
    """Estimated member share and collection test of probe collections with known shares; "claimed" as the
    audit's verdict does: only where the chosen method beats chance on the reference pairs."""
    oof = estimates[chosen].scores
    reference = (oof[:oof_n_members], oof[oof_n_members:])
    low = oof_auroc_ci(oof, oof_n_members)[0]
    calibrator = Calibrator().fit(*reference)
    n = min(pos.size, neg.size)
    out = []
    for share in SHARES:
        k = int(round(share * n))
        collection = np.concatenate([pos[:k], neg[:n - k]])
        est, ci_low, ci_high = calibrator.exposure(collection, n_boot=500, reference=reference)
        test = collection_test(collection, reference[1])
        out.append(dict(share=share, size=int(collection.size), estimate=est, ci=[ci_low, ci_high],
                        p_value=test["p_value"]))
    return dict(chosen=chosen, oof_auroc=estimates[chosen].auroc, oof_auroc_ci_low=low, claimed=bool(low > 0.5),
                shares=out)


def evaluate(run: str, protocol: str, full: bool, seed: int = 0) -> dict:
    nonmembers_set = "reference_nonmembers" + ("" if protocol == "iid" else "_shifted")
    members, nonmembers = workflow.load_set(run, "reference_members"), workflow.load_set(run, nonmembers_set)
    fitted = fit_reference(members.pairs, nonmembers.pairs, members.ids, nonmembers.ids, seed=seed)
    estimates, chosen = fitted.estimates, fitted.method
    builders = workflow.load_set(run, "r_builders").pairs
    paper_exact = GradAudit().fit(builders, nonmembers.pairs)  # Δ on the members that built R, in-sample
    probes = workflow.load_set(run, "probes")
    y = np.array(probes.labels, dtype=bool)
    member_probes = probes.pairs.subset(y)
    nonmember_probes = (probes.pairs.subset(~y) if protocol == "iid"
                        else workflow.load_set(run, "probe_nonmembers_shifted").pairs)
    pos = scores_of(estimates, chosen, paper_exact, member_probes)
    neg = scores_of(estimates, chosen, paper_exact, nonmember_probes)
    out = dict(protocol=protocol, chosen=chosen, reference=fitted.summary()["reference"],
               cross_validated={k: e.auroc for k, e in estimates.items()}, membership=membership(pos, neg))
    if not full:
        return out
    out["tau"] = []
    for tau in TAUS:
        for name, at_tau in (("paper", GradAudit(tau=tau).fit(members.pairs, nonmembers.pairs)),
                             ("paper-exact", GradAudit(tau=tau).fit(builders, nonmembers.pairs))):
            s_pos, s_neg = at_tau.score_samples(member_probes), at_tau.score_samples(nonmember_probes)
            out["tau"].append(dict(tau=tau, variant=name, auroc=metrics.auroc(s_pos, s_neg),
                                   kept=float(at_tau.keep_.mean())))
    n_m = members.pairs.num_pairs
    out["exposure"] = exposure(estimates, chosen, pos["auto"], neg["auto"], n_m)
    # control: the reference labels permuted, everything refitted; it should read as no exposure
    pool = SliceSet.concat(members.pairs, nonmembers.pairs)
    order = np.random.default_rng(seed + 1).permutation(pool.num_pairs)
    fake = cross_validate(pool.subset(order[:n_m]), pool.subset(order[n_m:]), seed=seed)
    fake_chosen = choose(fake)
    fresh_pos, fresh_neg = (np.full(s.num_pairs, -1) for s in (member_probes, nonmember_probes))
    out["exposure_permuted_labels"] = exposure(fake, fake_chosen, fake[fake_chosen].score_probes(member_probes, fresh_pos),
                                               fake[fake_chosen].score_probes(nonmember_probes, fresh_neg), n_m)
    if protocol == "iid":
        shuffled = scores_of(estimates, chosen, paper_exact, workflow.load_set(run, "shuffled").pairs)
        out["association"] = {k: metrics.summary(pos[k], shuffled[k], n_boot=N_BOOT) for k in pos}
    return out


def _ci(v: dict, key: str) -> str:
    value, ci = v[key], v.get(f"{key}_ci")
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def markdown(report: dict) -> str:
    rows = report["results"]
    head = rows and rows[0]
    lines = [f"# Membership evaluation, {report['size']} models ({report['device']})", "",
             f"`{report['command']}` — {report['date']}, {report['minutes']:.0f} min (summed over processes). "
             "Generated data and small models: what these figures say about real models is only what the method does when its "
             "assumptions are met or not; see the README.", "",
             "## Models (held-out caption loss before → after training; members' final training loss)", "",
             "| scenario | held-out before | held-out after | members' train loss |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['held_out_loss_before']:.3f} | {m['held_out_loss']:.3f} | {m['train_loss']:.3f} |")
    largest = max(r["n_reference"] for r in rows) if rows else 0
    main = [r for r in rows if r["preset"] == "paper" and r["n_reference"] == largest]
    lines += ["", f"## Membership, {report['probes']} + {report['probes']} probes, {largest} + {largest} reference "
              "pairs, `paper` preset", "",
              "auto = GradAudit's cross-validated choice (picked on reference pairs only). AUROC and TPR at 1% FPR "
              "with 95% bootstrap intervals; the difference is paired-bootstrap.", "",
              "| scenario | protocol | auto (chosen) AUROC | auto TPR@1% | paper AUROC | paper-exact AUROC | best baseline | "
              "its AUROC | its TPR@1% | auto − best [95% CI] | goal (≥ +0.05, CI > 0) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in main:
        m = r["membership"]
        s, b = m["scores"], m["best_baseline"]
        d = m["auto_minus_best_baseline"]
        goal = "met" if d[0] >= 0.05 and d[1] > 0 else "missed"
        lines.append(f"| {r['scenario']} | {r['protocol']} | {_ci(s['auto'], 'auroc')} ({r['chosen']}) | "
                     f"{_ci(s['auto'], 'tpr_at_0.01_fpr')} | {_ci(s['paper'], 'auroc')} | {_ci(s['paper-exact'], 'auroc')} | "
                     f"{b} | {_ci(s[b], 'auroc')} | {_ci(s[b], 'tpr_at_0.01_fpr')} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | "
                     f"{goal if r['protocol'] == 'iid' and r['scenario'].startswith('finetune') else '-'} |")
    if head:
        names = [k for k in GRADIENT] + sorted(k for k in head["membership"]["scores"] if k not in GRADIENT)
        lines += ["", "## Every score (AUROC on the probes; same runs)", "",
                  "| scenario | protocol | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in main:
            lines.append(f"| {r['scenario']} | {r['protocol']} | "
                         + " | ".join(f"{r['membership']['scores'][k]['auroc']:.3f}" for k in names) + " |")
    lines += ["", "## Reference-set size (i.i.d., `paper` preset; n known members — half build R, half fit — and "
              "n non-members)", "", "| scenario | n | auto AUROC (chosen) | paper | paper-exact | best baseline AUROC |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["protocol"] == "iid" and r["preset"] == "paper":
            s = r["membership"]["scores"]
            lines.append(f"| {r['scenario']} | {r['n_reference']} | {_ci(s['auto'], 'auroc')} ({r['chosen']}) | "
                         f"{s['paper']['auroc']:.3f} | {s['paper-exact']['auroc']:.3f} | "
                         f"{s[r['membership']['best_baseline']]['auroc']:.3f} ({r['membership']['best_baseline']}) |")
    lines += ["", f"## Layer presets (n = {largest})", "", "| scenario | protocol | preset | auto AUROC (chosen) | paper | paper-exact |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["n_reference"] == largest:
            s = r["membership"]["scores"]
            lines.append(f"| {r['scenario']} | {r['protocol']} | {r['preset']} | {_ci(s['auto'], 'auroc')} ({r['chosen']}) | "
                         f"{s['paper']['auroc']:.3f} | {s['paper-exact']['auroc']:.3f} |")
    lines += ["", "## τ of the paper's mask (probe AUROC; share of slices kept)", "",
              "| scenario | protocol | variant | " + " | ".join(f"τ = {t:g}" for t in TAUS) + " |", "|---|---|---|" + "---|" * len(TAUS)]
    for r in (r for r in main if "tau" in r):
        for variant in ("paper", "paper-exact"):
            cells = [t for t in r["tau"] if t["variant"] == variant]
            lines.append(f"| {r['scenario']} | {r['protocol']} | {variant} | "
                         + " | ".join(f"{t['auroc']:.3f} ({100 * t['kept']:.0f}%)" for t in cells) + " |")
    lines += ["", f"## Association: {report['probes']} member probes against their images with other member probes' "
              "texts", "",
              "It shows whether a score ties a text to its image. It does not show membership: both sides are "
              "training images and training texts, so a model that memorised texts alone would not separate them.", "",
              "| scenario | auto (chosen) | paper | paper-exact | loss | min_k_plus_plus | best baseline | goal (auto ≥ 0.80) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in main:
        if "association" in r:
            a = r["association"]
            best = max((k for k in a if k not in GRADIENT), key=lambda k: a[k]["auroc"])
            lines.append(f"| {r['scenario']} | {_ci(a['auto'], 'auroc')} | {_ci(a['paper'], 'auroc')} | "
                         f"{_ci(a['paper-exact'], 'auroc')} | {_ci(a['loss'], 'auroc')} | {_ci(a['min_k_plus_plus'], 'auroc')} | "
                         f"{best} {a[best]['auroc']:.3f} | {'met' if a['auto']['auroc'] >= 0.8 else 'missed'} |")
    lines += ["", f"## Exposure of a {report['probes']}-pair collection at known member shares (auto's score; 95% bootstrap CI; "
              "one-sided Mann–Whitney p against reference non-members)", "",
              "Claimed only where the chosen method's out-of-fold AUROC interval on the reference lies above 0.5, "
              "as the audit's verdict does; otherwise the figures are shown struck through. The control refits "
              "everything on permuted reference labels and should read as no exposure.", "",
              "| scenario | protocol | reference labels | OOF AUROC (CI low) | " + " | ".join(f"true {100 * s:.0f}%" for s in SHARES)
              + " | goal |", "|---|---|---|---|" + "---|" * len(SHARES) + "---|"]
    for r in (r for r in main if "exposure" in r):
        for labels, e in (("true", r["exposure"]), ("permuted", r["exposure_permuted_labels"])):
            within = all(abs(c["estimate"] - c["share"]) <= 0.10 for c in e["shares"])
            if labels == "true":
                goal = "met" if e["claimed"] and within else "missed" + ("" if e["claimed"] else " (no claim)")
            else:
                goal = "reads as no exposure" if not e["claimed"] else "claims exposure"
            mark = "" if e["claimed"] else "~~"
            low = f"{e['oof_auroc_ci_low']:.2f}"
            lines.append(f"| {r['scenario']} | {r['protocol']} | {labels} | {e['oof_auroc']:.3f} ({low}) | "
                         + " | ".join(f"{mark}{100 * c['estimate']:.0f}% [{100 * c['ci'][0]:.0f}, {100 * c['ci'][1]:.0f}]{mark}, "
                                      f"p = {c['p_value']:.2g}" for c in e["shares"]) + f" | {goal} |")
    return "\n".join(lines) + "\n"


def _row_order(row: dict) -> tuple:
    return SCENARIOS.index(row["scenario"]), row["preset"] != "paper", row["n_reference"], row["protocol"]


def merge(paths: list[str], out: str) -> int:
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    joined = dict(reports[0], command=" ; ".join(r["command"] for r in reports), minutes=sum(r["minutes"] for r in reports),
                  models={k: v for r in reports for k, v in r["models"].items()},
                  results=sorted((row for r in reports for row in r["results"]), key=_row_order),
                  device=" / ".join(sorted({r["device"] for r in reports})))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"eval_{joined['size']}.json"), "w") as f:
        json.dump(joined, f, indent=1)
    with open(os.path.join(out, f"eval_{joined['size']}.md"), "w") as f:
        f.write(markdown(joined))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default="demo", help="the scenarios' cache (data, models) and the run folders")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sizes", default=",".join(map(str, REFERENCE_SIZES)), help="reference sizes (the whole pool, "
                    f"{REFERENCE_POOL}: both protocols, τ, exposure, association)")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"layer presets (others than paper at {REFERENCE_POOL} only)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="no run: join the reports of separate runs (e.g. one "
                    "scenario per 10-minute GPU call) into --out")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    sizes = sorted(int(n) for n in args.sizes.split(","))
    t0 = time.time()
    report = dict(size=args.size, command=" ".join(["python"] + sys.argv), date=time.strftime("%Y-%m-%d"),
                  probes=args.probes, models={}, results=[])
    import torch

    report["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    for scenario in args.scenarios.split(","):
        training, corpus = scenario.split("-")
        model = train_model(args.root, training, corpus, args.size, device=args.device)
        report["models"][scenario] = dict(held_out_loss_before=model["held_out_loss_before"],
                                          held_out_loss=model["held_out_loss"],
                                          train_loss=model["history"][-1]["train_loss"])
        for preset in args.presets.split(","):
            for n_ref in (sizes if preset == "paper" else [REFERENCE_POOL]):
                full = n_ref == REFERENCE_POOL and preset == "paper"  # other presets: membership, i.i.d. only
                t = time.time()
                run = capture(args.root, model, corpus, args.size, preset, n_ref, args.probes, full, args.device,
                              args.batch_size)
                captured = time.time() - t
                for protocol in ("iid", "shifted") if full else ("iid",):
                    t = time.time()
                    row = dict(scenario=scenario, preset=preset, n_reference=n_ref, **evaluate(run, protocol, full))
                    report["results"].append(row)
                    m = row["membership"]
                    print(f"{scenario} {preset} n={n_ref} {protocol}: auto {m['scores']['auto']['auroc']:.3f} "
                          f"({row['chosen']}), paper {m['scores']['paper']['auroc']:.3f}, best baseline "
                          f"{m['best_baseline']} {m['scores'][m['best_baseline']]['auroc']:.3f}  "
                          f"[capture {captured:.0f} s, evaluation {time.time() - t:.0f} s]", flush=True)
                    report["minutes"] = (time.time() - t0) / 60
                    os.makedirs(args.out, exist_ok=True)  # written after each row: a cut-off run keeps what it did
                    with open(os.path.join(args.out, f"eval_{args.size}.json"), "w") as f:
                        json.dump(report, f, indent=1, default=float)
                    with open(os.path.join(args.out, f"eval_{args.size}.md"), "w") as f:
                        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
