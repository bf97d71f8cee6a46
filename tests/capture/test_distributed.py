"""The capture under torchrun on CPUs (gloo, 2 processes; DESIGN.md §7): the same R, the same statistics
and the same chunks as one process, and a group that lost a rank resumes — with the same number of
processes or another — to the same results."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gradaudit.store.runfolder import RunFolder
from gradaudit.toy.tiny import save_llava_folder

N = 14  # pairs: the reference takes 0–7 (half build R), the audited set 8–13
TEXTS = ["a red square", "two blue circles on grey", "x", "a green triangle at the top", "noise", "one dot",
         "three stripes", "an empty frame with a thin border", "a cross", "dots in a row", "a grey field",
         "two lines meeting at the top left corner", "a ring", "a small red square in a large blue one"]
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_llava_folder(root, n_images=N, image_seed=5)
    for name, idx in (("members", range(8)), ("audited", range(8, N))):
        lines = [json.dumps({"id": f"p{i}", "image": f"img/{i}.png", "text": TEXTS[i]}) for i in idx]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _launch(ranks, script=None):
    """The command line that starts ``gradaudit`` (or ``script``, which runs its command line) on ``ranks``
    processes: torchrun, where "--" keeps its parser off the command's options (it would take --run for
    its --run-path)."""
    if ranks == 1 and script is None:
        return [sys.executable, "-m", "gradaudit"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            *([script] if script else ["-m", "gradaudit"]), "--"]


def _gradaudit(root, run, command, *, ranks=1, script=None, env=None, check=True):
    """One capture command (reference, or extract of set 'audited') on ``ranks`` processes."""
    args = [command, "--model", str(root / "model"), "--run", str(root / run), "--batch-size", "2",
            "--prompt-format", "chat-template", "--no-progress"]
    args += ["--manifest", str(root / "members.jsonl")] if command == "reference" else \
        ["--manifest", str(root / "audited.jsonl"), "--set", "audited"]
    launch = _launch(ranks, script)
    environ = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(launch + args, env=environ, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _results(root, run):
    """R (as the statistics pass uses it) with its ids, and each set's ids, statistics and chunk names."""
    folder = RunFolder(str(root / run))
    refs, n, _ = folder.reference()
    _, ids, _ = folder.load_reference()
    sets = {}
    for name in ("reference_members", "audited"):
        set_ids, stats = folder.load_stats(name)
        chunks = sorted(os.listdir(root / run / "stats" / name))
        sets[name] = (set_ids, stats, chunks)
    return refs, ids, sets


def _assert_same(a, b, exact=True):
    refs_a, ids_a, sets_a = a
    refs_b, ids_b, sets_b = b
    assert ids_a == ids_b
    for k in refs_a:
        assert torch.equal(refs_a[k], refs_b[k]), k
    for name in sets_a:
        (i_a, s_a, c_a), (i_b, s_b, c_b) = sets_a[name], sets_b[name]
        assert sorted(i_a) == sorted(i_b)
        order = [i_b.index(pid) for pid in i_a]
        for k in s_a:
            if k == "token_offsets":
                continue
            if s_a[k].shape[0] == len(i_a):  # per pair (token rows are compared through their pairs' order)
                if exact:
                    assert torch.equal(s_a[k], s_b[k][order]), (name, k)
                else:
                    torch.testing.assert_close(s_a[k], s_b[k][order], rtol=1e-5, atol=1e-7)
        if exact:
            assert c_a == c_b and i_a == i_b  # the same chunks, numbered as one process numbers them


@pytest.fixture(scope="module")
def one_process(root):
    _gradaudit(root, "one", "reference")
    _gradaudit(root, "one", "extract")
    return _results(root, "one")


def test_two_processes_write_what_one_writes(root, one_process):
    _gradaudit(root, "two", "reference", ranks=2)
    _gradaudit(root, "two", "extract", ranks=2)
    _assert_same(one_process, _results(root, "two"))
    assert not [f for f in os.listdir(root / "two") if f.startswith("reference-part")]


def test_a_group_that_lost_a_rank_resumes(root, one_process):
    """Rank 1 dies (SIGKILL) after its first partial sums, then after its first chunk; torchrun stops the
    group. The reference resumes in one process (another world size: the parts are folded into R), the
    statistics in two; the results are those of one uninterrupted process."""
    kill = os.path.join(HERE, "kill_rank.py")
    lost = _gradaudit(root, "lost", "reference", ranks=2, script=kill, env={"KILL_RANK": "1", "KILL_AT": "part"},
                      check=False)
    assert lost.returncode != 0
    assert any(f.startswith("reference-part-1") for f in os.listdir(root / "lost")), "rank 1 died before its part"
    _gradaudit(root, "lost", "reference")  # one process: folds the parts, finishes R and reference_members
    assert not [f for f in os.listdir(root / "lost") if f.startswith("reference-part")]

    lost = _gradaudit(root, "lost", "extract", ranks=2, script=kill, env={"KILL_RANK": "1", "KILL_AT": "chunk"},
                      check=False)
    assert lost.returncode != 0
    assert 0 < len(os.listdir(root / "lost" / "stats" / "audited")) - 1 < N - 8  # some chunks, not all (+ pairs.json)
    _gradaudit(root, "lost", "extract", ranks=2)
    # a resumed pass batches the pairs left, so the batches (and padding) differ from the uninterrupted
    # run's: equal within float32 rounding, not bit for bit
    _assert_same(one_process, _results(root, "lost"), exact=False)


def test_an_audit_on_two_processes_says_what_one_process_says(tmp_path):
    """``gradaudit audit`` under torchrun: both ranks capture, rank 0 fits and reports; the metrics are one
    process's."""
    save_llava_folder(tmp_path, n_images=60, image_seed=5)
    for name, idx in (("members", range(24)), ("nonmembers", range(24, 44)), ("probes", range(44, 60))):
        lines = [json.dumps({"id": f"p{i}", "image": f"img/{i}.png", "text": f"text number {i}"}) for i in idx]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    metrics = []
    for ranks in (1, 2):
        config = tmp_path / f"audit{ranks}.toml"
        config.write_text(f'model = "model"\nrun = "run{ranks}"\n[data]\nreference_members = "members.jsonl"\n'
                          'reference_nonmembers = "nonmembers.jsonl"\nprobes = "probes.jsonl"\n[options]\n'
                          'prompt_format = "chat-template"\nbatch_size = 4\nfolds = 2\n')
        done = subprocess.run(_launch(ranks) + ["audit", str(config), "--no-progress"], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("report: ") == 1  # one verdict, from rank 0
        result = json.loads((tmp_path / f"run{ranks}" / "results" / "probes" / "metrics.json").read_text())
        metrics.append({k: v for k, v in result.items() if k not in ("run", "config")})
    assert metrics[0] == metrics[1]
