"""The audit file and its manifests are checked before any work: every key, type and value of the TOML file,
then every line of the three manifests, each error naming the user's own file and key or line."""

import json
import os

import pytest
from PIL import Image

from gradaudit.errors import ConfigError, ManifestError, ManifestsError, OptionError
from gradaudit.workflow import AuditConfig, run_audit

HEAD = 'model = "model"\nrun = "run"\n'
DATA = '[data]\nreference_members = "m.jsonl"\nreference_nonmembers = "n.jsonl"\nprobes = "p.jsonl"\n'


def _config(tmp_path, text):
    path = tmp_path / "audit.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize("text,error,message", [
    (HEAD + DATA + '[options]\nsplit_reference = "no"\n', OptionError,
     "[options] split_reference must be true or false; got 'no'"),
    (HEAD + DATA + "[options]\nassociation_test = 1\n", OptionError, "association_test must be true or false"),
    (HEAD + DATA + "[options]\nbatchsize = 8\n", ConfigError,
     "unknown [options] key(s) ['batchsize']; the keys are method, folds, split_reference, association_test, "
     "batch_size, on_error"),
    (HEAD + DATA + '[options]\nbatch_size = "8"\n', OptionError,
     "[options] batch_size must be an integer of at least 1; got '8'"),
    (HEAD + DATA + "[options]\nfolds = 1\n", OptionError, "[options] folds must be an integer of at least 2"),
    (HEAD + DATA + "[options]\nfolds = 0\n", OptionError, "[options] folds must be an integer of at least 2"),
    (HEAD + DATA + '[options]\nfolds = "5"\n', OptionError, "folds must be an integer"),
    (HEAD + DATA + '[options]\nmethod = ["loo"]\n', OptionError, "[options] method must be 'auto' or one of"),
    (HEAD + DATA + '[options]\nadapter = "a"\n', ConfigError, "unknown [options] key(s) ['adapter']"),
    (HEAD + DATA + '[options]\ndevice = "gpu"\n', OptionError, "[options] device must be 'cpu' or 'cuda[:N]'"),
    (HEAD + DATA + '[options]\nallow_outside = "yes"\n', OptionError, "[options] allow_outside must be true or false"),
    (HEAD + 'pattern = "("\n' + DATA, OptionError, ": pattern '(' is not a regular expression"),
    (HEAD + "preset = 3\n" + DATA, OptionError, ": preset must be a non-empty string; got 3"),
    ('model = 5\nrun = "run"\n' + DATA, OptionError, ": model must be a non-empty string; got 5"),
    ('model = "m"\nrun = ""\n' + DATA, OptionError, ": run must be a non-empty string"),
    (HEAD + DATA + "extra = 'x.jsonl'\n", ConfigError, "unknown [data] key(s) ['extra']"),
    (HEAD + DATA.replace('"p.jsonl"', "[1]"), OptionError, "data.probes must be a non-empty string; got [1]"),
    (HEAD + 'data = "d"\n', ConfigError, "data must be a table ([data]); got 'd'"),
    (HEAD + DATA + "options = 3\n", ConfigError, "unknown [data] key(s) ['options']"),  # TOML reads data.options
    (HEAD + "options = 3\n" + DATA, ConfigError, "options must be a table ([options]); got 3"),
    (HEAD + "mdoel = 'x'\n" + DATA, ConfigError, "unknown key(s) ['mdoel']; the keys are model, run, data"),
    (b'model = "caf\xe9"\n', ConfigError, "cannot read the audit configuration"),
    ("model = \n", ConfigError, "cannot read the audit configuration"),
    ("model = " + "[" * 5000 + "]" * 5000 + "\n", ConfigError, "cannot read the audit configuration"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, error, message):
    path = _config(tmp_path, text)
    with pytest.raises(error) as info:
        AuditConfig.load(path)
    assert message in str(info.value) and path in str(info.value)


