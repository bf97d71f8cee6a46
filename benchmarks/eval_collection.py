"""The evaluation of issue 13: the collection audit (gradaudit.audit.collection) on the embedded models.

Per scenario (pretrain / finetune × scenes / radiographs), one capture against R from half of 200 known
members (the other half is the set reference_members, M), then every collection is drawn from stored
features, so thousands of audits cost no further capture:
- pools: members 200–1199 (every one trained on) and non-members 100–1199 (never trained on;
  non-members 0–99 fit the paper's score only, so it is fitted on no pair it tests);
- validity: null collections — S and V both drawn, disjoint, from the non-member pool (V of 500, S of
  200) — audited with known members and without (the collection's own halves); the rate of p < 0.05,
  with its binomial 95% interval, and the blind guard's;
- power: collections of n pairs with 100%, 50% and 10% members against V of 500, the rate of p < 0.01 for
  GradAudit's aggregator (with known members, the default audit) and for single scores each by a
  one-sided Mann–Whitney test of all of S against all of V (loss, Min-K%++, the paper's score); the
  smallest n detected in at least 80% of draws;
- the shifted protocol (non-members in another voice): S = members (and S = plain non-members) against V
  of shifted non-members; the blind guard must fire on every draw.

    python benchmarks/eval_collection.py --out benchmarks/results                # tiny, CPU
    python benchmarks/eval_collection.py --scenarios finetune-radiographs --null-draws 50   # a quick look
    python benchmarks/eval_collection.py --size small --device cuda --out benchmarks/results   # small, GPU

On the GPU the four scenarios can run as four processes (benchmarks/gpu_jobs.sh, one scenario each, to
stay inside one 10-minute call); `--merge` then joins their JSON files into one table:

    python benchmarks/eval_collection.py --merge job*/eval_collection_small.json --out benchmarks/results

Writes eval_collection_<size>.json (everything) and eval_collection_<size>.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from scipy.stats import binomtest, mannwhitneyu

from gradaudit import workflow
from gradaudit.audit.collection import GUARD_ALPHA, Features, blind_features, members_test, model_features, split_test
from gradaudit.audit.method import GradAudit
from gradaudit.audit.per_pair import fit_reference
from gradaudit.capture import run_extract
from gradaudit.store import RunFolder, read_manifest, write_pairs
from gradaudit.store.manifest import IMAGE_STATS
from gradaudit.toy.corpora import KINDS
from gradaudit.toy.models import FORMAT
from gradaudit.toy.scenarios import TRAININGS, Corpus, prepare_corpus, train_model
from write_results import save

SCENARIOS = [f"{t}-{c}" for t in TRAININGS for c in KINDS]
SHARES = (1.0, 0.5, 0.1)
SIZES_N = (50, 100, 200, 400)
KNOWN_MEMBERS, PAPER_NONMEMBERS, V_FIT = 200, 100, 250  # V of 500: 250 fit (fixed), 250 tested (drawn)
V_SIZE, NULL_SIZE = 500, 200
SINGLE = ("loss", "min_k_plus_plus", "paper", "loss_vs_base")


def capture(root: str, model: dict, corpus: str, size: str, device: str, batch_size: int) -> str:
    """One run folder: R from half of the first 200 members (the other half: set reference_members),
    non-members 0–99 (set paper_nonmembers), 100–349 (set v_fit: the half of V the known-members test
    fits on), and the pools."""
    data = prepare_corpus(root, corpus, size, Corpus())
    members, nonmembers = (read_manifest(data[k])[0] for k in ("members", "nonmembers"))
    run = os.path.join(root, "eval-collection", os.path.basename(model["adapter"] or model["model"]))
    manifests = os.path.join(root, "eval-collection", "manifests-" + os.path.basename(run))
    sets = {"known_members": members[:KNOWN_MEMBERS], "paper_nonmembers": nonmembers[:PAPER_NONMEMBERS],
            "v_fit": nonmembers[PAPER_NONMEMBERS:PAPER_NONMEMBERS + V_FIT], "member_pool": members[KNOWN_MEMBERS:],
            "nonmember_pool": nonmembers[PAPER_NONMEMBERS + V_FIT:]}
    paths = {k: write_pairs(os.path.join(manifests, f"{k}.jsonl"), v) for k, v in sets.items()}
    opts = dict(adapter=model["adapter"], preset="paper", batch_size=batch_size, device=device, progress=False,
                allow_outside=True, prompt_format=FORMAT.spec)
    workflow.reference(model["model"], paths["known_members"], run, split=True, **opts)
    for name in ("paper_nonmembers", "v_fit", "member_pool", "nonmember_pool"):
        run_extract(model["model"], paths[name], run, name, **opts)
    return run


def stored(run: str, name: str) -> dict:
    """A set's ids, slice statistics, model features, blind features and single scores."""
    audited = workflow.load_set(run, name)
    return {"ids": audited.ids, "pairs": audited.pairs, "model": model_features(audited.pairs),
            "blind": blind_features(audited.texts, RunFolder(run).image_stats(name), IMAGE_STATS),
            **{k: audited.pairs.extra[k] for k in SINGLE if k in audited.pairs.extra}}


