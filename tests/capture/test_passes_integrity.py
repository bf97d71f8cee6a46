"""The capture passes on a tiny LLaVA refuse to mix pairs: a pass resumes only over the pairs it was
started from (ids and contents), and a pair is the same pair only when its id and content match."""

import json
import os

import pytest

from gradaudit.capture import run_extract, run_reference
from gradaudit.errors import IdCollision, ManifestChanged
from gradaudit.store.runfolder import RunFolder
from gradaudit.toy.tiny import save_llava_folder

TEXTS = ["a red square", "two blue circles on grey", "x", "a green triangle at the top", "noise", "one dot"]
OPTS = dict(batch_size=2, progress=False, prompt_format="chat-template")  # the tiny model's chat template


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    save_llava_folder(root, n_images=len(TEXTS), image_seed=3)
    return root


def _manifest(root, name, idx, texts=TEXTS, ids=None):
    lines = [json.dumps({"id": (ids or {}).get(i, f"p{i}"), "image": f"img/{i}.png", "text": texts[i]}) for i in idx]
    (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / f"{name}.jsonl")


def test_a_pass_resumes_only_over_the_pairs_it_was_started_from(root):
    model, run = str(root / "model"), str(root / "run")
    members = _manifest(root, "members", [0, 1, 2])
    run_reference(model, members, run, **OPTS)
    with pytest.raises(ManifestChanged, match="R was built from another manifest .* e.g. id 'p3'"):
        run_reference(model, _manifest(root, "other_members", [0, 1, 3]), run, **OPTS)
    run_reference(model, members, run, **OPTS)  # the same manifest: complete, nothing to do

    audited = _manifest(root, "audited", [3, 4, 5])
    run_extract(model, audited, run, "audited", **OPTS)
    ids, stats = RunFolder(run).load_stats("audited")
    new_texts = [t.upper() for t in TEXTS]
    with pytest.raises(ManifestChanged, match="set 'audited' was extracted from another manifest \\(3 pair"):
        run_extract(model, _manifest(root, "audited_retexted", [3, 4, 5], texts=new_texts), run, "audited", **OPTS)
    with pytest.raises(ManifestChanged, match="e.g. id 'p0'"):  # another manifest into the same set
        run_extract(model, _manifest(root, "more", [0, 1]), run, "audited", **OPTS)
    again, stats_again = RunFolder(run).load_stats("audited")
    assert again == ids and all((stats[k] == stats_again[k]).all() for k in stats)


def test_deleted_reference_norms_are_computed_anew(root):
    model, run = str(root / "model"), str(root / "run_norms")
    members = _manifest(root, "members", [0, 1, 2])
    run_reference(model, members, run, **OPTS)
    folder = RunFolder(run)
    norms = folder.reference_norms()
    os.remove(folder.reference_norms_path)
    run_reference(model, members, run, **OPTS)
    assert all((norms[k] == v).all() for k, v in folder.reference_norms().items())


def test_an_id_of_r_with_other_content_is_refused(root):
    """A probe whose id is one of R's pairs but whose image and text are others' is not that pair: it
    must not be scored leave-one-out as if it had built R."""
    model, run = str(root / "model"), str(root / "run_ids")
    run_reference(model, _manifest(root, "members", [0, 1, 2]), run, **OPTS)
    impostor = _manifest(root, "impostor", [3, 4], ids={3: "p0"})  # id p0, image and text of pair 3
    with pytest.raises(IdCollision, match="set 'probes' shares ids with the pairs that built R, .*: 'p0'"):
        run_extract(model, impostor, run, "probes", **OPTS)
    run_extract(model, _manifest(root, "probes", [0, 3]), run, "probes_ok", **OPTS)  # p0 itself: the same pair
    stored = RunFolder(run).stored_set("probes_ok")
    assert dict(zip(stored.ids, stored.in_ref.tolist())) == {"p0": True, "p3": False}
