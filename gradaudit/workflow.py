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
    folds = 5                         # cross-validation folds, at least 2
    split_reference = true            # half the reference members build R, the other half fit the
                                      # method (scored as probes are); false: all build R, scored LOO
    association_test = false          # also score the probes labelled members (all, if unlabelled)
                                      # against their images with other probes' texts
    batch_size = 8
    device = "cpu"                    # or "cuda", "cuda:N"; under torchrun "cuda" is each rank's GPU
    device_map = "auto"               # optional: a model larger than one GPU, placed across this machine's
                                      # GPUs by accelerate (or a table: module name = device)
    on_error = "stop"                 # or "skip": leave bad manifest lines out, recorded in
                                      # RUN/skipped/<set>.jsonl
    allow_outside = false             # true: read images outside their manifest's folder
    dtype = "float32"                 # or "bfloat16", "float16"; also backend = "auto",
                                      # mode = "eval", autocast = "bfloat16" as in `gradaudit extract`
    prompt_format = "chat-template"   # how the model saw pairs in training: "chat-template", "plain" or a
                                      # template such as "{image}Describe the card: {text}" (required
                                      # unless the model's processor fixes it; docs/data-and-runs.md)

Paths are relative to the TOML file. Every key and value is checked, and every line of the three
manifests read, before the model is loaded or anything is written: an unknown key, a value of the
wrong type (split_reference = "no", batch_size = "8") or a bad manifest line stops the audit, naming
the file and the key or line. A manifest's images must lie in its folder unless allow_outside = true.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tomllib
from dataclasses import dataclass

import numpy as np

from gradaudit import distributed
from gradaudit.audit import per_pair
from gradaudit.audit.baselines import all_baselines
from gradaudit.audit.collection import (CollectionAudit, audit_collection, blind_features, members_test, model_features,
                                        split, split_test)
from gradaudit.audit.method import SliceSet
from gradaudit.audit.per_pair import Evaluation, Fit, ScoredSet
from gradaudit.audit.protocol import min_pairs
from gradaudit.audit.variants import VARIANTS
from gradaudit.capture import Options, joined, run_extract, run_reference
from gradaudit.errors import ConfigError, ManifestError, ManifestsError, OptionError
from gradaudit.report import render
from gradaudit.store.cells import spreadsheet_safe
from gradaudit.store.integrity import refuse_id_collisions
from gradaudit.store.manifest import IMAGE_STATS, Pair, problems_as_records, read_manifest, shuffled_texts, write_pairs
from gradaudit.store.runfolder import RunFolder

SETS = ("reference_members", "reference_nonmembers", "probes")
REQUIRED_SETS = ("reference_nonmembers", "probes")  # without known members: the collection audit alone
SHUFFLED = "~shuffled"  # id suffix of the association test's negatives


KEYS = ("model", "run", "data", "adapter", "preset", "pattern", "options")
# [options]: the audit's own, then those of the capture (the fields of capture.Options the file may set)
AUDIT_OPTIONS = {"method": "auto", "folds": 5, "split_reference": True, "association_test": False}
CAPTURE_OPTIONS = ("batch_size", "on_error", "dtype", "device", "backend", "mode", "autocast", "allow_outside",
                   "prompt_format", "device_map")


