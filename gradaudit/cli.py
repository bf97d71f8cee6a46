"""The ``gradaudit`` command: the only place that turns the library's typed errors into advice about
commands."""

from __future__ import annotations

import argparse
import glob
import os
import sys

from gradaudit import distributed
from gradaudit.errors import (ConfigError, CorruptFile, FormatMissing, GradAuditError, IdCollision, LabelsMissing,
                              ManifestChanged, ManifestError, ManifestsError, ModelError, NonFiniteStats, OptionError,
                              RunBusy, RunMismatch, StageMissing)
from gradaudit.models.selection import PRESETS
from gradaudit.ops.backends import NAMES as BACKENDS
from gradaudit.store.manifest import OUTSIDE

EXAMPLE = """example (a LLaVA checkpoint saved with save_pretrained, manifests of JSONL pairs), the same steps
and the same answer as `gradaudit audit` (add --prompt-format to the capture commands where the model needs it):
  gradaudit layers ./llava-tiny --preset paper
  gradaudit reference --model ./llava-tiny --manifest members.jsonl --run runs/audit1
  gradaudit extract --model ./llava-tiny --manifest nonmembers.jsonl --run runs/audit1 --set reference_nonmembers
  gradaudit extract --model ./llava-tiny --manifest probes.jsonl --run runs/audit1 --set probes
  gradaudit report --run runs/audit1 --set probes
A manifest line: {"id": "p1", "image": "images/p1.png", "prompt": "Describe the image.", "text": "a red square"}
Interrupted runs continue where they stopped when the same command is run again."""


