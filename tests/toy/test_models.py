"""Models built and trained here: the loss falls, LoRA trains only its adapter, the folders load."""

import torch

from gradaudit.store.manifest import read_manifest
from gradaudit.models import load_model, select_targets
from gradaudit.toy.corpora import generate, write_manifest
from gradaudit.toy.models import Recipe, build_llava, held_out_loss, save, train
from gradaudit.toy.tokenizers import train_tokenizer


def _pairs(tmp_path, n, seed, name):
    samples = generate("scenes", n, seed=seed, size=32)
    return read_manifest(write_manifest(samples, str(tmp_path), name, "scenes"))[0]


def test_tiny_model_learns_and_its_lora_adapter_loads(tmp_path):
    train_pairs, held = _pairs(tmp_path, 24, 1, "train"), _pairs(tmp_path, 8, 2, "held")
    tok = train_tokenizer([p.text for p in train_pairs], vocab_size=400)
    assert len(tok) <= 400 and tok.convert_tokens_to_ids("<image>") < len(tok)
    model, processor = build_llava("tiny", tok, seed=0)
    before = held_out_loss(model, processor, held)
    model, history = train(model, processor, train_pairs, Recipe(epochs=3, batch_size=8, lr=3e-3), held_out=held)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["held_out_loss"] < before
    base = save(model, processor, str(tmp_path / "base"))

    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora, hist = train(model, processor, train_pairs[:8], Recipe(epochs=1, batch_size=8, lora_rank=4))
    changed = {n for n, p in lora.named_parameters() if "lora_" not in n
               and not torch.equal(p.detach(), frozen[n.replace("base_model.model.", "").replace(".base_layer", "")])}
    assert not changed  # only the adapter trained
    adapter = save(lora, processor, str(tmp_path / "adapter"))
    loaded, _ = load_model(base, adapter=adapter)
    assert all(".lora_" in t.name for t in select_targets(loaded, "paper"))
