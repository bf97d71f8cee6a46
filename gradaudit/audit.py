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
    split_reference = true            # half the reference members build R, the other half fit the
                                      # method (scored as probes are); false: all build R, scored LOO
    association_test = false          # also score the probes labelled members (all, if unlabelled)
                                      # against their images with other probes' texts
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
from gradaudit.data import read_manifest, shuffled_texts, write_pairs
from gradaudit.method import GradAudit
from gradaudit.pipeline import Options, run_extract, run_reference
from gradaudit.protocol import VARIANTS, choose, cross_validate
from gradaudit.runfolder import RunFolder

SETS = ("reference_members", "reference_nonmembers", "probes")
SHUFFLED = "~shuffled"  # id suffix of the association test's negatives


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


def load_set(folder: RunFolder, name: str):
    """(ids, SliceSet with the baselines as extra scores, labels) of a stored statistics set."""
    ids, pairs, rest = folder.slice_set(name)
    info_ids, texts, labels = folder.pair_info(name)
    if info_ids != ids:
        raise ValueError(f"{folder.path}: set {name!r} has inconsistent chunks; extract it again into a new set")
    pairs.extra = all_baselines(rest["tokens"], rest["token_offsets"], texts, pairs)
    return ids, pairs, labels


def oof_auroc_ci(scores: np.ndarray, n_members: int) -> list[float]:
    """95% interval of the AUROC of out-of-fold scores (members first), the one the claim rule reads."""
    _, low, high = metrics.auroc_ci(scores[:n_members], scores[n_members:], n_boot=2000)
    return [low, high]


def fit_sets(run: str, members_set: str = "reference_members", nonmembers_set: str = "reference_nonmembers",
             method: str = "auto", folds: int = 5, seed: int = 0) -> dict:
    """Cross-validates every variant on two stored sets of the run (known members, known non-members)
    and chooses one. Returns the state that scoring needs: "summary" (what fit.json holds),
    "estimates", "members", "nonmembers" and "reference_ids" (members first)."""
    if method != "auto" and method not in VARIANTS:
        raise ValueError(f"method must be 'auto' or one of {sorted(VARIANTS)}; got {method!r}")
    folder = RunFolder(run)
    member_ids, members, _ = load_set(folder, members_set)
    nonmember_ids, nonmembers, _ = load_set(folder, nonmembers_set)
    estimates = cross_validate(members, nonmembers, folds=folds, seed=seed)
    chosen = choose(estimates, method)
    with open(os.path.join(run, "fingerprint.json")) as f:
        recorded = json.load(f)
    summary = {
        "model": {k: recorded.get(k) for k in ("model", "model_type", "adapter", "config_sha256", "weights_sha256")},
        "selection": len(recorded["targets"]),
        "method": chosen, "requested_method": method,
        "reference": {"members": members.num_pairs, "nonmembers": nonmembers.num_pairs, "folds": folds,
                      "r_builders": members.n_ref, "members_in_r": int(members.in_ref.sum())},
        "cross_validated": {k: {"auroc": e.auroc, "auroc_ci": oof_auroc_ci(e.scores, members.num_pairs),
                                "tpr_at_0.01_fpr": e.tpr_at_1pct, "tpr_at_0.05_fpr": e.tpr_at_5pct}
                            for k, e in estimates.items()},
        "cross_validated_baselines": {k: metrics.auroc(members.extra[k], nonmembers.extra[k]) for k in members.extra},
    }
    return dict(summary=summary, estimates=estimates, members=members, nonmembers=nonmembers,
                reference_ids=member_ids + nonmember_ids)


def fit(run: str, method: str = "auto", folds: int = 5) -> dict:
    """:func:`fit_sets` on the run's reference sets; writes fit.json."""
    state = fit_sets(run, method=method, folds=folds)
    with open(os.path.join(run, "fit.json"), "w") as f:
        json.dump(state["summary"], f, indent=1)
    return state


def score_set(run: str, name: str, state: dict) -> dict:
    """Every score of stored set ``name`` on the footing of the fit's out-of-fold scores: {"ids", "labels",
    "reference_position" (index among the reference pairs, or -1), "scores": {"gradaudit" (the chosen
    variant), "paper", each baseline}}."""
    probe_ids, probes, labels = load_set(RunFolder(run), name)
    estimates = state["estimates"]
    position = {pid: i for i, pid in enumerate(state["reference_ids"])}
    reference_position = np.array([position.get(pid, -1) for pid in probe_ids])
    scores = {"gradaudit": estimates[state["summary"]["method"]].score_probes(probes, reference_position),
              "paper": estimates["paper"].score_probes(probes, reference_position), **probes.extra}
    return dict(ids=probe_ids, labels=labels, reference_position=reference_position, scores=scores)


