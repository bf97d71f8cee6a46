"""The embedded default, end to end with nothing downloaded (``make demo``): generate the corpora, train
a tiny vision-language model here in the finetune scenario, and audit it with the public
``gradaudit audit`` command.

The model: a LLaVA-wired model pretrained from scratch on generated scenes, then LoRA-fine-tuned on
1200 generated radiograph–report pairs, the members (``gradaudit.toy.scenarios``). The audit: 200 known
members and 200 known non-members as the reference, 1000 + 1000 labelled probes, all non-members drawn
from the members' own generator (the i.i.d. protocol: nothing but membership separates them), and the
association test (member probes against their images with other probes' reports).

    python -m gradaudit.toy.demo [--root demo] [--probes 1000]

Data and models are cached under the root folder; every run audits afresh (``ROOT/run``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from gradaudit.audit.claims import signal_established, verdict
from gradaudit.store import RunFolder
from gradaudit.toy.scenarios import Corpus, audit_sets, train_model

CORPUS, TRAINING, SIZE = "radiographs", "finetune", "tiny"


def _table(scores: dict, with_tpr: bool = True) -> list[str]:
    lines = [f"  {'score':24s} {'AUROC [95% CI]':24s}" + (" TPR at 1% FPR [95% CI]" if with_tpr else "")]
    for name, v in sorted(scores.items(), key=lambda kv: (kv[0] not in ("gradaudit", "paper"), -kv[1]["auroc"])):
        tpr = v["tpr_at_0.01_fpr"]
        tpr = ("n/a (needs 1000 non-members)" if tpr is None else
               f"{tpr:.3f} [{v['tpr_at_0.01_fpr_ci'][0]:.3f}, {v['tpr_at_0.01_fpr_ci'][1]:.3f}]")
        lines.append(f"  {name:24s} {v['auroc']:.3f} [{v['auroc_ci'][0]:.3f}, {v['auroc_ci'][1]:.3f}]"
                     + (f"   {tpr}" if with_tpr else ""))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="demo", help="cache of data and models, and the audit's run folder")
    ap.add_argument("--probes", type=int, default=1000, help="member and non-member probes each (≤ 1000)")
    ap.add_argument("--reference", type=int, default=200, help="known members and non-members each")
    ap.add_argument("--members", type=int, default=Corpus.members,
                    help="members (and non-members) the corpus holds; fewer make a faster, weaker check (tests)")
    args = ap.parse_args(argv)
    counts = Corpus(members=args.members, nonmembers=args.members, held_out=min(Corpus.held_out, args.members // 4))
    root = os.path.abspath(args.root)
    times = {}

    t = time.time()
    model = train_model(root, TRAINING, CORPUS, SIZE, counts, log=lambda m: print(m, flush=True))
    sets = audit_sets(root, CORPUS, SIZE, args.reference, args.probes, counts=counts, pool=args.reference)
    times["data and training (cached)"] = time.time() - t
    print(f"model: {model['model']} + LoRA adapter {model['adapter']}; held-out report loss "
          f"{model['held_out_loss_before']:.3f} before the fine-tune, {model['held_out_loss']:.3f} after "
          f"(members' training loss {model['history'][-1]['train_loss']:.3f})", flush=True)

    run = os.path.join(root, "run")
    shutil.rmtree(run, ignore_errors=True)
    config = os.path.join(root, "audit.toml")
    with open(config, "w") as f:
        f.write(f'model = "{model["model"]}"\nadapter = "{model["adapter"]}"\nrun = "{run}"\npreset = "paper"\n'
                "[data]\n" + "".join(f'{k} = "{sets[k]}"\n' for k in ("reference_members", "reference_nonmembers", "probes"))
                # the audit's manifests name images in the corpus folder beside them
                + "[options]\nbatch_size = 16\nassociation_test = true\nallow_outside = true\nprompt_format = \"chat-template\"\n")
    command = [sys.executable, "-m", "gradaudit", "audit", config]
    print(f"\n$ gradaudit audit {config}", flush=True)
    t = time.time()
    subprocess.run(command, check=True)
    times["audit"] = time.time() - t

    folder = RunFolder(run)
    result = folder.read_metrics("probes")
    ev = result["evaluation"]
    print(f"\nOn {args.probes} member and {args.probes} non-member probes (i.i.d. protocol), chosen method "
          f"'{result['method']}' (cross-validated on the reference pairs only):")
    print("\n".join(_table({k: v for k, v in ev.items() if isinstance(v, dict) and "auroc" in v})))
    d = ev["gradaudit_minus_best_baseline"]
    print(f"  GradAudit − best baseline ({d['baseline']}): {d['difference']:+.3f} "
          f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (paired bootstrap)")
    a = result["association"]
    print(f"\nAssociation: {a['pairs']} member probes against their images with other probes' reports:")
    print("\n".join(_table(a["scores"], with_tpr=False)))
    print("  (ties a text to its image; says nothing about membership: both sides are training images and texts)")
    e = result["exposure"]
    print(f"\nEstimated exposure of the probe set: {100 * e['estimate']:.0f}% "
          f"(95% CI {100 * e['ci'][0]:.0f}–{100 * e['ci'][1]:.0f}%); true {100 * result['true_member_share']:.0f}%"
          + ("" if signal_established(result) else " — not claimed: the method did not beat chance on the reference"))
    print("\n" + verdict(result))
    print(f"report: {folder.report_path('probes')}")
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