@dataclass
class AuditConfig:
    """An audit file, every key and value checked and every path resolved against the file's folder.
    ``options`` holds the [options] the file gives; :meth:`option` reads one with its default."""

    model: str
    run: str
    data: dict
    adapter: str | None = None
    preset: str = "paper"
    pattern: str | None = None
    options: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> AuditConfig:
        """Reads and checks the file. Anything wrong raises :class:`ConfigError` (an
        :class:`OptionError` for a bad value) naming the file and the key, before any other work."""
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:  # not UTF-8; nested deep
            raise ConfigError(f"cannot read the audit configuration {path}: {type(exc).__name__}: {exc}") from None
        for table in ("data", "options"):
            if not isinstance(raw.get(table, {}), dict):
                raise ConfigError(f"{path}: {table} must be a table ([{table}]); got {raw[table]!r}")
        data, options = raw.get("data", {}), raw.get("options", {})
        missing = [k for k in ("model", "run", "data") if k not in raw] + [f"data.{k}" for k in REQUIRED_SETS if k not in data]
        if missing:
            raise ConfigError(f"{path}: missing {', '.join(missing)}")
        for where, given, known in (("", raw, KEYS), ("[data] ", data, SETS),
                                    ("[options] ", options, (*AUDIT_OPTIONS, *CAPTURE_OPTIONS))):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ConfigError(f"{path}: unknown {where}key(s) {unknown}; the keys are {', '.join(known)}")
        for key, value in [*raw.items(), *((f"data.{k}", v) for k, v in data.items())]:
            if key not in ("data", "options") and (not isinstance(value, str) or not value):
                raise OptionError(key, f"{path}: {key} must be a non-empty string; got {value!r}")
        _check_options(path, raw, options)
        root = os.path.dirname(os.path.abspath(path))

        def resolve(p):
            return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(root, p))

        return cls(model=resolve(raw["model"]), run=resolve(raw["run"]), adapter=resolve(raw.get("adapter")),
                   data={k: resolve(data[k]) for k in SETS if k in data}, preset=raw.get("preset", "paper"),
                   pattern=raw.get("pattern"), options=dict(options))

    def option(self, key: str):
        """The value of [options] ``key``, given or default."""
        defaults = AUDIT_OPTIONS | {f.name: f.default for f in dataclasses.fields(Options)}
        return self.options.get(key, defaults[key])

    def check_manifests(self) -> None:
        """Reads every manifest as the audit will, before a model is loaded or a file written: bad lines
        (under on_error "stop") raise :class:`ManifestError` naming the user's own files and lines, all
        of them at once; a split or an association test its manifest cannot feed raises ConfigError."""
        read, errors = {}, []
        for name in self.data:
            try:
                read[name] = read_manifest(self.data[name], self.option("on_error"),
                                           allow_outside=self.option("allow_outside"))[0]
            except ManifestError as exc:
                errors.append(exc)
        if errors:
            raise errors[0] if len(errors) == 1 else ManifestsError(errors)
        if self.option("split_reference") and "reference_members" in read:
            _halves(read["reference_members"], self.data["reference_members"])
        if "reference_members" not in read:
            _halves(read["probes"], self.data["probes"])  # R from half the collection
        if self.option("association_test"):
            if "reference_members" not in read:
                raise ConfigError("association_test needs known members ([data] reference_members): it scores pairs "
                                  "with the per-pair method, which is fitted on them")
            _correct_probes(read["probes"], self.data["probes"])


