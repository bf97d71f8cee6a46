"""A whole audit from one TOML file: reference → statistics → cross-validated fit → scores →
calibration → evaluation (when probes carry labels) → CSV, JSON and an HTML report; and the same
steps one at a time from a run folder (``gradaudit fit / score / evaluate / report``). Resumable: the
capture passes continue in the run folder; the fit is stored there and reused while the reference
sets it was made from are unchanged.

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

import os
import tomllib
from dataclasses import dataclass

import numpy as np

from gradaudit.audit import per_pair
from gradaudit.audit.baselines import all_baselines
from gradaudit.audit.method import SliceSet
from gradaudit.audit.per_pair import Evaluation, Fit, ScoredSet
from gradaudit.audit.variants import VARIANTS
from gradaudit.capture import Options, run_extract, run_reference
from gradaudit.errors import ConfigError
from gradaudit.report import render
from gradaudit.store.integrity import refuse_id_collisions
from gradaudit.store.manifest import read_manifest, shuffled_texts, write_pairs
from gradaudit.store.runfolder import RunFolder

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
            raise ConfigError(f"cannot read the audit configuration {path}: {exc}") from exc
        root = os.path.dirname(os.path.abspath(path))
        missing = [k for k in ("model", "run", "data") if k not in raw]
        missing += [f"data.{k}" for k in SETS if k not in raw.get("data", {})]
        if missing:
            raise ConfigError(f"{path}: missing {', '.join(missing)}")
        unknown = set(raw) - {"model", "run", "data", "adapter", "preset", "pattern", "options"}
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")

        def resolve(p):
            return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(root, p))

        return cls(model=resolve(raw["model"]), run=resolve(raw["run"]), adapter=resolve(raw.get("adapter")),
                   data={k: resolve(raw["data"][k]) for k in SETS}, preset=raw.get("preset", "paper"),
                   pattern=raw.get("pattern"), options=dict(raw.get("options", {})))


@dataclass
class AuditSet:
    """A stored statistics set as the audit reads it: ids, the slice statistics with every baseline's
    score as ``pairs.extra``, labels (None where the manifest had none)."""

    ids: list[str]
    pairs: SliceSet
    labels: list


def load_set(run: str | RunFolder, name: str) -> AuditSet:
    """Stored set ``name`` of a run folder, on plain arrays."""
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    stored = folder.stored_set(name)
    pairs = SliceSet(stored.weights, **stored.stats, ref_row_sq=stored.ref_row_sq, ref_col_sq=stored.ref_col_sq,
                     n_ref=stored.n_ref, in_ref=stored.in_ref)
    pairs.extra = all_baselines(stored.tokens, stored.token_offsets, stored.texts, pairs)
    return AuditSet(stored.ids, pairs, stored.labels)


def fit_sets(run: str, members_set: str = "reference_members", nonmembers_set: str = "reference_nonmembers",
             method: str = "auto", folds: int = 5, seed: int = 0) -> Fit:
    """Cross-validates every variant on two stored sets of the run (known members, known non-members)
    and chooses one; nothing is written."""
    members, nonmembers = load_set(run, members_set), load_set(run, nonmembers_set)
    return per_pair.fit_reference(members.pairs, nonmembers.pairs, members.ids, nonmembers.ids, method, folds, seed)


def _reference_pairs(folder: RunFolder) -> dict[str, str]:
    """The content digest of each reference pair a fit is made from (members, then non-members), by id.
    An id in both sets must name the same pair in both."""
    members, nonmembers = folder.pair_digests("reference_members"), folder.pair_digests("reference_nonmembers")
    refuse_id_collisions("reference_nonmembers", nonmembers, "set 'reference_members'", members)
    return members | nonmembers


def _fit_request(folder: RunFolder, method: str, folds: int) -> dict:
    """What a stored fit must match to be reused: the request, R, and the reference pairs (ids and
    contents, so that a reference set extracted anew from other pairs under the same ids is refitted)."""
    pairs = _reference_pairs(folder)
    ids = [folder.pair_info(name)[0] for name in ("reference_members", "reference_nonmembers")]
    return {"method": method, "folds": folds, "reference_sha256": folder.reference()[2],
            "reference_ids": ids[0] + ids[1], "reference_digests": [pairs[i] for i in ids[0] + ids[1]]}


def _refuse_other_pairs_under_reference_ids(folder: RunFolder, name: str, fitted: Fit) -> None:
    """A pair of set ``name`` whose id is one of the fit's reference pairs gets that pair's out-of-fold
    score (``Fit.score`` matches by id): right only when it is the same pair, so ids shared with other
    contents are refused (``IdCollision``). The fit is made from the run folder's reference sets."""
    reference = _reference_pairs(folder)
    fitted_pairs = {pid: reference[pid] for pid in fitted.reference_ids if pid in reference}
    refuse_id_collisions(name, folder.pair_digests(name), "the fit's reference pairs", fitted_pairs)


