"""`make demo`'s path at a reduced size: corpora → models trained here → `gradaudit audit` → the table."""

import json
import os

import pytest

from gradaudit.toy import demo
from gradaudit.store.manifest import read_manifest, shuffled_texts
from gradaudit.toy.scenarios import Corpus, audit_sets, prepare_corpus


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


def test_demo_end_to_end_then_cached(tmp_path, capfd):
    args = ["--root", str(tmp_path), "--members", "160", "--reference", "40", "--probes", "60"]
    assert demo.main(args) == 0
    out = capfd.readouterr().out
    with open(tmp_path / "run" / "results" / "probes" / "metrics.json") as f:
        result = json.load(f)
    ev = result["evaluation"]
    assert result["probes"] == 120 and result["association"]["pairs"] == 60
    # the table prints what the audit wrote
    assert f"gradaudit                {ev['gradaudit']['auroc']:.3f}" in out
    assert "Association: 60 member probes" in out and "true 50%" in out
    assert f"{100 * result['exposure']['estimate']:.0f}%" in out
    assert os.path.getsize(tmp_path / "run" / "results" / "probes" / "report.html") > 10_000
    assert "training pretrain" in out and "training finetune" in out
    # a second run finds data and models cached and audits afresh
    assert demo.main(args) == 0
    again = capfd.readouterr().out
    assert "training pretrain" not in again and "training finetune" not in again
    with open(tmp_path / "run" / "results" / "probes" / "metrics.json") as f:
        assert json.load(f)["evaluation"]["gradaudit"]["auroc"] == ev["gradaudit"]["auroc"]
