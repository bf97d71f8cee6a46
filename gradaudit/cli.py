"""The ``gradaudit`` command."""

from __future__ import annotations

import argparse
import sys

from gradaudit.data import ManifestError

EXAMPLE = """example (a LLaVA checkpoint saved with save_pretrained, manifests of JSONL pairs):
  gradaudit layers ./llava-tiny --preset paper
  gradaudit reference --model ./llava-tiny --manifest members.jsonl --run runs/audit1
  gradaudit extract --model ./llava-tiny --manifest audited.jsonl --run runs/audit1 --set audited
A manifest line: {"id": "p1", "image": "images/p1.png", "prompt": "Describe the image.", "text": "a red square"}
Interrupted runs continue where they stopped when the same command is run again."""


def _common(p: argparse.ArgumentParser, with_data: bool = True) -> None:
    p.add_argument("--model", required=True, help="local model folder (save_pretrained), nothing is downloaded")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder to load on top of the model")
    p.add_argument("--preset", default="paper", choices=["paper", "lora", "all-linear"],
                   help="weights to capture (paper: last 3 blocks of each tower + projector, or a LoRA model's "
                        "A and B matrices)")
    p.add_argument("--pattern", help="regular expression on weight names, applied after the preset")
    if with_data:
        p.add_argument("--manifest", required=True, help="JSONL file of pairs (DESIGN.md §5)")
        p.add_argument("--run", required=True, help="run folder: results go there; a rerun resumes")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                       help="bad manifest lines: stop before any work (default) or skip them with a record")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
        p.add_argument("--mode", default="eval", choices=["eval", "train"],
                       help="train keeps dropout on (no leave-one-out features later)")
        p.add_argument("--autocast", choices=["bfloat16", "float16"], help="run the forward pass under autocast")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gradaudit", description="Training-data exposure audits from gradients.",
                                 epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("layers", help="list the weights a selection picks", epilog=EXAMPLE, formatter_class=fmt)
    p.add_argument("model", help="local model folder")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder")
    p.add_argument("--preset", default="paper", choices=["paper", "lora", "all-linear"])
    p.add_argument("--pattern")
    p = sub.add_parser("reference", help="sum the members' gradients into R (the reference pass)",
                       epilog=EXAMPLE, formatter_class=fmt)
    _common(p)
    p = sub.add_parser("extract", help="per-sample slice statistics of a set of pairs against R",
                       epilog=EXAMPLE, formatter_class=fmt)
    _common(p)
    p.add_argument("--set", required=True, dest="name", help="name of the statistics set, e.g. audited")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "torch"])
    from gradaudit import audit as audit_module

    p = sub.add_parser("audit", help="run a whole audit from a TOML file (resumable)",
                       epilog=audit_module.__doc__, formatter_class=fmt)
    p.add_argument("config", help="TOML file: model, run folder, manifests, options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    steps = ("the steps after capture, one at a time, from a run folder whose sets reference_members, "
             "reference_nonmembers and the audited set were extracted:\n"
             "  gradaudit fit --run runs/a1\n  gradaudit score --run runs/a1 --set probes\n"
             "  gradaudit evaluate --run runs/a1 --set probes\n  gradaudit report --run runs/a1 --set probes")
    for command, text in (("fit", "cross-validate every variant on the reference sets and choose one"),
                          ("score", "score a set: scores, probabilities, exposure, collection test (pairs.csv)"),
                          ("evaluate", "score a labelled set and measure every score on its labels (metrics.json)"),
                          ("report", "score (and evaluate, if labelled) a set and write report.html")):
        p = sub.add_parser(command, help=text, epilog=steps, formatter_class=fmt)
        p.add_argument("--run", required=True, help="run folder")
        p.add_argument("--method", default="auto", help="auto (default) or a variant: paper, loo, signed, "
                       "head-cosine, head-lognorm, head-both, combined")
        p.add_argument("--folds", type=int, default=5)
        if command != "fit":
            p.add_argument("--set", dest="name", default="probes", help="the extracted set to score")
    args = ap.parse_args(argv)

    from gradaudit import pipeline

    try:
        if args.command == "layers":
            print(pipeline.selection_table(args.model, args.preset, args.pattern, args.adapter))
            return 0
        if args.command in ("fit", "score", "evaluate", "report"):
            return _analysis_step(args, audit_module)
        if args.command == "audit":
            from gradaudit.report import verdict

            result = audit_module.run_audit(args.config, progress=not args.no_progress)
            print(verdict(result))
            print(f"report: {result['run']}/report.html  pairs: {result['run']}/pairs.csv  "
                  f"metrics: {result['run']}/metrics.json")
            return 0
        kw = dict(adapter=args.adapter, preset=args.preset, pattern=args.pattern, batch_size=args.batch_size, on_error=args.on_error,
                  dtype=args.dtype, device=args.device, mode=args.mode, autocast=args.autocast,
                  progress=not args.no_progress)
        if args.command == "reference":
            folder = pipeline.run_reference(args.model, args.manifest, args.run, **kw)
            print(f"reference written to {folder.reference_path}")
        else:
            folder = pipeline.run_extract(args.model, args.manifest, args.run, args.name, backend=args.backend, **kw)
            print(f"statistics of set '{args.name}' in {folder.path}/stats/{args.name}")
    except (ManifestError, ValueError) as exc:
        print(f"gradaudit {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _analysis_step(args, audit_module) -> int:
    from gradaudit.report import verdict

    state = audit_module.fit(args.run, args.method, args.folds)
    if args.command == "fit":
        for name, e in sorted(state["summary"]["cross_validated"].items(), key=lambda kv: -kv[1]["auroc"]):
            print(f"{name:14s} cross-validated AUROC {e['auroc']:.3f}")
        print(f"chosen: {state['summary']['method']} (written to {args.run}/fit.json)")
        return 0
    scored = audit_module.score(args.run, args.name, state=state)
    labels = scored["data"]["labels"]
    labelled = all(label is not None for label in labels) and len(set(labels)) == 2
    if args.command == "evaluate" or (args.command == "report" and labelled):
        audit_module.evaluate(scored)
    if args.command == "score":
        print(f"scores of set '{args.name}': {args.run}/pairs.csv")
    else:
        path = audit_module.write_outputs(scored)
        print(verdict(scored["result"]))
        print(f"metrics: {args.run}/metrics.json  report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