def test_a_good_file_resolves_paths_and_reads_options_with_defaults(tmp_path):
    path = _config(tmp_path, HEAD + 'adapter = "/abs/lora"\n' + DATA + "[options]\nfolds = 3\nallow_outside = true\n")
    cfg = AuditConfig.load(path)
    assert cfg.model == str(tmp_path / "model") and cfg.adapter == "/abs/lora" and cfg.data["probes"] == str(tmp_path / "p.jsonl")
    assert (cfg.option("folds"), cfg.option("allow_outside"), cfg.option("split_reference"), cfg.option("on_error")) == (
        3, True, True, "stop")


def _manifests(tmp_path, bad=(), n=6):
    """Three manifests of n good lines each over one image; ``bad``: (file, line text) appended."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    for name, prefix in (("m", "m"), ("n", "n"), ("p", "p")):
        lines = [json.dumps({"id": f"{prefix}{i}", "image": "ok.png", "text": "a red square"}) for i in range(n)]
        lines += [text for file, text in bad if file == name]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_the_audit_reads_every_manifest_before_loading_the_model(tmp_path):
    """Bad lines in two manifests: one error names both files and their own lines, and nothing was
    loaded (the model folder does not even exist) or written (no run folder)."""
    _manifests(tmp_path, bad=[("m", json.dumps({"id": "x", "image": "ok.png", "text": "t", "lable": 1})),
                              ("p", json.dumps({"id": "y", "image": "/etc/hostname", "text": "t"}))])
    path = _config(tmp_path, HEAD + DATA)
    with pytest.raises(ManifestsError) as info:
        run_audit(path)
    text = str(info.value)
    assert f"{tmp_path / 'm.jsonl'}: 1 bad line(s)" in text and "line 7 (id 'x'): unknown key(s) 'lable'" in text
    assert f"{tmp_path / 'p.jsonl'}: 1 bad line(s)" in text and "line 7 (id 'y'): image '/etc/hostname' is outside" in text
    assert [e.path for e in info.value.errors] == [str(tmp_path / "m.jsonl"), str(tmp_path / "p.jsonl")]
    assert not os.path.exists(tmp_path / "run")


def test_one_bad_manifest_raises_its_own_error(tmp_path):
    _manifests(tmp_path, bad=[("n", "{broken")])
    with pytest.raises(ManifestError) as info:
        AuditConfig.load(_config(tmp_path, HEAD + DATA)).check_manifests()
    assert type(info.value) is ManifestError and info.value.path == str(tmp_path / "n.jsonl")
    assert info.value.problems[0].line == 7


def test_images_outside_are_read_when_the_file_allows_them(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "img.png")
    folder = tmp_path / "audit"
    folder.mkdir()
    _manifests(folder, bad=[("p", json.dumps({"id": "y", "image": "../elsewhere/img.png", "text": "t"}))])
    with pytest.raises(ManifestError, match="is outside the manifest's folder"):
        AuditConfig.load(_config(folder, HEAD + DATA)).check_manifests()
    AuditConfig.load(_config(folder, HEAD + DATA + "[options]\nallow_outside = true\n")).check_manifests()


def test_what_a_split_or_an_association_test_needs_is_checked_first(tmp_path):
    _manifests(tmp_path, n=3)
    with pytest.raises(ConfigError, match=r"m.jsonl: splitting the reference members needs at least 4 pairs; got 3"):
        run_audit(_config(tmp_path, HEAD + DATA))
    with pytest.raises(ConfigError, match=r"p.jsonl: association_test needs at least 2 probes labelled 1"):
        lines = [json.dumps({"id": f"q{i}", "image": "ok.png", "text": "t", "label": 0}) for i in range(3)]
        (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
        run_audit(_config(tmp_path, HEAD + DATA + "[options]\nsplit_reference = false\nassociation_test = true\n"))
    assert not os.path.exists(tmp_path / "run")
