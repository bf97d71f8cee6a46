"""A whole audit from one TOML file: reference → statistics → cross-validated fit → scores →
calibration → evaluation (when probes carry labels) → CSV, JSON and an HTML report. Resumable: the
capture passes continue in the run folder; the rest is recomputed from it in seconds.

    model = "models/llava"            # a save_pretrained folder
    adapter = "adapters/lora"         # optional PEFT adapter
    run = "runs/audit1"               # run folder (results, resumable)
    preset = "paper"                  # or "lora", "all-linear"; pattern = "regex" optional
    [data]
    reference_members = "ref_members.jsonl"
    reference_nonmembers = "ref_nonmembers.jsonl"
    probes = "probes.jsonl"           # the collection audited; "label" optional
    [options]
    method = "auto"                   # or paper, loo, signed, head-cosine, head-lognorm, head-both, combined
    batch_size = 8
    device = "cpu"
    on_error = "stop"                 # or "skip"

Paths are relative to the TOML file.
"""

from __future__ import annotations

import csv
import json
import os
import tomllib
from dataclasses import dataclass

import numpy as np

from gradaudit import metrics
from gradaudit.baselines import all_baselines
from gradaudit.calibration import Calibrator, collection_test
from gradaudit.data import read_manifest
from gradaudit.method import GradAudit, SliceSet
from gradaudit.pipeline import Options, run_extract, run_reference
from gradaudit.protocol import VARIANTS, choose, cross_validate
from gradaudit.runfolder import RunFolder

SETS = ("reference_members", "reference_nonmembers", "probes")


@dataclass
class AuditConfig:
    model: str
    run: str
    data: dict
    adapter: str | None = None
    preset: str = "paper"
    pattern: str | None = None
    options: dict | None = None

    @classmethod
    def load(cls, path: str) -> AuditConfig:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the audit configuration {path}: {exc}") from exc
        root = os.path.dirname(os.path.abspath(path))
        missing = [k for k in ("model", "run", "data") if k not in raw]
        missing += [f"data.{k}" for k in SETS if k not in raw.get("data", {})]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)} (see `gradaudit audit --help`)")
        unknown = set(raw) - {"model", "run", "data", "adapter", "preset", "pattern", "options"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")

        def resolve(p):
            return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(root, p))

        return cls(model=resolve(raw["model"]), run=resolve(raw["run"]), adapter=resolve(raw.get("adapter")),
                   data={k: resolve(raw["data"][k]) for k in SETS}, preset=raw.get("preset", "paper"),
                   pattern=raw.get("pattern"), options=dict(raw.get("options", {})))


def _with_baselines(pairs: SliceSet, rest: dict, texts: list[str]) -> SliceSet:
    pairs.extra = all_baselines(rest["tokens"], rest["token_offsets"], texts, pairs)
    return pairs


def _load_set(folder: RunFolder, name: str, manifest: str, on_error: str):
    ids, pairs, rest = folder.slice_set(name)
    by_id = {p.id: p for p in read_manifest(manifest, on_error)[0]}
    texts = [by_id[i].text for i in ids]
    labels = [by_id[i].label for i in ids]
    return ids, _with_baselines(pairs, rest, texts), labels