def _common(p: argparse.ArgumentParser, with_data: bool = True) -> None:
    p.add_argument("--model", required=True, help="local model folder (save_pretrained), nothing is downloaded")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder to load on top of the model")
    p.add_argument("--preset", default="paper", choices=PRESETS,
                   help="weights to capture (paper: last 3 blocks of each tower + projector, or a LoRA model's "
                        "A and B matrices)")
    p.add_argument("--pattern", help="regular expression on weight names, applied after the preset")
    if with_data:
        p.add_argument("--manifest", required=True, help="JSONL file of pairs (docs/data-and-runs.md)")
        p.add_argument("--run", required=True, help="run folder: results go there; a rerun resumes")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                       help="bad manifest lines: stop before any work (default) or skip them with a record "
                            "in RUN/skipped/<set>.jsonl")
        p.add_argument("--allow-images-outside", action="store_true",
                       help="read images outside the manifest's folder (absolute paths elsewhere, ../); refused "
                            "by default, since a manifest may come from someone else")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (under torchrun, cuda: each rank's GPU)")
        p.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                       help="a model larger than one GPU: placed across this machine's GPUs by accelerate, in one "
                            "process (a table of module names to devices: device_map in an audit file)")
        p.add_argument("--mode", default="eval", choices=["eval", "train"],
                       help="train keeps dropout on (no leave-one-out features later)")
        p.add_argument("--autocast", choices=["bfloat16", "float16"], help="run the forward pass under autocast")
        p.add_argument("--prompt-format", help="how a pair becomes the model's text, as it was trained: "
                       "'chat-template' (the folder's), 'plain' (image, prompt, text) or a template such as "
                       "'{image}Describe the card: {text}' (docs/data-and-runs.md); required unless the "
                       "model's processor fixes it")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _folds(text: str) -> int:
    """--folds: an integer of at least 2 (cross-validation fits on all folds but one and scores that one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"cross-validation needs at least 2 folds; got {value}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gradaudit", description="Training-data exposure audits from gradients.",
                                 epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("layers", help="list the weights a selection picks", epilog=EXAMPLE, formatter_class=fmt)
    p.add_argument("model", help="local model folder")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder")
    p.add_argument("--preset", default="paper", choices=PRESETS)
    p.add_argument("--pattern")
    p = sub.add_parser("reference", help="the known members: half build R, the other half become the set "
                       "reference_members (as in gradaudit audit)", epilog=EXAMPLE, formatter_class=fmt)
    _common(p)
    p.add_argument("--no-split", action="store_true",
                   help="every member builds R and is extracted as reference_members, scored leave-one-out (the "
                        "protocol measured optimistic; split_reference = false in an audit file)")
    p = sub.add_parser("extract", help="per-sample slice statistics of a set of pairs against R",
                       epilog=EXAMPLE, formatter_class=fmt)
    _common(p)
    p.add_argument("--set", required=True, dest="name",
                   help="name of the statistics set: reference_nonmembers for the known non-members, probes (or a "
                        "name of your own) for a collection to audit")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p = sub.add_parser("formats", help="rank prompt formats by how well known members fit them (the training "
                       "format fits best)", formatter_class=fmt)
    p.add_argument("--model", required=True, help="local model folder (save_pretrained)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder to load on top of the model")
    p.add_argument("--manifest", required=True, help="JSONL file of known training pairs (members)")
    p.add_argument("--prompt-format", action="append", dest="formats", default=[],
                   help="a candidate format (repeatable); the folder's chat template and 'plain' are always tried")
    p.add_argument("--limit", type=int, default=32, help="members to use (the first ones; default 32)")
    p.add_argument("--device", default="cpu")
    from gradaudit import workflow

    p = sub.add_parser("audit", help="run a whole audit from a TOML file (resumable)",
                       epilog=workflow.__doc__, formatter_class=fmt)
    p.add_argument("config", help="TOML file: model, run folder, manifests, options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    steps = ("the steps after capture, one at a time, from a run folder with the sets reference_members (written by "
             "gradaudit reference), reference_nonmembers and the audited set:\n"
             "  gradaudit fit --run runs/a1\n  gradaudit score --run runs/a1 --set probes\n"
             "  gradaudit evaluate --run runs/a1 --set probes\n  gradaudit report --run runs/a1 --set probes")
    for command, text in (("fit", "cross-validate every variant on the reference sets and choose one (stored)"),
                          ("score", "score a set: scores, probabilities, exposure, collection test (pairs.csv)"),
                          ("evaluate", "score a labelled set and measure every score on its labels (pairs.csv, metrics.json)"),
                          ("report", "audit a set as a collection against the known non-members, score (and "
                                     "evaluate, if labelled) it per pair, and write report.html, metrics.json and "
                                     "pairs.csv")):
        p = sub.add_parser(command, help=text, epilog=steps, formatter_class=fmt)
        p.add_argument("--run", required=True, help="run folder")
        p.add_argument("--method", default="auto", help="auto (default) or a variant: paper, loo, signed, "
                       "head-cosine, head-lognorm, head-both, combined; the stored fit is reused when it matches")
        p.add_argument("--folds", type=_folds, default=5, help="cross-validation folds, at least 2 (default 5)")
        if command != "fit":
            p.add_argument("--set", dest="name", default="probes", help="the extracted set to score")
    args = ap.parse_args(argv)

    from gradaudit import capture

    try:
        if args.command == "layers":
            capture.Options.of(adapter=args.adapter, preset=args.preset, pattern=args.pattern)  # before loading
            print(capture.selection_table(args.model, args.preset, args.pattern, args.adapter))
            return 0
        if args.command == "formats":
            from gradaudit.capture.format_check import format_table

            fits = capture.check_formats(args.model, args.manifest, args.formats, adapter=args.adapter,
                                         limit=args.limit, device=args.device)
            print(f"mean text loss of the first {args.limit} pairs of {args.manifest} in each format "
                  f"(lower fits better; the format the model was trained in fits its members best):")
            print(format_table(fits))
            return 0
        if args.command in ("fit", "score", "evaluate", "report"):
            return _analysis_step(args, workflow)
        if args.command == "audit":
            from gradaudit.audit.claims import verdict
            from gradaudit.store import RunFolder

            before = _skip_records(workflow.AuditConfig.load(args.config).run)
            result = workflow.run_audit(args.config, progress=not args.no_progress)
            if not result:  # under torchrun, a rank other than 0: rank 0 fits, reports and says the verdict
                return 0
            folder = RunFolder(result["run"])
            _report_skipped(result["run"], before)
            print(verdict(result))
            pairs = f"  pairs: {folder.pairs_csv_path('probes')}" if "cross_validated" in result else ""
            print(f"report: {folder.report_path('probes')}{pairs}  metrics: {folder.metrics_path('probes')}")
            return 0
        kw = dict(adapter=args.adapter, preset=args.preset, pattern=args.pattern, batch_size=args.batch_size,
                  on_error=args.on_error, dtype=args.dtype, device=args.device, mode=args.mode,
                  autocast=args.autocast, prompt_format=args.prompt_format, progress=not args.no_progress,
                  device_map=args.device_map,
                  allow_outside=args.allow_images_outside)
        before = _skip_records(args.run)
        if args.command == "reference":
            folder = workflow.reference(args.model, args.manifest, args.run, split=not args.no_split, **kw)
            if not distributed.world().main:
                return 0
            print(f"reference written to {folder.reference_path}; statistics of set 'reference_members' in "
                  f"{folder.path}/stats/reference_members")
        else:
            folder = capture.run_extract(args.model, args.manifest, args.run, args.name, backend=args.backend, **kw)
            if not distributed.world().main:
                return 0
            print(f"statistics of set '{args.name}' in {folder.path}/stats/{args.name}")
        _report_skipped(args.run, before)
    except (GradAuditError, ValueError) as exc:  # ValueError: a bad argument caught deep in the library
        print(f"gradaudit {args.command}: {exc}{_advice(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumes = (" Run the same command again to resume: what was computed is kept."
                   if args.command in ("reference", "extract", "audit") else "")
        print(f"gradaudit {args.command}: interrupted.{resumes}", file=sys.stderr)
        return 130
    return 0


def _skip_records(run: str) -> dict[str, tuple[int, int]]:
    """The records of skipped manifest lines in a run folder (RUN/skipped/<set>.jsonl), each with its inode
    and time: the run folder writes a record anew (a new file) every time, so a change tells a record
    this command wrote from one an earlier command left."""
    stamps = {}
    for path in glob.glob(os.path.join(glob.escape(run), "skipped", "*.jsonl")):
        st = os.stat(path)
        stamps[path] = (st.st_ino, st.st_mtime_ns)
    return stamps


def _report_skipped(run: str, before: dict) -> None:
    """Says how many manifest lines this command left out, per set, and where they are recorded."""
    for path, stamp in sorted(_skip_records(run).items()):
        if before.get(path) != stamp:
            with open(path, encoding="utf-8") as f:
                n = sum(1 for line in f if line.strip())
            name = os.path.basename(path)[: -len(".jsonl")]
            print(f"skipped {n} bad manifest line(s) of set '{name}'; they are listed in {path}", file=sys.stderr)


def _capture_command(run: str, set_name: str) -> str:
    """The command that captures a set (``gradaudit reference`` captures reference_members)."""
    if set_name == "reference_members":
        return f"`gradaudit reference --model MODEL --manifest MEMBERS --run {run}`"
    return f"`gradaudit extract --model MODEL --manifest PAIRS --run {run} --set {set_name}`"


def _advice(exc: Exception, args) -> str:
    """What to do about a library error, in terms of this command line."""
    run = getattr(args, "run", None) or "RUN"
    audit = args.command == "audit"
    if isinstance(exc, RunBusy):
        return ("\nWait until that command has finished (or stop it), then run this one again. A writer that was "
                "killed holds no lock.")
    if isinstance(exc, (CorruptFile, NonFiniteStats)):
        again = f"`gradaudit audit {args.config}`" if audit else {
            "fingerprint": f"`gradaudit reference --model MODEL --manifest MEMBERS --run {run}`",
            "reference": f"`gradaudit reference --model MODEL --manifest MEMBERS --run {run}`",
            "extract": _capture_command(run, exc.set_name),
            "fit": f"`gradaudit fit --run {run}`",
            "results": f"`gradaudit report --run {run} --set {exc.set_name}`"}[exc.stage]
        cause = ("\nThe capture computed them: a float16 or bfloat16 overflow? (--dtype float32, no --autocast.)"
                 if isinstance(exc, NonFiniteStats) else "")
        what = {"fingerprint": " (it records the model anew: give the model this folder was made with)",
                "reference": " (R is computed anew; if it comes out different, sets extracted against the old R "
                             "are refused)",
                "extract": " (a chunk: only its batch is computed anew)"}.get(exc.stage, "")
        return f"{cause}\nDelete {exc.path} and run {again} again{what}."
    if isinstance(exc, ManifestError):
        text = "\nFix those lines, or leave them out with a record: " + (
            'on_error = "skip" in [options].' if audit else "--on-error skip.")
        problems = [p for e in (exc.errors if isinstance(exc, ManifestsError) else [exc]) for p in e.problems]
        if any(OUTSIDE in p.reason for p in problems):
            text += "\nIf you trust the manifest's images elsewhere, allow them: " + (
                "allow_outside = true in [options]." if audit else "--allow-images-outside.")
        return text
    if isinstance(exc, OptionError) and exc.option == "device":
        use = 'device = "cpu" in [options]' if audit else "--device cpu"
        return f"\nUse {use}, or a machine whose torch sees the GPU."
    if isinstance(exc, FormatMissing):
        state = "prompt_format = … in [options]" if audit else "--prompt-format …"
        return (f"\nState how the model was trained to see a pair: {state}. `gradaudit formats --model MODEL "
                "--manifest MEMBERS` ranks the candidates by how well your known members fit them.")
    if isinstance(exc, StageMissing):
        return {"reference": f"\nRun `gradaudit reference --model MODEL --manifest MEMBERS --run {run}` first "
                             "(or `gradaudit audit CONFIG`).",
                "extract": f"\nRun {_capture_command(run, exc.set_name)} first.",
                "fit": f"\nRun `gradaudit fit --run {run}` first."}[exc.stage]
    if isinstance(exc, ManifestChanged):
        if exc.set_name == "reference_members":
            return ("\n`gradaudit reference` extracts the set reference_members itself, from the members' manifest "
                    "(half of it, or all with --no-split): use a new run folder for other reference members.")
        if exc.set_name is None:
            return "\nUse a new run folder for another set of reference members, or the manifest R was built from."
        return (f"\nUse a new set name for other pairs (--set NEW), or the manifest set {exc.set_name!r} was "
                "extracted from.")
    if isinstance(exc, IdCollision):
        return ("\nAn id must name one pair across a run folder: give those pairs ids of their own in one of the "
                "two manifests, and extract that set again under a new set name.")
    if isinstance(exc, RunMismatch):
        return "\nUse a new run folder (or a new set name), or the model, selection and manifests it was made with."
    if isinstance(exc, LabelsMissing):
        return "\nGive every pair of that set a label (1 member, 0 non-member) in its manifest, or use `gradaudit score`."
    if isinstance(exc, ModelError):
        return "\n`gradaudit layers MODEL --preset … --pattern …` shows what a selection picks."
    if isinstance(exc, ConfigError) and audit:
        return "\nSee `gradaudit audit --help` for the configuration's keys."
    return ""


def _analysis_step(args, workflow) -> int:
    from gradaudit.audit import per_pair
    from gradaudit.audit.claims import verdict
    from gradaudit.store import RunFolder

    folder = RunFolder(args.run)
    collection = None
    if args.command in ("evaluate", "report") and args.name not in ("reference_members", "reference_nonmembers"):
        collection = workflow.collection(args.run, args.name, args.method, args.folds)  # the set as a collection, against the known non-members
        if not folder.has_set("reference_members"):  # no known members: the collection audit alone
            result = workflow.write_outputs(args.run, None, None, collection=collection)
            print(verdict(result))
            print(f"metrics: {folder.metrics_path(args.name)}  report: {folder.report_path(args.name)}")
            return 0
    fitted = workflow.fit(args.run, args.method, args.folds)
    if args.command == "fit":
        for name, e in sorted(fitted.estimates.items(), key=lambda kv: -kv[1].auroc):
            print(f"{name:14s} cross-validated AUROC {e.auroc:.3f}")
        print(f"chosen: {fitted.method} (the fit is stored in {args.run}/fit)")
        return 0
    scored = workflow.score(args.run, args.name, fitted)
    pairs = workflow.write_pairs_csv(args.run, scored)  # every step that scores leaves the scores it read from
    if args.command == "score":
        print(f"scores of set '{args.name}': {pairs}")
        return 0
    evaluation = per_pair.evaluate(scored) if args.command == "evaluate" or scored.labelled else None
    result = workflow.write_outputs(args.run, fitted, scored, evaluation, collection=collection)
    print(verdict(result))
    print(f"metrics: {folder.metrics_path(args.name)}  report: {folder.report_path(args.name)}  pairs: {pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