def _check_options(path: str, raw: dict, options: dict) -> None:
    """The values of the audit's options and, through :class:`Options`, of the capture's; an error names
    the file and the key as the file spells it."""
    given = AUDIT_OPTIONS | options
    method, folds = given["method"], given["folds"]
    if not isinstance(method, str) or (method != "auto" and method not in VARIANTS):
        raise OptionError("method", f"{path}: [options] method must be 'auto' or one of {sorted(VARIANTS)}; "
                                    f"got {method!r}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise OptionError("folds", f"{path}: [options] folds must be an integer of at least 2 (cross-validation "
                                   f"fits on all folds but one); got {folds!r}")
    for key in ("split_reference", "association_test"):
        if not isinstance(given[key], bool):
            raise OptionError(key, f"{path}: [options] {key} must be true or false; got {given[key]!r}")
    top = {k: raw[k] for k in ("adapter", "preset", "pattern") if k in raw}
    try:
        Options.of(**top, **{k: v for k, v in options.items() if k in CAPTURE_OPTIONS})
    except OptionError as exc:
        where = "" if exc.option in top else "[options] "
        raise OptionError(exc.option, f"{path}: {where}{exc}") from None


@dataclass
class AuditSet:
    """A stored statistics set as the audit reads it: ids, the slice statistics with every baseline's
    score as ``pairs.extra``, labels (None where the manifest had none), texts."""

    ids: list[str]
    pairs: SliceSet
    labels: list
    texts: list[str]


def load_set(run: str | RunFolder, name: str) -> AuditSet:
    """Stored set ``name`` of a run folder, on plain arrays."""
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    stored = folder.stored_set(name)
    pairs = SliceSet(stored.weights, **stored.stats, ref_row_sq=stored.ref_row_sq, ref_col_sq=stored.ref_col_sq,
                     n_ref=stored.n_ref, in_ref=stored.in_ref)
    pairs.extra = all_baselines(stored.tokens, stored.token_offsets, stored.texts, pairs, stored.base_tokens)
    return AuditSet(stored.ids, pairs, stored.labels, stored.texts)


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
    keys = ("model", "model_type", "adapter", "config_sha256", "weights_sha256", "prompt_format")
    return {"model": {k: recorded.get(k) for k in keys},
            "selection": len(recorded["targets"]), "run": run}


def collection(run: str, name: str = "probes", method: str = "auto", folds: int = 5,
               seed: int = 0) -> tuple[CollectionAudit, dict]:
    """Was set ``name`` (the collection S) used to train the model? The collection audit
    (``audit.collection``) against the known non-members (set reference_nonmembers, V). With known
    members (set reference_members, M), the per-pair method (``method``, ``folds``: as the per-pair fit's) is
    cross-validated and chosen on M against one
    half of V, and S is tested against the other half; without them, an aggregator of per-pair features
    fits half of S against half of V. Pairs of S that are also reference pairs are left out of S's test
    (a pair a fit saw must not be tested). Returns the audit and what the report says of its inputs."""
    folder = RunFolder(run)
    s, v = load_set(folder, name), load_set(folder, "reference_nonmembers")
    m = load_set(folder, "reference_members") if folder.has_set("reference_members") else None
    reference_ids = set(v.ids) | (set(m.ids) if m is not None else set())
    keep = np.flatnonzero([pid not in reference_ids for pid in s.ids])
    s_ids, s_pairs = [s.ids[i] for i in keep], s.pairs.subset(keep)
    images = {k: folder.image_stats(k) for k in (name, "reference_nonmembers")}
    with_images = all(a is not None for a in images.values())
    s_blind = blind_features([s.texts[i] for i in keep], images[name][keep] if with_images else None, IMAGE_STATS)
    v_blind = blind_features(v.texts, images["reference_nonmembers"] if with_images else None, IMAGE_STATS)
    if m is not None:
        v_fit = split(v.ids, seed=seed)
        need = min_pairs(folds)
        if len(m.ids) < need or int(v_fit.sum()) < need:
            raise ConfigError(
                f"the collection test fits the per-pair method on the known members ({len(m.ids)} in set "
                f"reference_members) against half of the known non-members ({int(v_fit.sum())} of {len(v.ids)}); "
                f"{folds}-fold cross-validation needs at least {need} of each: give at least {need} known members "
                f"(twice that before the split of gradaudit audit) and {2 * need} known non-members, or fewer folds")
        v_test = np.flatnonzero(~v_fit)
        fitted = per_pair.fit_reference(m.pairs, v.pairs.subset(v_fit), m.ids,
                                        [i for i, f in zip(v.ids, v_fit) if f], method, folds, seed)
        held_out = v.pairs.subset(v_test)
        test = members_test(fitted, s_pairs, s_ids, held_out, [v.ids[i] for i in v_test],
                            (model_features(s_pairs), model_features(held_out)), seed)
    else:
        test = split_test(model_features(s_pairs), model_features(v.pairs), s_ids, v.ids, seed)
    about = {"set": name, "pairs": len(s.ids), "tested_pairs_left_out_as_reference_pairs": len(s.ids) - len(keep),
             "nonmembers": len(v.ids), "known_members": len(m.ids) if m is not None else 0,
             "blind_features": "text and image statistics" if with_images else "text statistics only (the run "
                               "folder holds no image statistics: captured before they were stored)", "seed": seed}
    return audit_collection(test, s_blind, v_blind, s_ids, v.ids, seed), about


def write_pairs_csv(run: str, scored: ScoredSet) -> str:
    """pairs.csv of a scored set: score, probability, verdict, the paper's score and every baseline. An id
    that a spreadsheet would run as a formula is written as text (``store.cells``)."""
    names = sorted(scored.baselines)
    s = scored.scores
    rows = [[spreadsheet_safe(pid), f"{s['gradaudit'][i]:.6g}", f"{scored.probability[i]:.4f}",
             "member" if scored.probability[i] >= 0.5 else "non-member", f"{s['paper'][i]:.6g}",
             *[f"{s[k][i]:.6g}" for k in names], "" if scored.labels[i] is None else scored.labels[i]]
            for i, pid in enumerate(scored.ids)]
    return RunFolder(run).write_pairs_csv(scored.name, ["id", "score", "probability", "verdict", "paper_score",
                                                        *names, "label"], rows)


def write_outputs(run: str, fitted: Fit | None, scored: ScoredSet | None, evaluation: Evaluation | None = None,
                  collection: tuple[CollectionAudit, dict] | None = None, **extra) -> dict:
    """metrics.json and report.html of a set: the collection audit (``collection()``) first, then the
    per-pair audit where there is a fit; ``extra`` joins the metrics (e.g. the association test).
    Returns the metrics."""
    folder = RunFolder(run)
    name = scored.name if scored is not None else collection[1]["set"]
    result = per_pair.result(fitted, scored, evaluation, **context(run)) if fitted is not None else \
        dict(context(run), set=name)
    if collection is not None:
        result["collection"] = dict(collection[0].summary(), **collection[1])
    result.update(extra)
    folder.write_metrics(name, result)
    folder.write_report(name, render(result, fitted, scored, evaluation, collection[0] if collection else None,
                                     lambda figure: folder.figure_path(name, figure)))
    return result


def _halves(pairs: list[Pair], manifest: str) -> tuple[list[Pair], list[Pair]]:
    """Alternate pairs of the reference members: (those that build R, those that fit the method)."""
    if len(pairs) < 4:
        raise ConfigError(f"{manifest}: splitting the reference members needs at least 4 pairs; got {len(pairs)}")
    return pairs[0::2], pairs[1::2]


def _correct_probes(pairs: list[Pair], manifest: str) -> list[Pair]:
    """The association test's correct pairs: the probes labelled members, or all of them when unlabelled."""
    correct = [p for p in pairs if p.label == 1] or [p for p in pairs if p.label is None]
    if len(correct) < 2:
        raise ConfigError(f"{manifest}: association_test needs at least 2 probes labelled 1 (or unlabelled)")
    return correct


@contextlib.contextmanager
def _named_after_sources(sources: dict[str, str]):
    """A bad line found in a manifest the audit derived is reported in the user's manifest it came from
    (``sources``: derived path → user's path); the derived manifests keep the user's line numbers."""
    try:
        yield
    except ManifestError as exc:
        if exc.path not in sources:
            raise
        raise ManifestError(sources[exc.path], exc.problems) from None


def _derived(path: str, pairs: list[Pair], **how) -> str:
    """A manifest the audit derives (``write_pairs``), written by rank 0 alone under torchrun; every rank
    gets its path once it is whole."""
    with distributed.main_first() as w:
        if w.main:
            write_pairs(path, pairs, **how)
    return path


def split_members(manifest: str, run: str, on_error: str, allow_outside: bool = False) -> tuple[str, str]:
    """Alternate lines of the reference members: the first half builds R, the second is scored against
    it exactly as a member probe is (never in R). Scoring reference members leave-one-out instead was
    measured optimistic for the logistic heads (1.00 out-of-fold against 0.72 on probes). Lines left
    out under "skip" are recorded as the set reference_members'. Each half keeps its pairs on their
    lines of ``manifest``, so a problem found later names the user's line."""
    pairs, problems = read_manifest(manifest, on_error, allow_outside=allow_outside)
    builders, fitters = _halves(pairs, manifest)
    folder = RunFolder(run)
    folder.record_skipped("reference_members", problems_as_records(problems))
    return (_derived(folder.manifest_path("r_builders"), builders, at_source_lines=True),
            _derived(folder.manifest_path("fit_members"), fitters, at_source_lines=True))


def reference(model: str, manifest: str, run: str, split: bool = True, **capture) -> RunFolder:
    """The reference step, the same in ``gradaudit audit`` and ``gradaudit reference``: R and the set
    reference_members from the known members' manifest. ``split`` (the default, the protocol of
    DESIGN.md §2.4): alternate lines build R, the others are extracted as reference_members and scored
    against an R they are not in, as a member probe is. Else every member builds R and is extracted as
    reference_members, scored leave-one-out (the protocol measured optimistic). Resumable; holds the
    run folder's writer lock. ``capture``: the fields of ``capture.Options``."""
    joined(Options.of(**capture))  # a bad option stops the step before anything is read or written
    folder = RunFolder(run)
    with folder.writing("reference"):
        builders = members = manifest
        sources = {}  # a manifest derived here -> the user's it comes from
        if split:
            builders, members = split_members(manifest, run, capture.get("on_error", "stop"),
                                              capture.get("allow_outside", False))
            sources = dict.fromkeys((builders, members), manifest)
            capture = dict(capture, allow_outside=True)  # the halves name images already checked, by absolute paths
        with _named_after_sources(sources):
            run_reference(model, builders, run, **capture)
            run_extract(model, members, run, "reference_members", **capture)
    return folder


def collection_reference(model: str, manifest: str, run: str, seed: int = 0, **capture) -> RunFolder:
    """Without known members, R is the mean gradient of the half of the collection that fits the collection
    audit's aggregator (``audit.collection.split``, the same halves): its pairs are scored leave-one-out,
    the tested half is never in R."""
    joined(Options.of(**capture))
    folder = RunFolder(run)
    with folder.writing("reference"):
        pairs, _ = read_manifest(manifest, capture.get("on_error", "stop"), allow_outside=capture.get("allow_outside", False))
        _halves(pairs, manifest)
        fit = split([p.id for p in pairs], seed=seed)
        builders = _derived(folder.manifest_path("collection_builders"), [p for p, f in zip(pairs, fit) if f],
                               at_source_lines=True)
        with _named_after_sources({builders: manifest}):
            run_reference(model, builders, run, **dict(capture, allow_outside=True))
    return folder


def association_manifest(probes: str, run: str, on_error: str, allow_outside: bool = False) -> str:
    """The association test's negatives: the audited pairs labelled members (all of them when unlabelled),
    each image with another of those pairs' texts, each on its line of ``probes``."""
    correct = _correct_probes(read_manifest(probes, on_error, allow_outside=allow_outside)[0], probes)
    return _derived(RunFolder(run).manifest_path("shuffled"), correct, texts=shuffled_texts(correct),
                       id_suffix=SHUFFLED, at_source_lines=True)


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
    Every key, value and manifest line is checked before a model is loaded or a file written; the run
    folder's writer lock is held throughout, so another writer is refused, not interleaved. Under
    torchrun every rank captures its share, and rank 0 alone fits, scores and reports; the other ranks
    return an empty dict."""
    cfg = AuditConfig.load(config_path)
    cfg.check_manifests()
    joined(Options.of(**{k: v for k, v in cfg.options.items() if k in CAPTURE_OPTIONS}))
    with RunFolder(cfg.run).writing("audit"):
        return _audit(cfg, config_path, progress)


def _audit(cfg: AuditConfig, config_path: str, progress: bool) -> dict:
    """The audit's steps, under the writer lock: capture, the collection audit, then (with known members)
    the per-pair audit."""
    capture = dict(adapter=cfg.adapter, preset=cfg.preset, pattern=cfg.pattern, progress=progress,
                   **{k: v for k, v in cfg.options.items() if k in CAPTURE_OPTIONS})
    with_members = "reference_members" in cfg.data
    if with_members:
        reference(cfg.model, cfg.data["reference_members"], cfg.run, cfg.option("split_reference"), **capture)
    else:
        collection_reference(cfg.model, cfg.data["probes"], cfg.run, **capture)
    run_extract(cfg.model, cfg.data["reference_nonmembers"], cfg.run, "reference_nonmembers", **capture)
    run_extract(cfg.model, cfg.data["probes"], cfg.run, "probes", **capture)
    with_association = cfg.option("association_test")
    if with_association:
        shuffled = association_manifest(cfg.data["probes"], cfg.run, cfg.option("on_error"), cfg.option("allow_outside"))
        with _named_after_sources({shuffled: cfg.data["probes"]}):
            run_extract(cfg.model, shuffled, cfg.run, "shuffled", **dict(capture, allow_outside=True))
    if not distributed.leave().main:  # the capture is done: rank 0 alone fits and reports, the others end
        return {}
    audited = collection(cfg.run, "probes", cfg.option("method"), cfg.option("folds"))
    if not with_members:
        return write_outputs(cfg.run, None, None, collection=audited, config=os.path.abspath(config_path))
    fitted = fit(cfg.run, cfg.option("method"), cfg.option("folds"))
    scored = score(cfg.run, "probes", fitted)
    write_pairs_csv(cfg.run, scored)
    evaluation = per_pair.evaluate(scored) if scored.labelled else None
    extra = {"association": association(cfg.run, fitted, scored)} if with_association else {}
    return write_outputs(cfg.run, fitted, scored, evaluation, collection=audited, **extra,
                         config=os.path.abspath(config_path))
