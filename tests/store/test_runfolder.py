"""The run folder as a store: who may create it, the writer lock, checksums on every stored file, and
statistics bound to the exact pairs they were computed from. No model: tensors are written directly."""

import os

import pytest

from gradaudit.cli import main
from gradaudit.errors import StageMissing
from gradaudit.store.runfolder import RunFolder


def test_readers_do_not_create_the_run_folder(tmp_path, capsys):
    typo = tmp_path / "typo"
    folder = RunFolder(str(typo))
    for read in (folder.fingerprint, folder.reference, lambda: folder.stored_set("probes")):
        with pytest.raises(StageMissing, match="no run folder here"):
            read()
    assert folder.pair_info("probes") == ([], [], []) and not folder.has_fit()
    for command in (["fit"], ["score", "--set", "probes"], ["report", "--set", "probes"]):
        assert main([*command, "--run", str(typo)]) == 2
        assert "no run folder here" in capsys.readouterr().err
    assert not typo.exists()

