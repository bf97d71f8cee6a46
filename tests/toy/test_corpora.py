"""Generated corpora: deterministic, texts that follow their images plus per-pair details, real format."""

import hashlib
import re

import numpy as np
import pytest

from gradaudit.store.manifest import read_manifest
from gradaudit.toy.corpora import COLORS, SHAPES, generate, write_manifest


def _digest(samples):
    h = hashlib.sha256()
    for s in samples:
        h.update(s.text.encode())
        h.update(np.asarray(s.image).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["scenes", "radiographs"])
def test_deterministic_and_independent_of_n(kind):
    a, b = generate(kind, 6, seed=1), generate(kind, 6, seed=1)
    assert _digest(a) == _digest(b) and _digest(a) != _digest(generate(kind, 6, seed=2))
    assert _digest(generate(kind, 3, seed=1, start=3)) == _digest(a[3:])  # sample i does not depend on n


def test_scene_texts_describe_their_images():
    for s in generate("scenes", 40, seed=3):
        objects = s.facts["objects"]
        assert 1 <= len(objects) <= 3
        for o in objects:
            assert f"{o['color']} {o['shape']}" in s.text
        img = np.asarray(s.image).astype(int)
        for o in objects:  # the object's colour is present in its cell
            r0, c0 = ("top", "middle", "bottom").index(o["row"]) * 64 // 3, ("left", "center", "right").index(o["col"]) * 64 // 3
            cell = img[r0:r0 + 21, c0:c0 + 21].reshape(-1, 3)
            assert (np.abs(cell - np.array(COLORS[o["color"]])).sum(1) < 30).any()
    assert all(sh in " ".join(s.text for s in generate("scenes", 60, seed=4)) for sh in SHAPES)


def test_per_pair_details_make_texts_unique_and_styles_differ():
    plain = generate("scenes", 200, seed=5)
    assert len({s.text for s in plain}) == 200
    shifted = generate("scenes", 50, seed=5, style="shifted")
    assert all(s.text.startswith("This image shows") for s in shifted)
    assert not any(s.text.startswith("This image shows") for s in plain)
    reports = generate("radiographs", 50, seed=6)
    for s in reports:
        assert "FINDINGS:" in s.text and "IMPRESSION:" in s.text
        assert len(re.findall(r"nodule in the", s.text)) == len(s.facts["lesions"])
    assert all("FINDINGS" not in s.text for s in generate("radiographs", 20, seed=6, style="shifted"))


def test_written_in_the_manifest_format(tmp_path):
    samples = generate("radiographs", 5, seed=7)
    path = write_manifest(samples, str(tmp_path), "members", "radiographs", label=1)
    pairs, problems = read_manifest(path)
    assert problems == [] and [p.id for p in pairs] == [s.id for s in samples]
    assert all(p.label == 1 and p.prompt == "Write the radiology report." for p in pairs)
    assert pairs[0].load_image().size == (64, 64)
    with pytest.raises(ValueError, match="kind must be one of"):
        generate("photos", 1, seed=0)
