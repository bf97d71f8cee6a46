"""pairs.csv cannot carry a formula: an id that a spreadsheet would run is written as text."""

import csv
from types import SimpleNamespace

import numpy as np
import pytest

from gradaudit.store.cells import spreadsheet_safe
from gradaudit.workflow import write_pairs_csv


@pytest.mark.parametrize("cell,written", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1", "'+1"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("p1", "p1"), ("a=b", "a=b"), ("", ""), ("'quoted", "'quoted"),
])
def test_cells_that_could_start_a_formula_are_text(cell, written):
    assert spreadsheet_safe(cell) == written


def test_pairs_csv_neutralises_ids_and_leaves_numbers_alone(tmp_path):
    ids = ["=cmd|' /C calc'!A0", "p2", "-1"]
    n = len(ids)
    scored = SimpleNamespace(name="probes", ids=ids, labels=[1, None, 0], probability=np.array([0.9, 0.2, 0.5]),
                             scores={"gradaudit": np.array([-1.5, 0.0, 2.0]), "paper": np.array([-0.25, 1.0, 0.0]),
                                     "loss": np.full(n, -3.0)}, baselines={"loss": None})
    rows = list(csv.DictReader(open(write_pairs_csv(str(tmp_path), scored))))
    assert [r["id"] for r in rows] == ["'=cmd|' /C calc'!A0", "p2", "'-1"]
    assert [r["score"] for r in rows] == ["-1.5", "0", "2"] and rows[0]["paper_score"] == "-0.25"
    assert rows[0]["loss"] == "-3" and [r["label"] for r in rows] == ["1", "", "0"]