def run_audit(config_path: str, progress: bool = True) -> dict:
    """Runs (or resumes) the audit a TOML file describes; returns the metrics written to metrics.json."""
    cfg = AuditConfig.load(config_path)
    opts = dict(cfg.options)
    method = opts.pop("method", "auto")
    folds = int(opts.pop("folds", 5))
    if method != "auto" and method not in VARIANTS:
        raise ValueError(f"options.method must be 'auto' or one of {sorted(VARIANTS)}; got {method!r}")
    capture = dict(adapter=cfg.adapter, preset=cfg.preset, pattern=cfg.pattern, progress=progress, **opts)
    Options(**capture)  # checks the option names and values before any work
    run_reference(cfg.model, cfg.data["reference_members"], cfg.run, **capture)
    for name in SETS:
        run_extract(cfg.model, cfg.data[name], cfg.run, name, **capture)

    folder = RunFolder(cfg.run)
    on_error = capture.get("on_error", "stop")
    member_ids, members, _ = _load_set(folder, "reference_members", cfg.data["reference_members"], on_error)
    nonmember_ids, nonmembers, _ = _load_set(folder, "reference_nonmembers", cfg.data["reference_nonmembers"],
                                             on_error)
    probe_ids, probes, labels = _load_set(folder, "probes", cfg.data["probes"], on_error)

    estimates = cross_validate(members, nonmembers, folds=folds)
    chosen = choose(estimates, method)
    n_m = members.num_pairs
    oof = estimates[chosen].scores
    position = {pid: i for i, pid in enumerate(member_ids + nonmember_ids)}
    reference_position = np.array([position.get(pid, -1) for pid in probe_ids])
    probe_scores = estimates[chosen].score_probes(probes, reference_position)
    paper_scores = estimates["paper"].score_probes(probes, reference_position)
    paper = GradAudit().fit(members, nonmembers)  # the paper's mask on all reference pairs, for the report

    calibrator = Calibrator().fit(oof[:n_m], oof[n_m:])
    prior, low, high = calibrator.exposure(probe_scores, reference=(oof[:n_m], oof[n_m:]))
    probability = calibrator.predict_proba(probe_scores, prior)
    test = collection_test(probe_scores, oof[n_m:], oof[:n_m])

    result = {
        "config": os.path.abspath(config_path), "run": cfg.run, "method": chosen, "requested_method": method,
        "reference": {"members": n_m, "nonmembers": nonmembers.num_pairs, "folds": folds},
        "cross_validated": {k: {"auroc": e.auroc, "tpr_at_0.01_fpr": e.tpr_at_1pct, "tpr_at_0.05_fpr": e.tpr_at_5pct}
                            for k, e in estimates.items()},
        "cross_validated_baselines": {k: metrics.auroc(members.extra[k], nonmembers.extra[k]) for k in members.extra},
        "exposure": {"estimate": prior, "ci": [low, high]},
        "collection_test": test,
        "mask": {name: {"kept": k, "slices": n} for name, (k, n) in paper.kept_.items()},
        "probes": len(probe_ids),
        "probes_in_reference": int((reference_position >= 0).sum()),
    }
    if all(label is not None for label in labels) and len(set(labels)) == 2:
        y = np.array(labels, dtype=bool)
        evaluated = {"gradaudit": probe_scores, "paper": paper_scores, **probes.extra}
        result["evaluation"] = {k: metrics.summary(v[y], v[~y], n_boot=2000) for k, v in evaluated.items()}
        best_baseline = max(probes.extra, key=lambda k: result["evaluation"][k]["auroc"])
        diff = metrics.paired_auroc_difference(probe_scores[y], probe_scores[~y], probes.extra[best_baseline][y],
                                               probes.extra[best_baseline][~y], n_boot=2000)
        result["evaluation"]["gradaudit_minus_best_baseline"] = {"baseline": best_baseline, "difference": diff[0],
                                                                 "ci": [diff[1], diff[2]]}
        result["evaluation"]["balanced_accuracy_at_0.5"] = metrics.balanced_accuracy(
            probability[y], probability[~y], 0.5)
        result["true_member_share"] = float(y.mean())

    with open(os.path.join(cfg.run, "pairs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        names = sorted(probes.extra)
        w.writerow(["id", "score", "probability", "verdict", "paper_score", *names, "label"])
        for i, pid in enumerate(probe_ids):
            w.writerow([pid, f"{probe_scores[i]:.6g}", f"{probability[i]:.4f}",
                        "member" if probability[i] >= 0.5 else "non-member", f"{paper_scores[i]:.6g}",
                        *[f"{probes.extra[k][i]:.6g}" for k in names], "" if labels[i] is None else labels[i]])
    with open(os.path.join(cfg.run, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)

    from gradaudit.report import write_report

    write_report(cfg.run, result, dict(oof=oof, n_members=n_m, probe_scores=probe_scores, labels=labels,
                                       probability=probability, calibrator=calibrator, paper=paper,
                                       evaluated=result.get("evaluation") and
                                       {"gradaudit": probe_scores, "paper": paper_scores, **probes.extra}))
    return result