def fit(run: str, method: str = "auto", folds: int = 5) -> Fit:
    """The run's fit on its reference sets: the stored one if it was made for the same request from the
    same reference pairs and R, else fitted afresh and stored."""
    if method != "auto" and method not in VARIANTS:
        raise ConfigError(f"method must be 'auto' or one of {sorted(VARIANTS)}; got {method!r}")
    folder = RunFolder(run)
    with folder.writing("fit", create=False):  # the sets it reads and the fit it writes stay as they are
        request = _fit_request(folder, method, folds)
        if folder.has_fit():
            meta, arrays = folder.load_fit()
            if meta["request"] == request:
                return Fit.restore(meta["fit"], arrays)
        result = fit_sets(run, method=method, folds=folds)
        meta, arrays = result.export()
        folder.save_fit({"request": request, "fit": meta, "summary": result.summary()}, arrays)
        return result


def stored_fit(run: str) -> Fit:
    """The fit stored in the run folder, whatever it was made for."""
    meta, arrays = RunFolder(run).load_fit()
    return Fit.restore(meta["fit"], arrays)


def score(run: str, name: str, fitted: Fit) -> ScoredSet:
    """Stored set ``name`` scored against a fit: scores, probabilities, exposure, collection test."""
    _refuse_other_pairs_under_reference_ids(RunFolder(run), name, fitted)
    audited = load_set(run, name)
    return per_pair.score_set(fitted, name, audited.pairs, audited.ids, audited.labels)


def context(run: str) -> dict:
    """What metrics.json says of the model and run, from the run folder's fingerprint."""
    recorded = RunFolder(run).fingerprint()
    return {"model": {k: recorded.get(k) for k in ("model", "model_type", "adapter", "config_sha256", "weights_sha256")},
            "selection": len(recorded["targets"]), "run": run}


def write_pairs_csv(run: str, scored: ScoredSet) -> str:
    """pairs.csv of a scored set: score, probability, verdict, the paper's score and every baseline."""
    names = sorted(scored.baselines)
    s = scored.scores
    rows = [[pid, f"{s['gradaudit'][i]:.6g}", f"{scored.probability[i]:.4f}",
             "member" if scored.probability[i] >= 0.5 else "non-member", f"{s['paper'][i]:.6g}",
             *[f"{s[k][i]:.6g}" for k in names], "" if scored.labels[i] is None else scored.labels[i]]
            for i, pid in enumerate(scored.ids)]
    return RunFolder(run).write_pairs_csv(scored.name, ["id", "score", "probability", "verdict", "paper_score",
                                                        *names, "label"], rows)


def write_outputs(run: str, fitted: Fit, scored: ScoredSet, evaluation: Evaluation | None = None,
                  **extra) -> dict:
    """metrics.json and report.html of a scored (and possibly evaluated) set; ``extra`` joins the
    metrics (e.g. the association test). Returns the metrics."""
    folder = RunFolder(run)
    result = per_pair.result(fitted, scored, evaluation, **context(run))
    result.update(extra)
    folder.write_metrics(scored.name, result)
    folder.write_report(scored.name, render(result, fitted, scored, evaluation,
                                            lambda figure: folder.figure_path(scored.name, figure)))
    return result