def score(run: str, name: str = "probes", method: str = "auto", folds: int = 5, state: dict | None = None) -> dict:
    """Scores set ``name`` against the fit (recomputed from the run folder unless ``state`` is given):
    scores, calibrated probabilities at the set's own prior, exposure, the collection test; writes
    pairs.csv (per pair) and returns everything the evaluation and the report read."""
    state = state or fit(run, method, folds)
    scored = score_set(run, name, state)
    probe_ids, labels, scores = scored["ids"], scored["labels"], scored["scores"]
    probe_scores, paper_scores = scores["gradaudit"], scores["paper"]
    baselines = {k: v for k, v in scores.items() if k not in ("gradaudit", "paper")}
    n_m = state["members"].num_pairs
    oof = state["estimates"][state["summary"]["method"]].scores
    calibrator = Calibrator().fit(oof[:n_m], oof[n_m:])
    prior, low, high = calibrator.exposure(probe_scores, reference=(oof[:n_m], oof[n_m:]))
    probability = calibrator.predict_proba(probe_scores, prior)
    result = dict(state["summary"], run=run, set=name, probes=len(probe_ids),
                  probes_in_reference=int((scored["reference_position"] >= 0).sum()),
                  exposure={"estimate": prior, "ci": [low, high]},
                  collection_test=collection_test(probe_scores, oof[n_m:], oof[:n_m]))
    with open(os.path.join(run, "pairs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        names = sorted(baselines)
        w.writerow(["id", "score", "probability", "verdict", "paper_score", *names, "label"])
        for i, pid in enumerate(probe_ids):
            w.writerow([pid, f"{probe_scores[i]:.6g}", f"{probability[i]:.4f}",
                        "member" if probability[i] >= 0.5 else "non-member", f"{paper_scores[i]:.6g}",
                        *[f"{baselines[k][i]:.6g}" for k in names], "" if labels[i] is None else labels[i]])
    data = dict(oof=oof, n_members=n_m, probe_scores=probe_scores, paper_scores=paper_scores, labels=labels,
                probability=probability, calibrator=calibrator, baselines=baselines, scored=scored,
                paper=GradAudit().fit(state["members"], state["nonmembers"]))
    return dict(result=result, data=data)


def expected_calibration_error(probability, y, bins: int = 10) -> float:
    """Σ over equal-width probability bins of (bin share) × |mean predicted − observed member share|."""
    which = np.clip((np.asarray(probability) * bins).astype(int), 0, bins - 1)
    return float(sum((which == b).mean() * abs(probability[which == b].mean() - y[which == b].mean())
                     for b in range(bins) if (which == b).any()))


def evaluate(scored: dict) -> dict:
    """Metrics on the set's own labels (all pairs labelled, both classes present), added to the result."""
    result, data = scored["result"], scored["data"]
    labels = data["labels"]
    if any(label is None for label in labels) or len(set(labels)) < 2:
        raise ValueError(f"set {result['set']!r} needs a 0/1 label on every pair, both classes present, to be evaluated")
    y = np.array(labels, dtype=bool)
    evaluated = {"gradaudit": data["probe_scores"], "paper": data["paper_scores"], **data["baselines"]}
    ev = {k: metrics.summary(v[y], v[~y], n_boot=2000) for k, v in evaluated.items()}
    best = max(data["baselines"], key=lambda k: ev[k]["auroc"])
    diff = metrics.paired_auroc_difference(data["probe_scores"][y], data["probe_scores"][~y],
                                           data["baselines"][best][y], data["baselines"][best][~y], n_boot=2000)
    ev["gradaudit_minus_best_baseline"] = {"baseline": best, "difference": diff[0], "ci": [diff[1], diff[2]]}
    ev["balanced_accuracy_at_0.5"] = metrics.balanced_accuracy(data["probability"][y], data["probability"][~y], 0.5)
    ev["expected_calibration_error"] = expected_calibration_error(data["probability"], y)
    ev["roc"] = {k: dict(zip(("fpr", "tpr"), (a.tolist() for a in metrics.roc_curve(evaluated[k][y], evaluated[k][~y]))))
                 for k in ("gradaudit", "paper")}
    result["evaluation"] = ev
    result["true_member_share"] = float(y.mean())
    data["evaluated"] = evaluated
    return result


def write_outputs(scored: dict) -> str:
    """metrics.json and report.html of a scored (and possibly evaluated) set; returns the report's path."""
    from gradaudit.report import write_report

    result = scored["result"]
    with open(os.path.join(result["run"], "metrics.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    return write_report(result["run"], result, scored["data"])


def split_members(manifest: str, run: str, on_error: str) -> tuple[str, str]:
    """Alternate lines of the reference members: the first half builds R, the second is scored against
    it exactly as a member probe is (never in R). Scoring reference members leave-one-out instead was
    measured optimistic for the logistic heads (1.00 out-of-fold against 0.72 on probes)."""
    pairs = read_manifest(manifest, on_error)[0]
    if len(pairs) < 4:
        raise ValueError(f"{manifest}: splitting the reference members needs at least 4 pairs; got {len(pairs)}")
    folder = os.path.join(run, "split")
    return (write_pairs(os.path.join(folder, "r_builders.jsonl"), pairs[0::2]),
            write_pairs(os.path.join(folder, "fit_members.jsonl"), pairs[1::2]))


def association_manifest(probes: str, run: str, on_error: str) -> str:
    """The association test's negatives: the audited pairs labelled members (all of them when unlabelled),
    each image with another of those pairs' texts."""
    pairs = read_manifest(probes, on_error)[0]
    correct = [p for p in pairs if p.label == 1] or [p for p in pairs if p.label is None]
    if len(correct) < 2:
        raise ValueError(f"{probes}: association_test needs at least 2 probes labelled 1 (or unlabelled)")
    return write_pairs(os.path.join(run, "split", "shuffled.jsonl"), correct, texts=shuffled_texts(correct),
                       id_suffix=SHUFFLED)


def association(run: str, state: dict, scored: dict) -> dict:
    """Correct pairs (the probes labelled members, or all probes when unlabelled) against the same images
    with other of those pairs' texts (set "shuffled"): AUROC with its interval for GradAudit's chosen
    score, the paper's and every baseline. It shows whether a score ties a text to its image; it does not
    show membership (both sides hold training images and training texts)."""
    shuffled = score_set(run, "shuffled", state)
    position = {pid: i for i, pid in enumerate(scored["ids"])}
    correct = np.array([position[pid[:-len(SHUFFLED)]] for pid in shuffled["ids"]])
    out = {k: metrics.summary(v[correct], shuffled["scores"][k], n_boot=2000) for k, v in scored["scores"].items()}
    return dict(pairs=len(correct), scores=out)


def run_audit(config_path: str, progress: bool = True) -> dict:
    """Runs (or resumes) the audit a TOML file describes; returns the metrics written to metrics.json."""
    cfg = AuditConfig.load(config_path)
    opts = dict(cfg.options)
    method = opts.pop("method", "auto")
    folds = int(opts.pop("folds", 5))
    if method != "auto" and method not in VARIANTS:
        raise ValueError(f"options.method must be 'auto' or one of {sorted(VARIANTS)}; got {method!r}")
    split = bool(opts.pop("split_reference", True))
    with_association = bool(opts.pop("association_test", False))
    capture = dict(adapter=cfg.adapter, preset=cfg.preset, pattern=cfg.pattern, progress=progress, **opts)
    Options(**capture)  # checks the option names and values before any work
    manifests = dict(cfg.data)
    if split:
        manifests["builders"], manifests["reference_members"] = split_members(
            cfg.data["reference_members"], cfg.run, capture.get("on_error", "stop"))
    run_reference(cfg.model, manifests["builders" if split else "reference_members"], cfg.run, **capture)
    if with_association:
        manifests["shuffled"] = association_manifest(cfg.data["probes"], cfg.run, capture.get("on_error", "stop"))
    for name in SETS + (("shuffled",) if with_association else ()):
        run_extract(cfg.model, manifests[name], cfg.run, name, **capture)
    state = fit(cfg.run, method, folds)
    scored = score(cfg.run, "probes", state=state)
    result = scored["result"]
    if with_association:
        result["association"] = association(cfg.run, state, scored["data"]["scored"])
    labels = scored["data"]["labels"]
    if all(label is not None for label in labels) and len(set(labels)) == 2:
        evaluate(scored)
    result["config"] = os.path.abspath(config_path)
    write_outputs(scored)
    return result
