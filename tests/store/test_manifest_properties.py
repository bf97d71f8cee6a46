"""Property: whatever bytes a manifest holds, read_manifest returns checked pairs or raises a GradAudit error
that names the file (and, for bad lines, each line) — never a JSON, Unicode, type or key error."""

import json
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gradaudit.errors import ConfigError, ManifestError
from gradaudit.store.manifest import KEYS, read_manifest

ROOT = tempfile.mkdtemp(prefix="manifest-properties-")
FOLDER = os.path.join(ROOT, "set")
os.makedirs(FOLDER)
Image.new("RGB", (4, 4)).save(os.path.join(FOLDER, "ok.png"))
Image.new("RGB", (4, 4)).save(os.path.join(ROOT, "outside.png"))
with open(os.path.join(FOLDER, "broken.png"), "wb") as f:
    f.write(b"not an image")
IMAGES = ["ok.png", "./ok.png", "broken.png", "missing.png", "../outside.png", os.path.join(ROOT, "outside.png"),
          os.path.join(FOLDER, "ok.png"), "", "sub/../ok.png", "ok.png\x00"]



@pytest.fixture(scope="module", autouse=True)
def _remove_the_folder_afterwards():
    yield
    shutil.rmtree(ROOT)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=6)
field_values = {
    "id": st.one_of(st.text(max_size=6), st.integers(-3, 3), json_values),
    "image": st.one_of(st.sampled_from(IMAGES), json_values),
    "prompt": st.one_of(st.text(max_size=6), json_values),
    "text": st.one_of(st.sampled_from(["a red square", " ", ""]), st.text(max_size=6), json_values),
    "label": st.one_of(st.sampled_from([0, 1, 1.0, True, "1", None, 2]), json_values),
}


@st.composite
def records(draw):
    """A good line's object with up to two keys dropped or set to anything (one may be a key that is
    not one), so that every check of a line is reached."""
    rec = {"id": draw(st.text(min_size=1, max_size=6) | st.integers(0, 99)), "image": "ok.png", "text": "a red square"}
    if draw(st.booleans()):
        rec["label"] = draw(st.sampled_from([0, 1]))
    for key in draw(st.lists(st.sampled_from([*KEYS, "lable", "ID"]), unique=True, max_size=2)):
        if draw(st.booleans()):
            rec.pop(key, None)
        else:
            rec[key] = draw(field_values.get(key, json_values))
    return rec


lines = st.one_of(
    records().map(json.dumps).map(str.encode),
    records().map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8")),
    st.binary(max_size=30),
    st.sampled_from([b"", b"   ", b"{", b"[1]", b'"x"', b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"[" * 3000]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, max_size=6), st.sampled_from([b"\n", b"\r\n", b"\r"]), st.sampled_from(["stop", "skip"]),
       st.booleans())
def test_any_manifest_gives_checked_pairs_or_a_named_error(body, newline, on_error, allow_outside):
    path = os.path.join(FOLDER, "pairs.jsonl")
    data = newline.join(body)
    with open(path, "wb") as f:
        f.write(data)
    n_lines = len(data.splitlines())
    try:
        pairs, problems = read_manifest(path, on_error, allow_outside=allow_outside)
    except ManifestError as exc:
        assert on_error == "stop" and exc.problems and str(exc).startswith(f"{path}: ")
        assert all(1 <= p.line <= n_lines and p.reason for p in exc.problems)
        return
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: no usable pair")
        return
    assert pairs and (on_error == "skip" or not problems)
    assert len({p.id for p in pairs}) == len(pairs) and all(isinstance(p.id, str) and p.id for p in pairs)
    assert all(p.label in (None, 0, 1) and type(p.label) in (type(None), int) for p in pairs)
    assert all(isinstance(p.text, str) and p.text.strip() and isinstance(p.prompt, str) for p in pairs)
    assert all(allow_outside or p.image.startswith(FOLDER + os.sep) for p in pairs)
    assert all(1 <= p.line <= n_lines for p in [*pairs, *problems])
