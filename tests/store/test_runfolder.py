"""The run folder as a store: who may create it, the writer lock, checksums on every stored file, and
statistics bound to the exact pairs they were computed from. No model: tensors are written directly."""

import contextlib
import os
import signal
import time

import pytest

from gradaudit.cli import main
from gradaudit.errors import RunBusy, StageMissing
from gradaudit.store.lock import LOCK_FILE
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


@pytest.fixture
def held_elsewhere(tmp_path):
    """A writer in another process (forked) holding the lock of run folder ``tmp_path/run``; yields its
    pid, and kills it (SIGKILL) at the end if the test has not."""
    run = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other writer: take the lock, say so, wait to be killed
        try:
            with RunFolder(str(run)).writing("extract set probes"):
                os.write(ready_w, b"x")
                time.sleep(120)
        finally:
            os._exit(0)
    os.close(ready_w)  # so that a child that failed to take the lock reads as an end of file, not a hang
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    yield pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_second_writer_is_refused_at_once_and_a_killed_one_blocks_nothing(tmp_path, held_elsewhere, capsys):
    run = tmp_path / "run"
    started = time.monotonic()
    with pytest.raises(RunBusy, match=f"in use by another writer: pid {held_elsewhere}, extract set probes"):
        with RunFolder(str(run)).writing("reference pass"):
            pass
    # the command line is refused before it loads anything (the model does not even exist)
    assert main(["extract", "--model", str(tmp_path / "no-model"), "--manifest", str(tmp_path / "none.jsonl"),
                 "--run", str(run), "--set", "x"]) == 2
    err = capsys.readouterr().err
    assert f"pid {held_elsewhere}" in err and "Wait until that command has finished" in err
    assert main(["fit", "--run", str(run)]) == 2 and "in use by another writer" in capsys.readouterr().err
    assert time.monotonic() - started < 30

    os.kill(held_elsewhere, signal.SIGKILL)
    os.waitpid(held_elsewhere, 0)
    assert (run / LOCK_FILE).exists()  # left behind by the killed writer, and no obstacle
    with RunFolder(str(run)).writing("reference pass"):
        pass


def test_the_lock_is_reentrant_in_one_process_and_clears_killed_writers_temporaries(tmp_path):
    run = tmp_path / "run"
    (run / "stats" / "probes").mkdir(parents=True)
    stale = run / "stats" / "probes" / "chunk-000003.safetensors.tmp-4242"
    stale.write_bytes(b"half a chunk")
    folder = RunFolder(str(run))
    with folder.writing("audit"):
        assert not stale.exists()
        with folder.writing("fit"), RunFolder(str(run)).writing("extract set probes"):
            pass
    with folder.writing("reference pass"):  # released when the outermost holder left
        pass
