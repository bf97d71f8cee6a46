"""Property: whatever an audit file holds, AuditConfig.load returns a checked configuration or raises a
ConfigError naming the file — never a TOML, Unicode, type or key error."""

import datetime
import json
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradaudit.audit.variants import VARIANTS
from gradaudit.capture import Options
from gradaudit.errors import ConfigError
from gradaudit.workflow import AUDIT_OPTIONS, CAPTURE_OPTIONS, KEYS, REQUIRED_SETS, SETS, AuditConfig

FOLDER = tempfile.mkdtemp(prefix="audit-config-properties-")


@pytest.fixture(scope="module", autouse=True)
def _remove_the_folder_afterwards():
    yield
    shutil.rmtree(FOLDER)


scalars = st.one_of(st.text(max_size=8), st.integers(-3, 10), st.booleans(), st.floats(), st.datetimes().map(
    lambda d: d.replace(microsecond=0)), st.lists(st.integers(0, 3), max_size=2))
GOOD = {"model": "model", "run": "run", "adapter": "lora", "preset": "paper", "pattern": "q_proj",
        "method": "loo", "folds": 3, "split_reference": False, "association_test": True, "batch_size": 4,
        "on_error": "skip", "dtype": "bfloat16", "device": "cpu", "backend": "torch", "mode": "train",
        "autocast": "float16", "allow_outside": True, **{k: f"{k}.jsonl" for k in SETS}}
WRONG = {"preset": "papers", "pattern": "(", "method": "auto ", "folds": 1, "split_reference": "no", "batch_size": "8",
         "on_error": "ignore", "device": "gpu", "backend": "cuda", "mode": "training", "autocast": "fp8"}


def _value(draw, key):
    """Mostly the key's good value, sometimes a wrong one of the right type, sometimes anything."""
    kind = draw(st.sampled_from(["good"] * 14 + ["wrong", "any"]))
    if kind == "good" and key in GOOD:
        return GOOD[key]
    if kind == "wrong" and key in WRONG:
        return WRONG[key]
    return draw(scalars)


@st.composite
def tables(draw, keys, required=()):
    """A TOML table: the required keys mostly there, the others now and then, sometimes a misspelt one."""
    chosen = [k for k in keys if draw(st.sampled_from([True] * 7 + [False] if k in required else [True, False]))]
    chosen += draw(st.sampled_from([[]] * 6 + [["batchsize"], ["mdoel"]]))
    return {k: _value(draw, k) for k in chosen}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string, or a TOML error worth meeting
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)  # ints, and floats as TOML spells them too (1.5, 1e+20, nan, inf, -inf)


@st.composite
def documents(draw):
    top = draw(tables([k for k in KEYS if k not in ("data", "options")], required=("model", "run")))
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for name, keys in (("data", SETS), ("options", (*AUDIT_OPTIONS, *CAPTURE_OPTIONS))):
        kind = draw(st.sampled_from(["table"] * 6 + ["absent", "scalar"]))
        if kind == "scalar":
            lines.insert(0, f"{name} = {_toml(draw(scalars))}")
        elif kind == "table":
            lines += [f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in draw(tables(keys, required=SETS)).items()]
    text = "\n".join(lines) + "\n"
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["latin-1", "bytes", "nested"]))
    if encoding == "nested":  # tomllib recurses once per level
        return b"model = " + b"[" * 5000 + b"]" * 5000
    return draw(st.binary(max_size=40)) if encoding == "bytes" else text.encode(encoding, "replace")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_any_audit_file_gives_a_checked_configuration_or_a_named_error(document):
    path = os.path.join(FOLDER, "audit.toml")
    with open(path, "wb") as f:
        f.write(document)
    try:
        cfg = AuditConfig.load(path)
    except ConfigError as exc:
        assert path in str(exc)
        return
    assert os.path.isabs(cfg.model) and os.path.isabs(cfg.run)
    assert set(REQUIRED_SETS) <= set(cfg.data) <= set(SETS)  # known members are optional
    assert all(os.path.isabs(p) for p in cfg.data.values())
    assert set(cfg.options) <= {*AUDIT_OPTIONS, *CAPTURE_OPTIONS}
    values = {key: cfg.option(key) for key in (*AUDIT_OPTIONS, *CAPTURE_OPTIONS)}
    assert type(values["folds"]) is int and values["folds"] >= 2 and values["on_error"] in ("stop", "skip")
    assert all(type(values[k]) is bool for k in ("split_reference", "association_test", "allow_outside"))
    assert values["method"] == "auto" or values["method"] in VARIANTS
    Options.of(**{k: v for k, v in cfg.options.items() if k in CAPTURE_OPTIONS})  # what the capture will take
