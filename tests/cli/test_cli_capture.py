"""`gradaudit layers / reference / extract` end to end on a tiny LLaVA saved to disk."""

import json
import os

import numpy as np
import pytest
import torch

from gradaudit.capture import batch_stats
from gradaudit.cli import main
from gradaudit.models import PromptFormat, batch_layout, encode_pairs, load_model, select_targets
from gradaudit.store.runfolder import RunFolder
from gradaudit.toy.tiny import random_images, tiny_llava
from gradaudit.workflow import load_set

CHAT = PromptFormat("chat-template")  # the tiny models' own format (their chat template)

TEXTS = ["a red square", "two blue circles on grey", "x", "a green triangle at the top", "noise", "one dot"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    for seed in (0, 1):
        model, processor = tiny_llava(seed=seed)
        model.save_pretrained(root / f"model{seed}")
        processor.save_pretrained(root / f"model{seed}")
    (root / "img").mkdir()
    for i, im in enumerate(random_images(len(TEXTS), seed=3)):
        im.save(root / "img" / f"{i}.png")
    for name, idx in (("members", [0, 1, 2]), ("audited", [3, 4, 5, 0])):
        lines = [json.dumps({"id": f"p{i}", "image": f"img/{i}.png", "text": TEXTS[i]}) for i in idx]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _run(*args):
    """The command line; capture commands state the tiny models' prompt format (their chat template)."""
    stated = ["--prompt-format", "chat-template"] if args[0] in ("reference", "extract") else []
    return main([str(a) for a in args] + stated)


def test_layers_lists_the_selection(saved, capsys):
    assert _run("layers", saved / "model0", "--preset", "paper") == 0
    out = capsys.readouterr().out
    assert "model.multi_modal_projector.linear_1.weight" in out and "slices" in out
    assert "vision_tower.encoder.layers.3." not in out


def test_reference_extract_resume_and_refusals(saved, capsys):
    run = saved / "run"
    common = ["--model", saved / "model0", "--run", run, "--batch-size", 2, "--no-progress"]
    assert _run("reference", "--manifest", saved / "members.jsonl", *common, "--no-split") == 0  # all 3 build R
    assert _run("extract", "--manifest", saved / "audited.jsonl", "--set", "audited", *common) == 0
    folder = RunFolder(str(run))
    ids, stats = folder.load_stats("audited")
    assert sorted(ids) == ["p0", "p3", "p4", "p5"] and stats["loss"].shape == (4,)

    # the stored numbers are the engine's on the same pairs
    model, processor = load_model(str(saved / "model0"))
    targets = select_targets(model, "paper")
    refs, n, _ = folder.reference()
    assert n == 3
    norms = folder.reference_norms()
    for name, r in refs.items():
        torch.testing.assert_close(norms[f"{name}|row_sq"], (r.double() ** 2).sum(1).float())
        torch.testing.assert_close(norms[f"{name}|col_sq"], (r.double() ** 2).sum(0).float())
    images = {f"p{i}": im for i, im in enumerate(random_images(len(TEXTS), seed=3))}
    want_ids = ids[:2]
    batch = encode_pairs(model, processor, [images[i] for i in want_ids], ["Describe the image."] * 2,
                               [TEXTS[int(i[1:])] for i in want_ids], CHAT)
    direct = batch_stats(model, batch, batch_layout(model, batch), targets, refs, backend="torch").stats
    name = targets[0].name
    torch.testing.assert_close(stats[f"{name}|row_dot"][:2], direct[name].row_dot, rtol=1e-4, atol=1e-7)

    # the method's view of the same numbers: p0 built R, its leave-one-out cosines differ from the plain ones
    audited = load_set(str(run), "audited")
    set_ids, pairs = audited.ids, audited.pairs
    assert set_ids == ids and pairs.in_ref.tolist() == [i == "p0" for i in ids] and pairs.n_ref == 3
    plain, loo = pairs.cosines(), pairs.cosines(loo=True)
    member = ids.index("p0")
    assert not np.allclose(plain[member], loo[member]) and np.allclose(np.delete(plain, member, 0), np.delete(loo, member, 0))
    stored = folder.stored_set("audited")
    assert stored.loss.shape == (4,) and stored.tokens.shape[1] == 8 and stored.texts == [TEXTS[int(i[1:])] for i in ids]
    assert set(pairs.extra) >= {"loss", "min_k_plus_plus", "gradient_norm"}

    # a crash after the first chunk: the rerun completes the set without duplicates
    chunks = sorted(os.listdir(run / "stats" / "audited"))
    for c in chunks[1:]:
        os.remove(run / "stats" / "audited" / c)
    assert _run("extract", "--manifest", saved / "audited.jsonl", "--set", "audited", *common) == 0
    ids_again, stats_again = folder.load_stats("audited")
    assert sorted(ids_again) == sorted(ids) and len(ids_again) == 4
    assert torch.equal(stats_again["loss"][: len(ids) // 2], stats["loss"][: len(ids) // 2])

    # another model, the same run folder: refused, saying what differs
    other = ["--model", saved / "model1", "--run", run, "--no-progress"]
    assert _run("extract", "--manifest", saved / "audited.jsonl", "--set", "x", *other) == 2
    assert "the model's weights" in capsys.readouterr().err


def test_bad_manifest_stops_before_any_work(saved, capsys):
    bad = saved / "bad.jsonl"
    bad.write_text('{"id": "q", "image": "img/0.png", "text": "ok"}\n{"id": "r", "image": "img/none.png", "text": "t"}\n')
    run = saved / "run_bad"
    assert _run("reference", "--manifest", bad, "--model", saved / "model0", "--run", run, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "image not found" in err
    assert not os.path.exists(run / "reference.safetensors")
    assert _run("reference", "--manifest", bad, "--model", saved / "model0", "--run", run, "--no-progress",
                "--on-error", "skip", "--no-split") == 0
    assert "image not found" in (run / "skipped" / "reference.jsonl").read_text()


def test_help_shows_a_complete_example(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    assert "gradaudit extract --model" in capsys.readouterr().out


def test_adapter_is_part_of_the_fingerprint(saved, capsys):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llava(seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=r".*language_model.*\.q_proj")
    get_peft_model(model, lora).save_pretrained(saved / "adapter")
    assert _run("layers", saved / "model0", "--adapter", saved / "adapter", "--preset", "lora") == 0
    listed = capsys.readouterr().out
    assert "lora_A" in listed and "lora_B" in listed and "mlp" not in listed
    run = saved / "run_lora"
    args = ["--manifest", saved / "members.jsonl", "--run", run, "--no-progress", "--no-split"]
    assert _run("reference", "--model", saved / "model0", "--adapter", saved / "adapter", *args) == 0
    assert _run("reference", "--model", saved / "model0", "--preset", "all-linear", *args) == 2
    assert "the adapter" in capsys.readouterr().err


def test_out_of_memory_halves_the_batch(saved, monkeypatch):
    from gradaudit.capture import passes as pipeline

    real = pipeline.batch_stats
    sizes = []

    def tight(model, batch, *args, **kwargs):
        sizes.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("simulated: no room for more than one pair")
        return real(model, batch, *args, **kwargs)

    run = str(saved / "run_oom")
    opts = dict(batch_size=4, progress=False, prompt_format="chat-template")
    pipeline.run_reference(str(saved / "model0"), str(saved / "members.jsonl"), run, **opts)
    monkeypatch.setattr(pipeline, "batch_stats", tight)
    pipeline.run_extract(str(saved / "model0"), str(saved / "audited.jsonl"), run, "audited", **opts)
    ids, stats = RunFolder(run).load_stats("audited")
    assert sorted(ids) == ["p0", "p3", "p4", "p5"] and sizes[:3] == [4, 2, 1]
    with pytest.raises(ValueError, match="mode must be"):
        pipeline.Options(mode="training")


def test_qwen2_vl_folder_loads_without_torchvision(tmp_path, capsys):
    """Qwen2-VL's own processor wants torchvision for videos: the image processor and tokenizer suffice."""
    from gradaudit.toy.tiny import tiny_qwen2_vl

    model, processor = tiny_qwen2_vl(seed=0)
    model.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    assert _run("layers", tmp_path, "--preset", "paper") == 0
    assert "model.visual.merger" in capsys.readouterr().out


def test_unsupported_architecture_lists_its_weights(tmp_path, capsys):
    from transformers import AutoConfig

    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "llava"
    text = (tmp_path / "config.json").read_text().replace('"model_type": "llava"', '"model_type": "llava_next"')
    (tmp_path / "config.json").write_text(text)
    assert _run("layers", tmp_path) == 2
    err = capsys.readouterr().err
    assert "'llava_next' is not supported yet" in err and "2-D weights" in err and "q_proj.weight" in err


def test_interrupted_reference_pass_resumes_to_the_same_r(saved, monkeypatch):
    from gradaudit.capture import passes as pipeline

    opts = dict(batch_size=1, progress=False, prompt_format="chat-template")
    whole = str(saved / "run_whole")
    pipeline.run_reference(str(saved / "model0"), str(saved / "members.jsonl"), whole, **opts)

    real, calls = pipeline.reference_sums, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = str(saved / "run_interrupted")
    monkeypatch.setattr(pipeline, "reference_sums", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_reference(str(saved / "model0"), str(saved / "members.jsonl"), run, **opts)
    sums, ids, complete = RunFolder(run).load_reference()
    assert len(ids) == 1 and not complete
    monkeypatch.setattr(pipeline, "reference_sums", real)
    pipeline.run_reference(str(saved / "model0"), str(saved / "members.jsonl"), run, **opts)
    got, n, _ = RunFolder(run).reference()
    want, n_whole, _ = RunFolder(whole).reference()
    assert n == n_whole == 3
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8)
