"""`gradaudit audit CONFIG` end to end on a tiny LLaVA: the outputs' content, not just their presence."""

import csv
import json
import os

import numpy as np
import pytest

from gradaudit.cli import main
from gradaudit.toy.tiny import save_llava_folder

WORDS = ["red", "blue", "green", "small", "large", "square", "circle", "dot", "left", "right", "top", "noise"]


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    save_llava_folder(root, n_images=40, image_seed=7)

    def text(i):
        return " ".join(WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 6))

    def manifest(name, idx, label=None):
        lines = []
        for i in idx:
            rec = {"id": f"p{i}", "image": f"img/{i}.png", "text": text(i)}
            if label is not None:
                rec["label"] = label(i)
            lines.append(json.dumps(rec))
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    manifest("ref_members", range(0, 12))
    manifest("ref_nonmembers", range(12, 24))
    manifest("probes", list(range(0, 6)) + list(range(24, 34)), label=lambda i: int(i < 12))
    (root / "audit.toml").write_text(
        'model = "model"\nrun = "run"\npreset = "paper"\n[data]\nreference_members = "ref_members.jsonl"\n'
        'reference_nonmembers = "ref_nonmembers.jsonl"\nprobes = "probes.jsonl"\n[options]\nbatch_size = 6\nprompt_format = "chat-template"\n')
    return root


