"""The command line on bad options, bad lines, skipped lines and Ctrl-C: one clear message with advice in
its own terms (a flag, or a key of the audit file), never a traceback."""

import csv
import json
import os

import pytest
import torch

from gradaudit.cli import main
from gradaudit.toy.tiny import save_llava_folder

WORDS = ["red", "blue", "green", "small", "large", "square", "circle", "dot", "left", "right", "top", "noise"]


def _run(*args):
    """The command line; capture commands state the tiny model's prompt format (its chat template)."""
    stated = ["--prompt-format", "chat-template"] if args[0] in ("reference", "extract") else []
    return main([str(a) for a in args] + stated)


def _text(i):
    return " ".join(WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 6))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    save_llava_folder(root, n_images=34, image_seed=5)
    return root


def _manifest(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _pair(i, **extra):
    return {"id": f"p{i}", "image": f"img/{i}.png", "text": _text(i), **extra}


@pytest.mark.parametrize("folds,message", [("1", "got 1"), ("0", "got 0"), ("two", "not an integer: 'two'")])
def test_folds_below_two_are_refused(folds, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--run", "runs/none", "--folds", folds])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message,advice", [
    (["reference", "--device", "gpu"], "device must be 'cpu' or 'cuda[:N]'; got 'gpu'", "Use --device cpu"),
    (["reference", "--device", "cuda"], "device 'cuda' needs CUDA", "Use --device cpu"),
    (["extract", "--set", "s", "--pattern", "("], "pattern '(' is not a regular expression", ""),
    (["reference", "--batch-size", "0"], "batch_size must be an integer of at least 1; got 0", ""),
])
def test_bad_options_stop_before_the_model_is_loaded(args, message, advice, tmp_path, capsys, monkeypatch):
    """The model folder does not exist: the options are refused before anything looks for it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = _run(*args, "--model", tmp_path / "absent", "--manifest", tmp_path / "m.jsonl", "--run", tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2 and message in err and advice in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run")


def test_layers_refuses_a_pattern_that_does_not_compile(tmp_path, capsys):
    assert _run("layers", tmp_path, "--pattern", "(") == 2
    assert "gradaudit layers: pattern '(' is not a regular expression" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["reference", "audit"])
def test_ctrl_c_prints_one_line_and_exits_130(command, tmp_path, capsys, monkeypatch):
    from gradaudit import workflow

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "reference", interrupted)
    monkeypatch.setattr(workflow, "run_audit", interrupted)
    config = tmp_path / "audit.toml"
    config.write_text('model = "m"\nrun = "run"\n[data]\nreference_members = "a.jsonl"\n'
                      'reference_nonmembers = "b.jsonl"\nprobes = "c.jsonl"\n')
    args = {"reference": ["reference", "--model", "m", "--manifest", "a.jsonl", "--run", tmp_path / "run"],
            "audit": ["audit", config]}[command]
    assert _run(*args) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [f"gradaudit {command}: interrupted. Run the same command again to resume: what was "
                                "computed is kept."]


def test_skipped_lines_are_counted_with_their_record(saved, capsys):
    bad = _manifest(saved / "skip.jsonl", [_pair(0), _pair(1), {"id": "x", "image": "img/none.png", "text": "t"},
                                           _pair(2), {"id": "y", "image": "img/0.png", "txt": "t"}])
    run = saved / "run_skip_lines"  # not the audit's run_skip below: each its own reference
    common = ["--model", saved / "model", "--run", run, "--no-progress"]
    assert _run("reference", "--manifest", bad, *common, "--on-error", "skip", "--no-split") == 0
    record = run / "skipped" / "reference.jsonl"
    assert f"skipped 2 bad manifest line(s) of set 'reference'; they are listed in {record}" in capsys.readouterr().err
    assert [json.loads(r)["line"] for r in record.read_text().splitlines()] == [3, 5]
    good = _manifest(saved / "good.jsonl", [_pair(0), _pair(1), _pair(2)])
    assert _run("extract", "--manifest", good, "--set", "audited", *common, "--on-error", "skip") == 0
    assert "skipped" not in capsys.readouterr().err  # the reference's record is an earlier command's


def test_images_outside_the_folder_need_the_flag(saved, tmp_path, capsys):
    elsewhere = _manifest(tmp_path / "elsewhere.jsonl", [dict(_pair(i), image=str(saved / "img" / f"{i}.png"))
                                                         for i in range(3)])
    args = ["reference", "--manifest", elsewhere, "--model", saved / "model", "--run", tmp_path / "run", "--no-progress",
            "--no-split"]
    assert _run(*args) == 2
    err = capsys.readouterr().err
    assert "line 1 (id 'p0'): image" in err and "is outside the manifest's folder" in err
    assert "--allow-images-outside" in err and "Traceback" not in err
    assert _run(*args, "--allow-images-outside") == 0


def _audit(saved, name, members, probes, options=""):
    _manifest(saved / f"{name}_members.jsonl", members)
    _manifest(saved / f"{name}_nonmembers.jsonl", [_pair(i) for i in range(16, 28)])  # 2 × 6, collection_test's least
    _manifest(saved / f"{name}_probes.jsonl", probes)
    config = saved / f"{name}.toml"
    config.write_text(f'model = "model"\nrun = "run_{name}"\n[data]\nreference_members = "{name}_members.jsonl"\n'
                      f'reference_nonmembers = "{name}_nonmembers.jsonl"\nprobes = "{name}_probes.jsonl"\n'
                      f'[options]\nfolds = 2\nprompt_format = "chat-template"\n{options}')
    return config


def test_audit_names_the_users_file_and_line_of_a_pair_found_too_long_later(saved, capsys):
    """Too long for the context is found by the capture, in the half of the reference members the audit
    wrote to its run folder: the error still names the user's file and line, and the file's key."""
    members = [_pair(i) for i in range(8)]
    members[4] = _pair(4, text=" ".join(["red"] * 400))  # line 5: among the builders of R
    config = _audit(saved, "long", members, [_pair(i) for i in range(28, 34)])
    assert _run("audit", config, "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"{saved / 'long_members.jsonl'}: 1 bad line(s)" in err and "line 5 (id 'p4'): " in err
    assert "over the context" in err and 'on_error = "skip" in [options]' in err
    assert "manifests" not in err and "--on-error" not in err


def test_audit_skips_bad_lines_reports_them_and_neutralises_ids(saved, capsys):
    """on_error = "skip": every bad line of the user's files is left out and recorded at its own line, the
    command says how many and where; an id that a spreadsheet would run is written as text."""
    members = [_pair(i) for i in range(16)]  # half of the good ones known members: 2-fold fits need 6
    members[4] = _pair(4, text=" ".join(["red"] * 400))  # found by the capture: line 5
    members.insert(6, _pair(99, label=1.0))  # line 7: a float label
    probes = [_pair(i, label=1) for i in range(3)] + [_pair(i, label=0) for i in range(28, 31)]
    probes[1]["id"] = "=HYPERLINK(\"http://x\")"
    probes.append({"id": "far", "image": "../elsewhere.png", "text": "t", "label": 0})  # line 7: outside
    config = _audit(saved, "skip", members, probes, 'on_error = "skip"\n')
    assert _run("audit", config, "--no-progress") == 0
    run = saved / "run_skip"
    err = capsys.readouterr().err
    for name, n in (("reference", 1), ("reference_members", 1), ("probes", 1)):
        assert f"skipped {n} bad manifest line(s) of set '{name}'; they are listed in {run / 'skipped' / name}.jsonl" in err

    def lines(name):
        return [json.loads(r)["line"] for r in (run / "skipped" / f"{name}.jsonl").read_text().splitlines()]

    assert (lines("reference"), lines("reference_members"), lines("probes")) == ([5], [7], [7])
    rows = list(csv.DictReader(open(run / "results" / "probes" / "pairs.csv")))
    assert "'=HYPERLINK(\"http://x\")" in [r["id"] for r in rows] and len(rows) == 6


def test_audit_help_lists_every_option_the_file_accepts(capsys):
    from gradaudit.workflow import AUDIT_OPTIONS, CAPTURE_OPTIONS

    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    text = capsys.readouterr().out
    assert all(f"{key} = " in text for key in (*AUDIT_OPTIONS, *CAPTURE_OPTIONS)), text
    assert "allow_outside = true" in text and "RUN/skipped/<set>.jsonl" in text
