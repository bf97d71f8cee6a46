"""`make demo`'s path at a reduced size: corpora → models trained here → `gradaudit audit` → the table."""

import json
import os

import pytest

from gradaudit.toy import demo
from gradaudit.store.manifest import read_manifest, shuffled_texts
from gradaudit.toy.scenarios import Corpus, audit_sets, collection_sets, prepare_corpus


def test_shuffled_texts_move_every_text_to_another_pair(tmp_path):
    pairs = read_manifest(prepare_corpus(str(tmp_path), "scenes", "tiny", Corpus(30, 30, 5))["members"])[0]
    moved = shuffled_texts(pairs, seed=3)
    assert sorted(moved) == sorted(p.text for p in pairs)  # the same texts, each used once
    assert all(m != p.text for m, p in zip(moved, pairs))
    assert moved == shuffled_texts(pairs, seed=3) and moved != shuffled_texts(pairs, seed=4)


def test_audit_sets_keep_reference_and_probes_apart_and_protocols_differ_only_in_voice(tmp_path):
    counts = Corpus(40, 40, 5)
    iid = audit_sets(str(tmp_path), "radiographs", "tiny", 10, 20, "iid", counts, pool=15)
    shifted = audit_sets(str(tmp_path), "radiographs", "tiny", 10, 20, "shifted", counts, pool=15)
    sets = {k: read_manifest(v, allow_outside=True)[0] for k, v in iid.items()}  # images in the corpus folder
    ids = [{p.id for p in pairs} for pairs in sets.values()]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 10 + 10 + 40  # disjoint
    probes = sets["probes"]
    assert [p.label for p in probes] == [1] * 20 + [0] * 20
    assert probes[0].id.endswith("000015")  # probes start after the pool, whatever the reference size
    other = read_manifest(shifted["probes"], allow_outside=True)[0]
    for a, b in zip(probes[20:], other[20:]):
        assert a.image == b.image and a.text != b.text  # same image and details, another voice
    assert [p.text for p in probes[:20]] == [p.text for p in other[:20]]  # the same members
    with pytest.raises(ValueError, match="do not fit"):
        audit_sets(str(tmp_path), "radiographs", "tiny", 10, 30, "iid", counts, pool=15)


def test_collection_sets_are_disjoint_and_labelled(tmp_path):
    counts = Corpus(40, 40, 5)
    sets = {k: read_manifest(v, allow_outside=True)[0]
            for k, v in collection_sets(str(tmp_path), "scenes", "tiny", 10, 15, 20, counts).items()}
    ids = [{p.id for p in pairs} for pairs in sets.values()]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 10 + 15 + 20 + 20
    assert {p.label for p in sets["used"]} == {1} and {p.label for p in sets["fresh"]} == {0}
    corpus = {k: [p.id for p in read_manifest(v)[0]]
              for k, v in prepare_corpus(str(tmp_path), "scenes", "tiny", counts).items()}
    assert [p.id for p in sets["fresh"]] == corpus["nonmembers"][15:35]  # non-members after V
    assert [p.id for p in sets["used"]] == corpus["members"][10:30]  # members after the known ones
    with pytest.raises(ValueError, match="do not fit"):
        collection_sets(str(tmp_path), "scenes", "tiny", 10, 25, 20, counts)


def test_demo_end_to_end_then_cached(tmp_path, capfd):
    args = ["--root", str(tmp_path), "--members", "160", "--reference", "40", "--nonmembers", "60",
            "--collection", "50"]
    assert demo.main(args) == 0
    out = capfd.readouterr().out
    used, fresh = (json.loads((tmp_path / "run" / "results" / s / "metrics.json").read_text()) for s in ("probes", "fresh"))
    for result in (used, fresh):
        c = result["collection"]
        assert c["pairs"] == 50 and c["nonmembers"] == 60 and c["test"]["design"] == "known members"
    # the table and the verdicts print what the audits wrote
    assert f"{used['collection']['test']['auroc']:.3f}" in out and f"{fresh['collection']['test']['auroc']:.3f}" in out
    assert "used (all trained on)" in out and "fresh (none trained on)" in out and "\nused:  " in out
    assert "gradaudit (per pair)" in out and "min_k_plus_plus" in out
    for name in ("probes", "fresh"):
        assert os.path.getsize(tmp_path / "run" / "results" / name / "report.html") > 10_000
    assert "training pretrain" in out and "training finetune" in out
    # a second run finds data and models cached and audits afresh, to the same answer
    assert demo.main(args) == 0
    again = capfd.readouterr().out
    assert "training pretrain" not in again and "training finetune" not in again
    with open(tmp_path / "run" / "results" / "probes" / "metrics.json") as f:
        assert json.load(f)["collection"]["test"]["p_value"] == used["collection"]["test"]["p_value"]
