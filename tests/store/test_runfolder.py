"""The run folder as a store: who may create it, the writer lock, checksums on every stored file, and
statistics bound to the exact pairs they were computed from. No model: tensors are written directly."""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from gradaudit import cli
from gradaudit.cli import main
from gradaudit.errors import CorruptFile, IdCollision, ManifestChanged, NonFiniteStats, RunBusy, StageMissing
from gradaudit.store.lock import LOCK_FILE
from gradaudit.store.manifest import Pair
from gradaudit.store.runfolder import RunFolder


def test_readers_do_not_create_the_run_folder(tmp_path, capsys):
    typo = tmp_path / "typo"
    folder = RunFolder(str(typo))
    for read in (folder.fingerprint, folder.reference, lambda: folder.stored_set("probes")):
        with pytest.raises(StageMissing, match="no run folder here"):
            read()
    assert folder.pair_info("probes") == ([], [], []) and not folder.has_fit()
    extract = ["extract", "--model", str(tmp_path / "model"), "--manifest", str(tmp_path / "m.jsonl"), "--set", "x"]
    for command in (["fit"], ["score", "--set", "probes"], ["report", "--set", "probes"], extract):
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


# a run folder written directly: R over r0 and r1, set "probes" of four pairs in two chunks --------------
WEIGHT = "w"


def _pairs(root, ids, texts=None):
    (root / "img").mkdir(exist_ok=True)
    pairs = []
    for k, pid in enumerate(ids):
        image = root / "img" / f"{pid}.png"
        if not image.exists():
            Image.new("RGB", (4, 4), (10 * k, 20, 30)).save(image)
        pairs.append(Pair(pid, str(image), texts[k] if texts else f"text of {pid}"))
    return pairs


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """One chunk's tensors as the capture writes them: statistics of a 3 × 4 weight, losses, two text
    tokens per pair."""
    g = torch.Generator().manual_seed(seed)
    out = {f"{WEIGHT}|{key}": torch.rand(n, d, generator=g) for key, d in
           (("row_sq", 3), ("col_sq", 4), ("row_dot", 3), ("col_dot", 4))}
    return out | {"loss": torch.rand(n, generator=g), "tokens": torch.rand(2 * n, 8, generator=g),
                  "token_offsets": torch.arange(0, 2 * n + 1, 2)}


