"""A model placed by a device map (a model larger than one GPU: DESIGN.md §7) captures what the same model
placed whole captures, bit for bit. On CPUs the split is between the CPU and accelerate's disk offload, where a
layer's weight lives on the meta device between forward passes and is loaded for each: the hooks, R's
slices and the sums must follow where each layer runs, and backward must pass accelerate's hooks."""

import json

import pytest
import torch

from gradaudit.capture import run_extract, run_reference
from gradaudit.errors import OptionError
from gradaudit.models import load_model
from gradaudit.store.runfolder import RunFolder
from gradaudit.toy.tiny import save_llava_folder

OPTS = dict(batch_size=3, progress=False, prompt_format="chat-template")
SPLIT = {"model.vision_tower": "cpu", "model.multi_modal_projector": "disk", "model.language_model.embed_tokens": "cpu",
         "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
         "model.language_model.layers.2": "disk", "model.language_model.layers.3": "cpu",
         "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_map")
    save_llava_folder(root, n_images=10, image_seed=7)
    for name, idx in (("members", range(6)), ("audited", range(6, 10))):
        lines = [json.dumps({"id": f"p{i}", "image": f"img/{i}.png", "text": f"pair {i} " * (i % 3 + 1)}) for i in idx]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_split_model_captures_what_a_whole_one_captures(root, monkeypatch, tmp_path):
    monkeypatch.setenv("GRADAUDIT_CACHE_DIR", str(tmp_path))  # the offload folder
    model = str(root / "model")
    placed, _ = load_model(model, device_map=SPLIT)
    assert placed.model.language_model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # really offloaded
    results = []
    for run, extra in (("whole", {}), ("split", {"device_map": SPLIT})):
        run_reference(model, str(root / "members.jsonl"), str(root / run), **OPTS, **extra)
        run_extract(model, str(root / "audited.jsonl"), str(root / run), "audited", **OPTS, **extra)
        folder = RunFolder(str(root / run))
        results.append((folder.reference()[0], folder.load_stats("audited")))
    (refs_a, (ids_a, stats_a)), (refs_b, (ids_b, stats_b)) = results
    assert refs_a.keys() == refs_b.keys() and ids_a == ids_b
    for k in refs_a:
        assert torch.equal(refs_a[k], refs_b[k]), k
    for k in stats_a:
        assert torch.equal(stats_a[k], stats_b[k]), k


def test_a_device_map_is_checked_before_anything_loads(root):
    with pytest.raises(OptionError, match="device_map must be one of"):
        run_reference(str(root / "model"), str(root / "members.jsonl"), str(root / "bad"), device_map="everywhere", **OPTS)


@pytest.mark.gpu
def test_a_model_split_between_gpu_and_cpu_captures_what_it_captures_whole_on_the_gpu(root):
    """Layers on two devices, the selected ones on both: kernels run where each layer lives (Triton on
    the GPU, the CPU route on the CPU) and R's slices live beside their layers."""
    split = {k: ("cuda:0" if v == "disk" else v) for k, v in SPLIT.items()}
    model = str(root / "model")
    results = []
    for run, extra in (("gpu_whole", {"device": "cuda"}), ("gpu_split", {"device_map": split})):
        run_reference(model, str(root / "members.jsonl"), str(root / run), **OPTS, **extra)
        run_extract(model, str(root / "audited.jsonl"), str(root / run), "audited", **OPTS, **extra)
        folder = RunFolder(str(root / run))
        results.append((folder.reference()[0], folder.load_stats("audited")[1]))
    (refs_a, stats_a), (refs_b, stats_b) = results
    for k in refs_a:
        torch.testing.assert_close(refs_a[k], refs_b[k], rtol=1e-4, atol=1e-7)
    for k in stats_a:
        torch.testing.assert_close(stats_a[k], stats_b[k], rtol=1e-3, atol=1e-6)
