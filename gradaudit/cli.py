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
    args = ap.parse_args(argv)

    from gradaudit import pipeline

    try:
        if args.command == "layers":
            print(pipeline.selection_table(args.model, args.preset, args.pattern, args.adapter))
            return 0
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


if __name__ == "__main__":
    sys.exit(main())