def draw(rng, pools: dict, n: int, share: float, v_size: int):
    """Indices of a collection of n pairs (round(share·n) members) and of V, disjoint from it."""
    k = int(round(share * n))
    order = rng.permutation(len(pools["nonmember_pool"]["ids"]))
    v, rest = order[:v_size], order[v_size:]
    return rng.choice(len(pools["member_pool"]["ids"]), k, replace=False), rest[:n - k], v


def _pick(pools: dict, m_idx, n_idx, key: str):
    parts = [(pools["member_pool"], m_idx), (pools["nonmember_pool"], n_idx)]
    if key in ("model", "blind"):
        return Features(parts[0][0][key].names, np.concatenate([p[key].values[i] for p, i in parts]))
    if key == "ids":
        return [p["ids"][j] for p, i in parts for j in i]
    return np.concatenate([p[key][i] for p, i in parts])


def rate(hits: int, n: int) -> dict:
    ci = binomtest(hits, n).proportion_ci(0.95, method="exact")
    return {"rate": hits / n, "hits": hits, "draws": n, "ci": [ci.low, ci.high]}


def evaluate(run: str, root: str, corpus: str, size: str, args) -> dict:
    pools = {k: stored(run, k) for k in ("member_pool", "nonmember_pool")}
    known, v_fit = stored(run, "reference_members"), stored(run, "v_fit")
    singles = [k for k in SINGLE if k == "paper" or k in pools["member_pool"]]
    paper = GradAudit().fit(known["pairs"], workflow.load_set(run, "paper_nonmembers").pairs)
    # the known-members test's fit, made once (V's fitting half is fixed; S and V's tested half are drawn):
    # every pool pair is scored once, as members_test scores it (the mean of the fold models)
    fit = fit_reference(known["pairs"], v_fit["pairs"], known["ids"], v_fit["ids"], seed=args.seed)
    v_fit["paper"] = paper.score_samples(v_fit["pairs"])
    for pool in pools.values():
        pool["paper"] = paper.score_samples(pool["pairs"])
        pool["gradaudit"] = fit.chosen.score_probes(pool["pairs"], np.full(len(pool["ids"]), -1))
    rng = np.random.default_rng(args.seed)
    out = {"fit": {"method": fit.method, "cross_validated_auroc": fit.chosen.auroc}, "validity": {}, "power": {},
           "shifted": {}}
    t0 = time.time()
    for design in ("known members", "split collection"):
        ps, guards = [], []
        for r in range(args.null_draws):
            m_idx, n_idx, v_idx = draw(rng, pools, NULL_SIZE, 0.0, V_SIZE - V_FIT if design == "known members" else V_SIZE)
            s_ids, v_ids = _pick(pools, m_idx, n_idx, "ids"), _pick(pools, [], v_idx, "ids")
            if design == "known members":
                p = float(mannwhitneyu(_pick(pools, m_idx, n_idx, "gradaudit"), _pick(pools, [], v_idx, "gradaudit"),
                                       alternative="greater").pvalue)
                if r == 0:  # the same p-value as the shipped test's on this draw
                    pool = pools["nonmember_pool"]["pairs"]  # a null collection: non-members only
                    shipped = members_test(fit, pool.subset(n_idx), s_ids, pool.subset(v_idx), v_ids)
                    assert abs(shipped.p_value - p) < 1e-12, (shipped.p_value, p)
            else:
                p = split_test(_pick(pools, m_idx, n_idx, "model"), _pick(pools, [], v_idx, "model"), s_ids, v_ids,
                               seed=r, with_share=False).p_value
            guard = split_test(_pick(pools, m_idx, n_idx, "blind"), _pick(pools, [], v_idx, "blind"), s_ids, v_ids,
                               seed=r, with_share=False).p_value
            ps.append(p)
            guards.append(guard)
        ps, guards = np.array(ps), np.array(guards)
        out["validity"][design] = {
            "p_below_0.05": rate(int((ps < 0.05).sum()), len(ps)), "p_below_0.01": rate(int((ps < 0.01).sum()), len(ps)),
            "guard_fired": rate(int((guards < GUARD_ALPHA).sum()), len(guards)), "p_values": ps.tolist()}
        print(f"  validity ({design}): {(ps < 0.05).mean():.3f} of {len(ps)} below 0.05, guard "
              f"{(guards < GUARD_ALPHA).mean():.3f} ({time.time() - t0:.0f} s)", flush=True)
    for share in SHARES:
        for n in SIZES_N:
            hits = dict.fromkeys(("gradaudit", *singles), 0)
            guard_fired = 0
            for r in range(args.power_draws):
                # V: its fixed fitting half and a drawn tested half (the known-members test sees that half only)
                m_idx, n_idx, tested = draw(rng, pools, n, share, V_SIZE - V_FIT)
                hits["gradaudit"] += mannwhitneyu(_pick(pools, m_idx, n_idx, "gradaudit"),
                                                  _pick(pools, [], tested, "gradaudit"), alternative="greater").pvalue < 0.01
                for k in singles:  # a single score needs no fit: all of S against all of V (500)
                    v_all = np.concatenate([_pick(pools, [], tested, k), v_fit[k]])
                    hits[k] += mannwhitneyu(_pick(pools, m_idx, n_idx, k), v_all, alternative="greater").pvalue < 0.01
                if share == 1.0:  # the blind guard on i.i.d. members: it should fire as often as on nulls
                    guard_fired += split_test(_pick(pools, m_idx, n_idx, "blind"), _pick(pools, [], tested, "blind"),
                                              _pick(pools, m_idx, n_idx, "ids"), _pick(pools, [], tested, "ids"),
                                              seed=r, with_share=False).p_value < GUARD_ALPHA
            out["power"][f"{share}-{n}"] = {"share": share, "n": n, "draws": args.power_draws,
                                            "detected": {k: v / args.power_draws for k, v in hits.items()},
                                            "guard_fired": guard_fired / args.power_draws if share == 1.0 else None}
            print(f"  power share {share} n {n}: " + ", ".join(f"{k} {v / args.power_draws:.2f}" for k, v in hits.items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    out["smallest_n_80"] = {
        str(share): {k: next((n for n in SIZES_N if out["power"][f"{share}-{n}"]["detected"][k] >= 0.8), None)
                     for k in ("gradaudit", *singles)} for share in SHARES}
    # the shifted protocol: V in another voice; the blind guard reads the manifests (no capture needed)
    shifted = read_manifest(prepare_corpus(root, corpus, size, Corpus())["nonmembers_shifted"])[0]
    shifted = shifted[PAPER_NONMEMBERS + V_FIT:]
    v_blind = blind_features([p.text for p in shifted], np.array([p.image_statistics() for p in shifted]), IMAGE_STATS)
    v_ids = [p.id + "~shifted" for p in shifted]
    for side, pool in (("members", "member_pool"), ("plain non-members", "nonmember_pool")):
        fired = 0
        for r in range(args.shifted_draws):
            s = rng.choice(len(pools[pool]["ids"]), NULL_SIZE, replace=False)
            v = rng.choice(len(shifted), V_SIZE, replace=False)
            guard = split_test(pools[pool]["blind"].rows(s), v_blind.rows(v), [pools[pool]["ids"][i] for i in s],
                               [v_ids[i] for i in v], seed=r, with_share=False)
            fired += guard.p_value < GUARD_ALPHA
        out["shifted"][side] = rate(int(fired), args.shifted_draws)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def markdown(report: dict) -> str:
    lines = [f"# Collection audit on the embedded models ({report['size']}, {report['device']})", "",
             f"`{report['command']}` — {report['machine']}; {report['seconds']:.0f} s. V of {V_SIZE} known "
             f"non-members, {KNOWN_MEMBERS} known members (half build R); null collections of {NULL_SIZE}.", "",
             "## Validity: null collections (S and V both non-members)", "",
             "| scenario | audit | p < 0.05 [95% CI] | p < 0.01 | blind guard fired |", "|---|---|---|---|---|"]
    for name, sc in report["scenarios"].items():
        for design, v in sc["validity"].items():
            a, b, g = v["p_below_0.05"], v["p_below_0.01"], v["guard_fired"]
            lines.append(f"| {name} | {design} | {a['rate']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] ({a['hits']}/"
                         f"{a['draws']}) | {b['rate']:.3f} | {g['rate']:.3f} |")
    singles = [k for k in SINGLE if any(k in p["detected"] for sc in report["scenarios"].values()
                                        for p in sc["power"].values())]

    def cell(row, k, fmt):
        return "—" if row.get(k) is None else fmt(row[k])

    lines += ["", "## Power: share of draws detected at p < 0.01 (V of 500)", "",
              "GradAudit: the known-members collection test (the per-pair method fitted on 100 known members and "
              "250 of V, S tested against the other 250); single scores: all of S against all 500 of V, nothing "
              "fitted (`loss_vs_base`: the fine-tune's loss minus its base model's, adapters only).", "",
              "| scenario | fit | members | n | GradAudit | " + " | ".join(singles) + " |",
              "|---|---|---|---|---|" + "---|" * len(singles)]
    for name, sc in report["scenarios"].items():
        fit = f"{sc['fit']['method']} ({sc['fit']['cross_validated_auroc']:.2f})"
        for p in sc["power"].values():
            d = p["detected"]
            lines.append(f"| {name} | {fit} | {100 * p['share']:.0f}% | {p['n']} | {d['gradaudit']:.2f} | "
                         + " | ".join(cell(d, k, lambda x: f"{x:.2f}") for k in singles) + " |")
    lines += ["", "## Smallest collection detected in ≥ 80% of draws (of the sizes tried; — = none)", "",
              "| scenario | members | GradAudit | " + " | ".join(singles) + " |",
              "|---|---|---|" + "---|" * len(singles)]
    for name, sc in report["scenarios"].items():
        for share, row in sc["smallest_n_80"].items():
            lines.append(f"| {name} | {100 * float(share):.0f}% | {cell(row, 'gradaudit', str)} | "
                         + " | ".join(cell(row, k, str) for k in singles) + " |")
    lines += ["", "## The blind guard on i.i.d. collections of members (it should fire no more than on nulls)", "",
              "| scenario | n | guard fired |", "|---|---|---|"]
    for name, sc in report["scenarios"].items():
        for p in sc["power"].values():
            if p.get("guard_fired") is not None:
                lines.append(f"| {name} | {p['n']} | {p['guard_fired']:.2f} |")
    lines += ["", "## Shifted protocol: the blind guard (V = non-members in another voice)", "",
              "| scenario | S | guard fired |", "|---|---|---|"]
    for name, sc in report["scenarios"].items():
        for side, r in sc["shifted"].items():
            lines.append(f"| {name} | {side} | {r['rate']:.2f} ({r['hits']}/{r['draws']}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="demo")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--null-draws", type=int, default=200)
    ap.add_argument("--power-draws", type=int, default=30)
    ap.add_argument("--shifted-draws", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="join the reports of separate runs (one scenario each) into one; runs nothing")
    args = ap.parse_args()
    if args.merge:
        return write(merge(args.merge), args.out)
    root = os.path.abspath(args.root)
    report = {"size": args.size, "device": args.device, "machine": machine(args.device),
              "command": "python benchmarks/eval_collection.py " + " ".join(sys.argv[1:]), "scenarios": {}}
    t0 = time.time()
    for name in args.scenarios.split(","):
        training, corpus = name.split("-")
        print(f"{name}: training (cached) and capture", flush=True)
        model = train_model(root, training, corpus, args.size, device=args.device, log=lambda m: print(m, flush=True))
        run = capture(root, model, corpus, args.size, args.device, args.batch_size)
        report["scenarios"][name] = evaluate(run, root, corpus, args.size, args)
        report["seconds"] = time.time() - t0
        write(report, args.out, echo=False)  # after every scenario: a partial run leaves its tables
    print(markdown(report))


def machine(device: str) -> str:
    """The card for a GPU run, else the processor and its cores."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def merge(paths: list[str]) -> dict:
    """One report from several runs of the same size (each run's command is kept; seconds are summed)."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    sizes = {p["size"] for p in parts}
    if len(sizes) != 1:
        raise SystemExit(f"cannot merge runs of different sizes: {sorted(sizes)}")
    merged = {k: parts[0][k] for k in ("size", "device", "machine")}
    merged["command"] = " ; ".join(p["command"] for p in parts) + " (separate processes, joined by --merge)"
    merged["seconds"] = sum(p["seconds"] for p in parts)
    merged["scenarios"] = {name: sc for p in parts for name, sc in p["scenarios"].items()}
    return merged


def write(report: dict, out: str | None, echo: bool = True) -> None:
    if out:
        save(out, f"eval_collection_{report['size']}", report, markdown(report))
    if echo:
        print(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
