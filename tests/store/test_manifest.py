"""Manifest reading: every bad line reported with its number and the policy taken."""

import json

import pytest
from PIL import Image

from gradaudit.store.manifest import ManifestError, batches_by_length, read_manifest, write_pairs


def _write(tmp_path, records):
    img = tmp_path / "imgs"
    img.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img / "ok.png")
    (img / "broken.png").write_bytes(b"not a png at all")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


GOOD = {"id": "a", "image": "imgs/ok.png", "text": "a red square", "label": 1}


def test_good_manifest(tmp_path):
    path = _write(tmp_path, [GOOD, {"id": 7, "image": "imgs/ok.png", "prompt": "Caption:", "text": "x"}])
    pairs, problems = read_manifest(str(path))
    assert problems == [] and [p.id for p in pairs] == ["a", "7"]
    assert pairs[0].label == 1 and pairs[1].label is None and pairs[1].prompt == "Caption:"
    assert pairs[0].line == 1 and pairs[0].load_image().size == (8, 8)


BAD = [
    ("{not json", None, "not valid JSON"),
    ({"image": "imgs/ok.png", "text": "t"}, None, 'missing "id"'),
    ({"id": "a", "image": "imgs/ok.png", "text": "dup"}, "a", "duplicate id"),
    ({"id": "b", "image": "imgs/ok.png", "text": "   "}, "b", 'empty or missing "text"'),
    ({"id": "c", "image": "imgs/missing.png", "text": "t"}, "c", "image not found"),
    ({"id": "d", "image": "imgs/broken.png", "text": "t"}, "d", "image unreadable"),
    ({"id": "e", "image": "imgs/ok.png", "text": "t", "label": 3}, "e", '"label" must be'),
    ({"id": "f", "image": "imgs/ok.png", "text": "t", "label": 1.0}, "f", '"label" must be the integer'),
    ({"id": "g", "image": "imgs/ok.png", "text": "t", "label": True}, "g", '"label" must be the integer'),
    ({"id": "h", "image": "imgs/ok.png", "text": "t", "lable": 1}, "h",
     "unknown key(s) 'lable'; the keys are id, image, prompt, text, label"),
    ({"ID": "i", "image": "imgs/ok.png", "text": "t"}, None, "unknown key(s) 'ID'"),
    ({"id": True, "image": "imgs/ok.png", "text": "t"}, None, 'missing "id"'),
    ('{"id": "j", "image": "imgs/ok.png", "text": "\\ud800"}', "j", 'holds a lone surrogate'),
    ('{"id": "k", "image": "imgs/ok.png", "text": "t", "label": ' + "1" * 5000 + "}", None, "not valid JSON"),
    ("[" * 100_000, None, "not valid JSON"),
    ({"id": "l", "image": "../outside.png", "text": "t"}, "l", "is outside the manifest's folder"),
]


@pytest.mark.parametrize("record,pid,reason", BAD)
def test_each_bad_line_is_named(tmp_path, record, pid, reason):
    path = _write(tmp_path, [GOOD, record])
    with pytest.raises(ManifestError, match="line 2") as info:
        read_manifest(str(path))
    (problem,) = info.value.problems
    assert problem.line == 2 and problem.id == pid and reason in problem.reason
    pairs, problems = read_manifest(str(path), on_error="skip")
    assert [p.id for p in pairs] == ["a"] and len(problems) == 1


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = _write(tmp_path, [GOOD])
    path.write_bytes(path.read_bytes() + b'{"id": "b", "image": "imgs/ok.png", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=f"{path}: 1 bad line") as info:
        read_manifest(str(path))
    assert str(info.value.problems[0]) == "line 2: not UTF-8 text (byte 0xe9 at column 49)"
    assert [p.id for p in read_manifest(str(path), on_error="skip")[0]] == ["a"]


def test_images_outside_the_folder_are_read_only_when_allowed(tmp_path):
    """Absolute paths and paths that climb out with .. are refused by default, naming the line; inside the
    folder an absolute path or one that climbs back in is fine."""
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (4, 4)).save(outside)
    folder = tmp_path / "set"
    folder.mkdir()
    inside = dict(GOOD, id="in", image=str(folder / "imgs" / "ok.png"))
    back_in = dict(GOOD, id="back", image="imgs/../imgs/ok.png")
    records = [GOOD, inside, back_in, dict(GOOD, id="abs", image=str(outside)), dict(GOOD, id="up", image="../elsewhere.png"),
               dict(GOOD, id="sibling", image="../set-b/ok.png")]  # a folder whose name begins like this one's
    path = _write(folder, records)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    assert [(p.line, p.id) for p in info.value.problems] == [(4, "abs"), (5, "up"), (6, "sibling")]
    assert all(f"is outside the manifest's folder {folder}; not read" in p.reason for p in info.value.problems)
    (tmp_path / "set-b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "set-b" / "ok.png")
    pairs, problems = read_manifest(str(path), allow_outside=True)
    assert problems == [] and [p.image for p in pairs[-3:-1]] == [str(outside)] * 2


def test_nothing_usable_or_unreadable_manifest(tmp_path):
    with pytest.raises(ValueError, match="no usable pair"):
        read_manifest(str(_write(tmp_path, ["{broken"])), on_error="skip")
    with pytest.raises(ValueError, match="cannot read the manifest"):
        read_manifest(str(tmp_path / "absent.jsonl"))


def test_derived_manifests_keep_their_pairs_on_the_source_lines(tmp_path):
    """A manifest written from some pairs of another, at their source lines: read back, each pair has the
    line it had in the user's file, so a problem found in it later names that line."""
    records = [dict(GOOD, id=str(i)) for i in range(7)]
    pairs, _ = read_manifest(str(_write(tmp_path, records[:3] + [""] + records[3:])))
    derived = write_pairs(str(tmp_path / "run" / "half.jsonl"), pairs[1::2], at_source_lines=True, id_suffix="~x")
    again, _ = read_manifest(derived, allow_outside=True)
    assert [(p.id, p.line) for p in again] == [("1~x", 2), ("3~x", 5), ("5~x", 7)]
    assert [(p.image, p.text) for p in again] == [(p.image, p.text) for p in pairs[1::2]]


def test_batches_by_length_cover_every_pair_once(tmp_path):
    records = [dict(GOOD, id=str(i), text="w" * (i * 7 % 11 + 1)) for i in range(10)]
    pairs, _ = read_manifest(str(_write(tmp_path, records)))
    batches = list(batches_by_length(pairs, 3))
    assert sorted(p.id for b in batches for p in b) == sorted(p.id for p in pairs)
    assert all(len(b) <= 3 for b in batches)
    spans = [max(len(p.text) for p in b) - min(len(p.text) for p in b) for b in batches]
    assert max(spans) <= 4  # similar lengths together