def test_audit_writes_what_an_auditor_reads(audit_dir, capsys):
    assert main(["audit", str(audit_dir / "audit.toml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(("Evidence that this collection", "No evidence that this collection", "No conclusion"))
    assert "Per pair, the signal" in out and "report.html" in out
    run = audit_dir / "run"
    out_dir = run / "results" / "probes"
    m = json.loads((out_dir / "metrics.json").read_text())
    c = m["collection"]
    assert c["set"] == "probes" and c["pairs"] == 16 and c["tested_pairs_left_out_as_reference_pairs"] == 3
    # p1, p3, p5 are known members (the builders of R, p0, p2, p4, are tested leave-one-out)
    assert c["test"]["design"] == "known members" and c["test"]["n_test"] == {"collection": 13, "nonmembers": 6,
                                                                               "members": 6}
    assert 0 <= c["test"]["p_value"] <= 1 and 0 <= c["blind_guard"]["p_value"] <= 1
    assert c["blind_features"] == "text and image statistics" and c["test"]["features"]
    assert m["method"] in m["cross_validated"] and "paper" in m["cross_validated"]
    assert set(m["cross_validated"]) == {"paper", "loo", "signed", "head-cosine", "head-lognorm", "head-both", "combined"}
    assert {"loss", "zlib", "min_k", "min_k_plus_plus", "gradient_norm"} <= set(m["cross_validated_baselines"])
    assert 0 <= m["exposure"]["estimate"] <= 1 and m["exposure"]["ci"][0] <= m["exposure"]["ci"][1]
    assert "collection_test" not in m and m["probes"] == 16  # retired: the collection audit answers
    ev = m["evaluation"]
    assert 0 <= ev["gradaudit"]["auroc"] <= 1 and ev["gradaudit"]["tpr_at_0.01_fpr"] is None  # 10 negatives
    assert m["true_member_share"] == pytest.approx(6 / 16)
    assert ev["roc"]["gradaudit"]["fpr"][0] == 0 and ev["roc"]["gradaudit"]["tpr"][-1] == 1
    rows = list(csv.DictReader(open(out_dir / "pairs.csv")))
    assert len(rows) == 16 and {r["verdict"] for r in rows} <= {"member", "non-member"}
    assert all(0 <= float(r["probability"]) <= 1 for r in rows) and "min_k_plus_plus" in rows[0]
    page = (out_dir / "report.html").read_text()
    assert "GradAudit report" in page and page.index("Was this collection used?") < page.index("<h2>Per pair</h2>")
    assert page.count("data:image/png;base64,") == 6
    assert sorted(os.listdir(out_dir / "figures")) == ["collection.png", "comparison.png", "mask.png", "reliability.png",
                                                       "roc.png", "scores.png"]


def test_audit_config_errors(tmp_path, capsys):
    bad = tmp_path / "a.toml"
    bad.write_text('model = "m"\n[data]\nprobes = "p.jsonl"\n')
    assert main(["audit", str(bad)]) == 2
    assert "missing run, data.reference_nonmembers" in capsys.readouterr().err  # known members are optional


def test_step_commands_from_the_run_folder(audit_dir, capsys):
    """fit, score, evaluate and report work from the run folder alone, reuse the stored fit, agree with one
    another, and keep each set's outputs apart."""
    run = audit_dir / "run"
    if not (run / "stats" / "probes").exists():
        assert main(["audit", str(audit_dir / "audit.toml"), "--no-progress"]) == 0
    quick = ["--run", str(run), "--folds", "3"]
    assert main(["fit", *quick]) == 0
    stored = json.loads((run / "fit" / "summary.json").read_text())
    chosen = stored["summary"]["method"]
    assert f"chosen: {chosen}" in capsys.readouterr().out and stored["request"]["folds"] == 3
    models = run / "fit" / "models.safetensors"
    written = models.stat().st_mtime_ns
    out_dir = run / "results" / "probes"
    os.remove(out_dir / "pairs.csv")
    assert main(["score", *quick, "--set", "probes"]) == 0
    assert len(list(csv.DictReader(open(out_dir / "pairs.csv")))) == 16
    assert models.stat().st_mtime_ns == written  # the stored fit was reused, not refitted
    assert main(["evaluate", *quick, "--set", "probes"]) == 0
    evaluated = json.loads((out_dir / "metrics.json").read_text())
    assert evaluated["method"] == chosen and 0 <= evaluated["evaluation"]["expected_calibration_error"] <= 1
    assert main(["evaluate", *quick, "--set", "reference_nonmembers"]) == 2  # unlabelled
    err = capsys.readouterr().err
    assert "needs a 0/1 label" in err and "Give every pair of that set a label" in err
    assert main(["report", *quick, "--set", "reference_nonmembers"]) == 0  # unlabelled: no evaluation
    other = json.loads((run / "results" / "reference_nonmembers" / "metrics.json").read_text())
    assert other["set"] == "reference_nonmembers" and "evaluation" not in other
    (out_dir / "report.html").unlink()
    assert main(["report", *quick, "--set", "probes"]) == 0 and (out_dir / "report.html").exists()
    reported = json.loads((out_dir / "metrics.json").read_text())
    assert reported["evaluation"]["gradaudit"]["auroc"] == evaluated["evaluation"]["gradaudit"]["auroc"]
    assert main(["fit", "--run", str(run), "--folds", "4"]) == 0  # another request: refitted and stored
    assert json.loads((run / "fit" / "summary.json").read_text())["request"]["folds"] == 4


def test_stored_fit_scores_as_the_fresh_one(audit_dir):
    """The fit restored from the run folder gives bit-identical scores to the fit it was stored from."""
    from gradaudit import workflow

    run = str(audit_dir / "run")
    if not (audit_dir / "run" / "stats" / "probes").exists():
        assert main(["audit", str(audit_dir / "audit.toml"), "--no-progress"]) == 0
    fresh = workflow.fit_sets(run)
    meta, arrays = fresh.export()
    from gradaudit.audit.per_pair import Fit

    restored = Fit.restore(meta, arrays)
    probes = workflow.load_set(run, "probes")
    for name in fresh.estimates:
        position = np.full(len(probes.ids), -1)
        want = fresh.estimates[name].score_probes(probes.pairs, position)
        got = restored.estimates[name].score_probes(workflow.load_set(run, "probes").pairs, position)
        assert np.array_equal(want, got), name
    assert restored.summary() == fresh.summary()
    assert np.array_equal(restored.paper.delta_, fresh.paper.delta_) and restored.paper.kept_ == fresh.paper.kept_


def test_verdict_reads_weak_when_the_interval_is_wide():
    from gradaudit.audit.claims import verdict

    result = {"exposure": {"estimate": 0.2, "ci": [0.0, 0.9]}, "method": "loo",
              "reference": {"members": 12, "nonmembers": 12},
              "cross_validated": {"loo": {"auroc": 0.79, "auroc_ci": [0.52, 0.97]}},
              "cross_validated_baselines": {"loss": 0.55}}
    text = verdict(result)
    assert text.startswith("Per pair") and "not distinguishable from chance" in text and "0.52–0.97" in text
    assert "no per-pair probability or share is claimed" in text
    result["cross_validated"]["loo"]["auroc_ci"] = [0.85, 0.95]
    assert "strong" in verdict(result) and "estimated share of training pairs among the audited pairs 20%" in verdict(result)


def _collection(p, auroc, guard_p, share):
    return {"alpha": 0.05, "blind_features": "text and image statistics",
            "test": {"p_value": p, "auroc": auroc, "auroc_ci": [auroc - 0.05, auroc + 0.05],
                     "n_test": {"collection": 500, "nonmembers": 250}, "share": share},
            "blind_guard": {"p_value": guard_p, "auroc": 0.5, "fired": guard_p < 0.05}}


def test_collection_verdict_leads_and_the_blind_guard_overrules_it():
    from gradaudit.audit.claims import verdict

    estimate = {"kind": "estimate", "estimate": 0.48, "ci": [0.3, 0.7], "note": "assuming …"}
    text = verdict({"collection": _collection(1e-6, 0.58, 0.4, estimate)})
    assert text.startswith("Evidence that this collection was used") and "p = 1e-06" in text
    assert "estimated share used 48% (95% CI 30–70%" in text and "weak" in text
    bound = {"kind": "lower bound", "estimate": None, "ci": [0.12, 1.0]}
    assert "at least 12% of it used" in verdict({"collection": _collection(1e-6, 0.58, 0.4, bound)})
    text = verdict({"collection": _collection(0.3, 0.51, 0.4, bound)})
    assert text.startswith("No evidence") and "does not show that it was not used" in text and "12%" not in text
    text = verdict({"collection": _collection(1e-9, 0.9, 1e-4, estimate)})
    assert text.startswith("No conclusion about training") and "Evidence" not in text


def test_leave_one_out_protocol_remains_an_option(audit_dir):
    """split_reference = false: every reference member builds R and is scored leave-one-out."""
    config = audit_dir / "audit_loo.toml"
    config.write_text((audit_dir / "audit.toml").read_text().replace('run = "run"', 'run = "run_loo"')
                      + "split_reference = false\nmethod = \"loo\"\n")
    assert main(["audit", str(config), "--no-progress"]) == 0
    m = json.loads((audit_dir / "run_loo" / "results" / "probes" / "metrics.json").read_text())
    assert m["reference"]["members"] == 12 and m["reference"]["members_in_r"] == 12 and m["method"] == "loo"
    if not (audit_dir / "run" / "results" / "probes" / "metrics.json").exists():
        assert main(["audit", str(audit_dir / "audit.toml"), "--no-progress"]) == 0
    split = json.loads((audit_dir / "run" / "results" / "probes" / "metrics.json").read_text())
    assert split["reference"]["members_in_r"] == 0 and split["reference"]["r_builders"] == 6


@pytest.mark.parametrize("split", [True, False])
def test_step_by_step_route_gives_the_audits_answer(audit_dir, split, capsys):
    """reference → extract → report, as the command line's example shows, gives what `gradaudit audit` gives
    on the same data, with and without the split: the same R, the same stored sets, the same scores and
    verdict. (Before, the step-by-step route always built R from every member and disagreed.)"""
    name = "run_agree" if split else "run_agree_no_split"  # run folders of their own: other tests refit "run"
    config = audit_dir / f"{name}.toml"
    config.write_text((audit_dir / "audit.toml").read_text().replace('run = "run"', f'run = "{name}"')
                      + ("" if split else "split_reference = false\n"))
    assert main(["audit", str(config), "--no-progress"]) == 0
    steps = audit_dir / f"{name}_steps"
    capture = ["--model", audit_dir / "model", "--run", steps, "--batch-size", 6, "--no-progress",
               "--prompt-format", "chat-template"]
    assert main([str(a) for a in ["reference", "--manifest", audit_dir / "ref_members.jsonl", *capture]
                 + ([] if split else ["--no-split"])]) == 0
    for set_name, manifest in (("reference_nonmembers", "ref_nonmembers.jsonl"), ("probes", "probes.jsonl")):
        assert main([str(a) for a in ["extract", "--manifest", audit_dir / manifest, "--set", set_name, *capture]]) == 0
    assert main(["report", "--run", str(steps), "--set", "probes"]) == 0
    said = capsys.readouterr().out

    from gradaudit.store.runfolder import RunFolder

    audited, stepped = RunFolder(str(audit_dir / name)), RunFolder(str(steps))
    for folder in (audited, stepped):
        assert folder.reference()[1] == (6 if split else 12)
    for set_name in ("reference_members", "reference_nonmembers", "probes"):
        (ids_a, stats_a), (ids_s, stats_s) = audited.load_stats(set_name), stepped.load_stats(set_name)
        assert ids_a == ids_s and all(np.array_equal(stats_a[k], stats_s[k]) for k in stats_a), set_name
    want = json.loads((audit_dir / name / "results" / "probes" / "metrics.json").read_text())
    got = json.loads((steps / "results" / "probes" / "metrics.json").read_text())
    for key in ("method", "cross_validated", "collection", "exposure", "evaluation", "reference"):
        assert got[key] == want[key], key
    from gradaudit.audit.claims import verdict

    assert verdict(want) in said
    rows = [list(csv.DictReader(open(folder / "results" / "probes" / "pairs.csv"))) for folder in (audit_dir / name, steps)]
    assert rows[0] == rows[1]


def test_audit_without_known_members_answers_for_the_collection_alone(audit_dir, capsys):
    """No reference_members: R is the mean gradient of the collection's fitting half, the collection audit
    answers (its design "split collection", the share a lower bound), and no per-pair method is fitted;
    `gradaudit report` audits another extracted set the same way."""
    config = audit_dir / "audit_collection_only.toml"
    config.write_text('model = "model"\nrun = "run_collection"\n[data]\nreference_nonmembers = "ref_nonmembers.jsonl"\n'
                      'probes = "probes.jsonl"\n[options]\nbatch_size = 6\nprompt_format = "chat-template"\n')
    assert main(["audit", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "this collection" in out and "Per pair" not in out and "pairs:" not in out
    run = audit_dir / "run_collection"
    m = json.loads((run / "results" / "probes" / "metrics.json").read_text())
    c = m["collection"]
    assert "cross_validated" not in m and c["known_members"] == 0 and c["test"]["design"] == "split collection"
    assert c["test"]["n_fit"] == {"collection": 8, "nonmembers": 6} and c["test"]["share"]["kind"] == "lower bound"
    from gradaudit.audit.collection import split
    from gradaudit.store.runfolder import RunFolder

    ids = [json.loads(line)["id"] for line in (audit_dir / "probes.jsonl").read_text().splitlines()]
    builders = {i for i, f in zip(ids, split(ids)) if f}
    assert set(RunFolder(str(run)).reference_pairs()) == builders  # R: the half that fits the aggregator
    page = (run / "results" / "probes" / "report.html").read_text()
    assert "No known members were given" in page and "Was this collection used?" in page
    capture = ["--model", audit_dir / "model", "--run", run, "--batch-size", 6, "--no-progress",
               "--prompt-format", "chat-template"]
    assert main([str(a) for a in ["extract", "--manifest", audit_dir / "ref_members.jsonl", "--set", "other", *capture]]) == 0
    assert main(["report", "--run", str(run), "--set", "other"]) == 0
    other = json.loads((run / "results" / "other" / "metrics.json").read_text())
    assert other["collection"]["set"] == "other" and other["collection"]["pairs"] == 12
