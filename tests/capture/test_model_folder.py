"""What a model folder may do: its fingerprint covers every weight and processor file and not its path;
no code in it runs and no pickle in it is read."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradaudit.capture import run_reference
from gradaudit.errors import ModelError, RunMismatch
from gradaudit.models import fingerprint, load_model, select_targets
from gradaudit.toy.tiny import save_llava_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    save_llava_folder(root, "m", n_images=2, image_seed=3)
    (root / "members.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "image": f"img/{i}.png", "text": t}) + "\n" for i, t in enumerate(["a b", "c d"])))
    return root


def _reference(model_dir, root, run):
    return run_reference(str(model_dir), str(root / "members.jsonl"), str(root / run), progress=False,
                         prompt_format="chat-template")


def test_the_same_folder_by_another_path_is_the_same_model(folder, monkeypatch):
    _reference(folder / "m", folder, "run_paths")
    _reference(str(folder / "m") + "/", folder, "run_paths")
    monkeypatch.chdir(folder)
    _reference("m", folder, "run_paths")


def test_a_weight_outside_the_selection_changed_is_another_model(folder, tmp_path):
    changed = tmp_path / "m3"
    shutil.copytree(folder / "m", changed)
    model, _ = load_model(str(changed))
    chosen = {t.name for t in select_targets(model, "paper")}
    weights = load_file(changed / "model.safetensors")
    outside = next(k for k in weights if k.endswith(".weight") and k.removesuffix(".weight") not in chosen
                   and "embed" in k)
    weights[outside] = weights[outside] * 3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    _reference(folder / "m", folder, "run_outside")
    with pytest.raises(RunMismatch, match="the model's weights"):
        _reference(changed, folder, "run_outside")


def test_a_changed_chat_template_is_another_processor(folder, tmp_path):
    changed = tmp_path / "m_tpl"
    shutil.copytree(folder / "m", changed)
    template = next(p for p in os.listdir(changed) if p.startswith("chat_template"))
    (changed / template).write_text((changed / template).read_text().replace("USER: ", "HUMAN: "))
    _reference(folder / "m", folder, "run_template")
    with pytest.raises(RunMismatch, match="processor"):
        _reference(changed, folder, "run_template")


def test_code_in_the_folder_never_runs(folder, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(folder / "m", hostile)
    marker = tmp_path / "ran"
    (hostile / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import *\n")
    config = json.loads((hostile / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel",
                          "AutoProcessor": "evil.EvilProcessor"}
    (hostile / "config.json").write_text(json.dumps(config))
    try:
        load_model(str(hostile))
    except (ModelError, ValueError, OSError):
        pass  # refusing is fine; running the file is not
    assert not marker.exists()


def test_pickled_weights_are_not_read(folder, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(folder / "m", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    os.remove(pickled / "model.safetensors")
    with pytest.raises(ModelError, match="no pickle"):
        load_model(str(pickled))


def test_the_fingerprint_names_no_path(folder):
    model, _ = load_model(str(folder / "m"))
    recorded = json.dumps(fingerprint(model, select_targets(model, "paper")))
    assert str(folder) not in recorded
