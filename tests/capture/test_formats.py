"""The prompt format: stated, never guessed; labels on the text and its end token only; and the known
members, on a model trained here without a chat template, fit the format it was trained in best."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gradaudit.capture import rank_formats
from gradaudit.capture.losses import per_sample_text_loss
from gradaudit.cli import main
from gradaudit.errors import ConfigError, ModelError
from gradaudit.models import PromptFormat, encode_pairs, prompt_format
from gradaudit.store.manifest import read_manifest
from gradaudit.toy.models import Recipe, train
from gradaudit.toy.tiny import random_images, tiny_llava, tiny_paligemma

CARD = "{image}Describe the card: {text}"  # the training format below: bos, image, words, text, eos
LEGACY = "USER: {image}\n{prompt} ASSISTANT: {text}"  # what the capture used to assume for LLaVA


@pytest.mark.parametrize("spec", ["", "{text}", "{image}{text}{prompt}", "{image}{text} after", "{image}{txt}",
                                  "{image}{image}{text}", "{image}{prompt}{prompt}{text}", "{image}{text", 3])
def test_a_malformed_format_is_refused(spec):
    with pytest.raises(ConfigError):
        PromptFormat(spec)


def _labelled(processor, batch, b):
    labels = batch["labels"][b]
    return processor.tokenizer.decode(labels[labels != -100])


@pytest.mark.parametrize("spec", ["plain", CARD, LEGACY, "chat-template", "{{literal}} {image}{prompt}: {text}"])
def test_only_the_text_and_its_end_token_carry_labels(spec):
    model, processor = tiny_llava(seed=0)
    texts = ["a red square", "x"]
    batch = encode_pairs(model, processor, random_images(2), ["Describe.", "Hi"], texts, PromptFormat(spec))
    for b, text in enumerate(texts):
        assert _labelled(processor, batch, b) == text + "</s>"
    shown = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    if spec == "plain":
        # nothing between the parts; this byte tokenizer adds no bos of its own
        assert shown.startswith("<image>") and shown.endswith("<image>Describe.a red square</s>")
    if spec.startswith("{{"):
        assert "{literal} <image>" in shown and "Describe.: a red square</s>" in shown


def test_an_unstated_format_is_refused_unless_the_processor_fixes_it():
    model, processor = tiny_llava(seed=0)
    with pytest.raises(ConfigError, match="'chat-template' \\(the folder has one\\), 'plain'"):
        prompt_format(model, processor, None)
    processor.chat_template = None
    with pytest.raises(ConfigError, match="'plain', a template"):
        prompt_format(model, processor, None)
    with pytest.raises(ModelError, match="no chat template"):
        encode_pairs(model, processor, random_images(1), ["p"], ["t"], PromptFormat("chat-template"))
    gemma, gemma_processor = tiny_paligemma(seed=0)
    assert prompt_format(gemma, gemma_processor, None).spec == "plain"
    with pytest.raises(ModelError, match="PaliGemma"):
        encode_pairs(gemma, gemma_processor, random_images(1), ["p"], ["t"], PromptFormat(CARD))


@pytest.fixture(scope="module")
def trained_in_card_format(tmp_path_factory):
    """A tiny LLaVA without a chat template, trained in CARD until it knows its 12 members, saved with a
    manifest of its members and one of 12 non-members."""
    root = tmp_path_factory.mktemp("card")
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "square", "circle", "dot", "left", "right", "top", "small", "large", "two"]
    texts = [" ".join(rng.choice(words, 5)) for _ in range(24)]
    (root / "img").mkdir()
    for i, im in enumerate(random_images(24, seed=5)):
        im.save(root / "img" / f"{i}.png")
    for name, span in (("members", range(12)), ("nonmembers", range(12, 24))):
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": f"c{i}", "image": f"img/{i}.png", "prompt": "Describe the card: ", "text": texts[i]}) + "\n"
            for i in span))
    model, processor = tiny_llava(seed=0, width=64, blocks=2)
    processor.chat_template = None
    members = read_manifest(str(root / "members.jsonl"))[0]
    model, _ = train(model, processor, members, Recipe(epochs=60, lr=3e-3, batch_size=12), fmt=PromptFormat(CARD))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root, model, processor


def _loss_auroc(model, processor, root, spec):
    losses, labels = [], []
    for name, label in (("members", 1), ("nonmembers", 0)):
        pairs = read_manifest(str(root / f"{name}.jsonl"))[0]
        batch = encode_pairs(model, processor, [p.load_image() for p in pairs], [p.prompt for p in pairs],
                             [p.text for p in pairs], PromptFormat(spec))
        gold = batch.pop("labels")
        losses += per_sample_text_loss(model(**batch).logits, gold).tolist()
        labels += [label] * len(pairs)
    return roc_auc_score(labels, -np.array(losses))


def test_the_training_format_fits_the_members_best_and_keeps_the_signal(trained_in_card_format):
    root, model, processor = trained_in_card_format
    members = read_manifest(str(root / "members.jsonl"))[0]
    fits = rank_formats(model, processor, members, [LEGACY, CARD, "plain", "chat-template"])
    assert [f.spec for f in fits][:1] == [CARD] and fits[-1].spec == "chat-template" and fits[-1].loss is None
    # "plain" with the manifest's prompt is the same token sequence as CARD here: the two fit alike
    assert abs(fits[1].loss - fits[0].loss) < 1e-3 and fits[1].spec == "plain"
    assert _loss_auroc(model, processor, root, CARD) > _loss_auroc(model, processor, root, LEGACY) + 0.1


def test_the_reference_pass_refuses_an_unstated_format_and_warns_of_a_worse_one(trained_in_card_format, capsys):
    root, _, _ = trained_in_card_format
    common = ["reference", "--model", str(root / "model"), "--manifest", str(root / "members.jsonl"), "--no-progress"]
    assert main(common + ["--run", str(root / "run0")]) == 2
    err = capsys.readouterr().err
    assert "prompt format is not stated" in err and "--prompt-format" in err and "gradaudit formats" in err
    assert not (root / "run0" / "reference.safetensors").exists()
    assert main(common + ["--run", str(root / "run1"), "--prompt-format", LEGACY]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "another prompt format" in err and "'plain'" in err.split("<- stated")[0]
    assert main(common + ["--run", str(root / "run2"), "--prompt-format", CARD]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert main(["formats", "--model", str(root / "model"), "--manifest", str(root / "members.jsonl"),
                 "--prompt-format", LEGACY, "--prompt-format", CARD]) == 0
    table = capsys.readouterr().out.splitlines()
    assert repr(CARD) in table[2] and repr(LEGACY) in table[4]