def split_members(manifest: str, run: str, on_error: str) -> tuple[str, str]:
    """Alternate lines of the reference members: the first half builds R, the second is scored against
    it exactly as a member probe is (never in R). Scoring reference members leave-one-out instead was
    measured optimistic for the logistic heads (1.00 out-of-fold against 0.72 on probes)."""
    pairs = read_manifest(manifest, on_error)[0]
    if len(pairs) < 4:
        raise ConfigError(f"{manifest}: splitting the reference members needs at least 4 pairs; got {len(pairs)}")
    folder = RunFolder(run)
    return (write_pairs(folder.manifest_path("r_builders"), pairs[0::2]),
            write_pairs(folder.manifest_path("fit_members"), pairs[1::2]))


def association_manifest(probes: str, run: str, on_error: str) -> str:
    """The association test's negatives: the audited pairs labelled members (all of them when unlabelled),
    each image with another of those pairs' texts."""
    pairs = read_manifest(probes, on_error)[0]
    correct = [p for p in pairs if p.label == 1] or [p for p in pairs if p.label is None]
    if len(correct) < 2:
        raise ConfigError(f"{probes}: association_test needs at least 2 probes labelled 1 (or unlabelled)")
    return write_pairs(RunFolder(run).manifest_path("shuffled"), correct, texts=shuffled_texts(correct),
                       id_suffix=SHUFFLED)


def association(run: str, fitted: Fit, scored: ScoredSet) -> dict:
    """Correct pairs (the probes labelled members, or all probes when unlabelled) against the same images
    with other of those pairs' texts (stored set "shuffled"), for every score."""
    _refuse_other_pairs_under_reference_ids(RunFolder(run), "shuffled", fitted)
    shuffled = load_set(run, "shuffled")
    scores, _ = fitted.score(shuffled.pairs, shuffled.ids)
    position = {pid: i for i, pid in enumerate(scored.ids)}
    correct = np.array([position[pid[:-len(SHUFFLED)]] for pid in shuffled.ids])
    return per_pair.association(scored, scores, correct)


def run_audit(config_path: str, progress: bool = True) -> dict:
    """Runs (or resumes) the audit a TOML file describes; returns the metrics written to metrics.json.
    Holds the run folder's writer lock throughout: another writer is refused, not interleaved."""
    cfg = AuditConfig.load(config_path)
    with RunFolder(cfg.run).writing("audit"):
        return _audit(cfg, config_path, progress)


def _audit(cfg: AuditConfig, config_path: str, progress: bool) -> dict:
    """The audit's steps, under the writer lock."""
    opts = dict(cfg.options)
    method = opts.pop("method", "auto")
    folds = int(opts.pop("folds", 5))
    if method != "auto" and method not in VARIANTS:
        raise ConfigError(f"options.method must be 'auto' or one of {sorted(VARIANTS)}; got {method!r}")
    split = bool(opts.pop("split_reference", True))
    with_association = bool(opts.pop("association_test", False))
    capture = dict(adapter=cfg.adapter, preset=cfg.preset, pattern=cfg.pattern, progress=progress, **opts)
    Options.of(**capture)  # checks the option names and values before any work
    manifests = dict(cfg.data)
    on_error = capture.get("on_error", "stop")
    if split:
        manifests["builders"], manifests["reference_members"] = split_members(cfg.data["reference_members"], cfg.run,
                                                                              on_error)
    run_reference(cfg.model, manifests["builders" if split else "reference_members"], cfg.run, **capture)
    if with_association:
        manifests["shuffled"] = association_manifest(cfg.data["probes"], cfg.run, on_error)
    for name in SETS + (("shuffled",) if with_association else ()):
        run_extract(cfg.model, manifests[name], cfg.run, name, **capture)
    fitted = fit(cfg.run, method, folds)
    scored = score(cfg.run, "probes", fitted)
    write_pairs_csv(cfg.run, scored)
    evaluation = per_pair.evaluate(scored) if scored.labelled else None
    extra = {"association": association(cfg.run, fitted, scored)} if with_association else {}
    return write_outputs(cfg.run, fitted, scored, evaluation, **extra, config=os.path.abspath(config_path))