@pytest.fixture
def stored(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    with folder.writing("test"):
        folder.bind({"config_sha256": "c"})
        digests = folder.bind_pairs(None, _pairs(tmp_path, ["r0", "r1"]))
        folder.save_reference({WEIGHT: torch.rand(3, 4, generator=torch.Generator().manual_seed(0))},
                              ["r0", "r1"], [digests["r0"], digests["r1"]], complete=True)
        ref_sha = folder.reference()[2]
        pairs = _pairs(tmp_path, ["p0", "p1", "p2", "p3"])
        folder.bind_pairs("probes", pairs)
        folder.save_chunk("probes", pairs[:2], _batch(2, 1), ref_sha)
        folder.save_chunk("probes", pairs[2:], _batch(2, 2), ref_sha)
    return folder


def _chunk(folder, index=0):
    return os.path.join(folder.path, "stats", "probes", f"chunk-{index:06d}.safetensors")


def _advice(exc, command="extract"):
    return cli._advice(exc, argparse.Namespace(command=command, run="RUN"))


def test_a_truncated_or_foreign_file_is_named_with_the_command_that_recomputes_it(stored):
    assert stored.stored_set("probes").ids == ["p0", "p1", "p2", "p3"]
    chunk = _chunk(stored, 1)
    data = open(chunk, "rb").read()
    open(chunk, "wb").write(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match="chunk-000001.safetensors: unreadable: truncated") as info:
        stored.stored_set("probes")
    assert info.value.stage == "extract" and info.value.set_name == "probes" and info.value.path == chunk
    advice = _advice(info.value)
    assert f"Delete {chunk}" in advice and "gradaudit extract" in advice and "--set probes" in advice
    assert "only its batch" in advice

    shutil.copy(stored.reference_norms_path, chunk)  # a valid file, but not a chunk
    with pytest.raises(CorruptFile, match="foreign: a file of kind 'reference norms'"):
        stored.stored_set("probes")

    open(stored.reference_path, "r+b").truncate(100)
    with pytest.raises(CorruptFile, match="reference.safetensors: unreadable") as info:
        stored.reference()
    assert info.value.stage == "reference" and "gradaudit reference" in _advice(info.value)

    text = open(stored.fingerprint_path).read()
    open(stored.fingerprint_path, "w").write(text[:-3])
    with pytest.raises(CorruptFile, match="fingerprint.json: does not match its checksum") as info:
        stored.fingerprint()
    assert "records the model anew" in _advice(info.value)


def test_values_altered_in_a_valid_file_are_refused(stored):
    chunk = _chunk(stored)
    with safe_open(chunk, "pt") as f:
        meta = f.metadata()
    tensors = load_file(chunk)
    tensors[f"{WEIGHT}|row_dot"] *= 50
    save_file(tensors, chunk, metadata=meta)  # the old checksums kept, the values × 50
    with pytest.raises(CorruptFile, match="its tensors do not match their checksum: altered"):
        stored.load_stats("probes")
    meta["ids"] = json.dumps(["p1", "p0"])  # the metadata altered (the tensors as written)
    save_file(load_file(_chunk(stored, 1)), chunk, metadata=meta)
    with pytest.raises(CorruptFile, match="its metadata do not match their checksum"):
        stored.pair_info("probes")


def test_a_file_without_checksum_is_refused(stored):
    """A run folder written before checksums were kept is refused, not trusted."""
    chunk = _chunk(stored)
    tensors = load_file(chunk)
    with safe_open(chunk, "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k in ("ids", "texts", "labels", "reference_sha256")}
    save_file(tensors, chunk, metadata=meta)
    with pytest.raises(CorruptFile, match="carries no checksum: written before GradAudit kept checksums"):
        stored.done_ids("probes", stored.reference()[2])
    os.remove(stored.fingerprint_path + ".sha256")
    with pytest.raises(CorruptFile, match="carries no checksum"):
        stored.fingerprint()


def test_non_finite_statistics_name_the_file_and_the_pairs(stored, tmp_path):
    tensors = _batch(2, 3)
    tensors["tokens"][3, 5] = float("nan")  # the second pair's second token
    tensors["loss"][0] = float("inf")
    with stored.writing("test"):
        pairs = _pairs(tmp_path, ["p4", "p5"])
        stored.bind_pairs("nan", pairs)
        path = stored.save_chunk("nan", pairs, tensors, stored.reference()[2])
    with pytest.raises(NonFiniteStats, match="non-finite values .* for pair\\(s\\) 'p4', 'p5'") as info:
        stored.stored_set("nan")
    assert info.value.path == path and info.value.ids == ["p4", "p5"]
    assert f"Delete {path}" in _advice(info.value) and "overflow" in _advice(info.value)


def test_the_fit_and_the_results_are_checked(stored):
    arrays = {"a": np.arange(3.0)}
    with stored.writing("test"):
        stored.save_fit({"request": 1}, arrays)
        models = os.path.join(stored.path, "fit", "models.safetensors")
        first = open(models, "rb").read()
        stored.save_fit({"request": 2}, {"a": np.arange(3.0) + 1})
        stored.write_metrics("probes", {"auroc": 0.5})
    assert stored.load_fit()[0] == {"request": 2}
    open(models, "wb").write(first)  # the arrays of another fit beside this summary
    with pytest.raises(CorruptFile, match="not the arrays fit/summary.json was written with") as info:
        stored.load_fit()
    assert "gradaudit fit --run RUN" in _advice(info.value, "score")
    assert stored.read_metrics("probes") == {"auroc": 0.5}
    with open(stored.metrics_path("probes"), "a") as f:
        f.write(" ")
    with pytest.raises(CorruptFile, match="metrics.json: does not match its checksum") as info:
        stored.read_metrics("probes")
    assert "gradaudit report --run RUN --set probes" in _advice(info.value, "report")


def test_non_finite_reference_is_refused_before_any_statistics(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    with folder.writing("test"):
        digests = folder.bind_pairs(None, _pairs(tmp_path, ["r0"]))
        folder.save_reference({WEIGHT: torch.full((3, 4), float("nan"))}, ["r0"], [digests["r0"]], complete=True)
    with pytest.raises(NonFiniteStats, match="reference.safetensors: non-finite values") as info:
        folder.reference()
    assert info.value.stage == "reference"


def test_a_deleted_chunk_is_recomputed_without_overwriting_a_later_one(stored, tmp_path):
    os.remove(_chunk(stored, 0))
    with stored.writing("test"):
        stored.save_chunk("probes", _pairs(tmp_path, ["p0", "p1"]), _batch(2, 1), stored.reference()[2])
    assert [os.path.basename(c) for c in stored._chunks("probes")] == ["chunk-000001.safetensors",
                                                                         "chunk-000002.safetensors"]
    assert sorted(stored.stored_set("probes").ids) == ["p0", "p1", "p2", "p3"]


def test_a_set_is_bound_to_the_pairs_it_was_started_from(stored, tmp_path):
    same = _pairs(tmp_path, ["p3", "p2", "p1", "p0"])  # the same pairs in another order: a resume
    with stored.writing("test"):
        assert set(stored.bind_pairs("probes", same)) == {"p0", "p1", "p2", "p3"}
        changed = [
            _pairs(tmp_path, ["p0", "p1", "p2", "p3"], texts=["text of p0", "new text", "text of p2", "text of p3"]),
            same[:3],  # one pair left out
            same + _pairs(tmp_path, ["p4"]),  # one added: another manifest would merge into the set
            [dataclasses.replace(same[0], label=1), *same[1:]],  # relabelled
            [dataclasses.replace(same[0], prompt="Caption:"), *same[1:]],
        ]
        for pairs, differ in zip(changed, ["p1", "p0", "p4", "p3", "p3"]):
            with pytest.raises(ManifestChanged, match=f"set 'probes' was extracted from another manifest "
                                                      f"\\(1 pair\\(s\\) differ, e.g. id '{differ}'\\)"):
                stored.bind_pairs("probes", pairs)
        Image.new("RGB", (4, 4), (1, 2, 3)).save(same[0].image)  # same id, same path, another image
        with pytest.raises(ManifestChanged, match="e.g. id 'p3'") as info:
            stored.bind_pairs("probes", same)
    assert "Use a new set name" in _advice(info.value)
    with pytest.raises(ManifestChanged, match="R was built from another manifest") as info:
        stored.bind_pairs(None, _pairs(tmp_path, ["r0", "r1", "r2"]))
    assert "new run folder" in _advice(info.value, "reference")


def test_chunks_must_hold_the_pairs_of_their_set_once(stored, tmp_path):
    with stored.writing("test"):
        other = _pairs(tmp_path, ["q0", "q1"])
        stored.bind_pairs("other", other)
        stored.save_chunk("other", other, _batch(2, 5), stored.reference()[2])
    shutil.copy(os.path.join(stored.path, "stats", "other", "chunk-000000.safetensors"), _chunk(stored, 2))
    with pytest.raises(ManifestChanged, match="set 'probes' was extracted from another manifest .* id 'q0'"):
        stored.stored_set("probes")
    shutil.copy(_chunk(stored, 0), _chunk(stored, 2))
    with pytest.raises(CorruptFile, match="chunk-000002.safetensors: holds pairs that chunk-000000.safetensors holds"):
        stored.done_ids("probes", stored.reference()[2])


def _set(folder, name, pairs, seed=7):
    with folder.writing("test"):
        folder.bind_pairs(name, pairs)
        folder.save_chunk(name, pairs, _batch(len(pairs), seed), folder.reference()[2])


def test_a_pair_is_its_id_and_its_content(stored, tmp_path):
    """Ids shared with R's pairs or with the fit's reference pairs, under other contents, are refused
    wherever pairs are matched by id: R's leave-one-out (in_ref) and the reference pairs' out-of-fold
    scores."""
    from gradaudit import workflow

    other = tmp_path / "other"
    other.mkdir()
    _set(stored, "impostors", _pairs(other, ["r1", "x"], texts=["not r1", "x"]))
    with pytest.raises(IdCollision, match="set 'impostors' shares ids with the pairs that built R, .*: 'r1'") as info:
        stored.stored_set("impostors")
    assert info.value.ids == ["r1"] and "ids of their own" in _advice(info.value, "score")
    _set(stored, "same", _pairs(tmp_path, ["r1", "p0"]))  # r1 and p0 themselves
    assert stored.stored_set("same").in_ref.tolist() == [True, False]

    _set(stored, "reference_members", _pairs(tmp_path, ["m0", "m1"]))
    _set(stored, "reference_nonmembers", _pairs(tmp_path, ["n0", "n1"]))
    fitted = types.SimpleNamespace(reference_ids=["m0", "m1", "n0", "n1"])
    _set(stored, "probes2", _pairs(other, ["m1", "q"], texts=["another m1", "q"]))
    with pytest.raises(IdCollision, match="set 'probes2' shares ids with the fit's reference pairs, .*: 'm1'"):
        workflow.score(stored.path, "probes2", fitted)
    _set(stored, "probes3", _pairs(tmp_path, ["m1", "n0"]))
    workflow._refuse_other_pairs_under_reference_ids(stored, "probes3", fitted)  # the same pairs: no refusal

    shutil.rmtree(os.path.join(stored.path, "stats", "reference_nonmembers"))  # extracted anew, from other pairs
    _set(stored, "reference_nonmembers", _pairs(other, ["m0"], texts=["another m0"]))
    with pytest.raises(IdCollision, match="set 'reference_nonmembers' shares ids with set 'reference_members'"):
        workflow.fit(stored.path)
