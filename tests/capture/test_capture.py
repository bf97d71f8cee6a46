"""The capture engine against the paper's loop: batch of one, loss.backward(), rows and columns of .grad."""

import pytest
import torch

from gradaudit.capture import batch_stats, per_sample_text_loss, reference_sums
from gradaudit.models import PromptFormat, batch_layout, encode_pairs, freeze, select_targets
from gradaudit.toy.tiny import idefics3_batch, random_images, tiny_idefics3, tiny_llava, tiny_paligemma, tiny_qwen2_vl

PROMPTS = ["Describe the image.", "What is shown?", "Caption:", "Describe the image.", "Say it."]
TEXTS = ["a red square on grey", "two blue circles", "x", "a small green triangle near the top left", "noise"]


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_llava(seed=0)
    freeze(model)
    return model, processor


# each tiny family in a format it takes: LLaVA's chat template, PaliGemma's own, Qwen2-VL's chat layout
FORMATS = {"llava": PromptFormat("chat-template"), "paligemma": PromptFormat("plain"),
           "qwen2_vl": PromptFormat("<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n{text}")}


def _batch(model, processor, idx):
    images = random_images(len(PROMPTS), seed=1)
    return encode_pairs(model, processor, [images[i] for i in idx], [PROMPTS[i] for i in idx], [TEXTS[i] for i in idx],
                        FORMATS[model.config.model_type])


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _paper_loop(model, make_batch, idx, targets, refs):
    """Per sample alone: weight gradients by backward, then each row's and column's statistics."""
    weights = {t.name: t.module.weight for t in targets}
    for w in weights.values():
        w.requires_grad_(True)
    stats = {t.name: {"row_sq": [], "col_sq": [], "row_dot": [], "col_dot": []} for t in targets}
    grads_sum = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in weights.items()}
    try:
        for i in idx:
            batch = _to(make_batch([i]), weights[targets[0].name].device)
            labels = batch.pop("labels")
            for w in weights.values():
                w.grad = None
            per_sample_text_loss(model(**batch).logits, labels)[0].backward()
            for name, w in weights.items():
                g = w.grad.double()
                grads_sum[name] += g
                r = refs[name].double()
                s = stats[name]
                s["row_sq"].append((g * g).sum(1))
                s["col_sq"].append((g * g).sum(0))
                s["row_dot"].append((g * r).sum(1))
                s["col_dot"].append((g * r).sum(0))
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
    return {n: {k: torch.stack(v) for k, v in s.items()} for n, s in stats.items()}, grads_sum


def _engine_equals_paper_loop(model, processor, preset, backend, device, make_batch=None):
    make_batch = make_batch or (lambda idx: _batch(model, processor, idx))
    targets = select_targets(model, preset)
    members, audited = [0, 1, 2], [3, 1, 4, 2]  # audited: padding and mixed lengths in one batch
    batch = _to(make_batch(members), device)
    sums, n = reference_sums(model, [(batch, batch_layout(model, batch))], targets)
    refs = {name: s / n for name, s in sums.items()}

    _, member_grads = _paper_loop(model, make_batch, members, targets, refs)
    for name, s in sums.items():
        torch.testing.assert_close(s.double(), member_grads[name], rtol=1e-4, atol=1e-6)

    batch = _to(make_batch(audited), device)
    assert (batch["attention_mask"] == 0).any(), "the audited batch should hold padding"
    result = batch_stats(model, batch, batch_layout(model, batch), targets, refs, backend=backend)
    got, losses = result.stats, result.losses
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())  # no weight gradients
    want, _ = _paper_loop(model, make_batch, audited, targets, refs)
    assert set(got) == {t.name for t in targets}
    for name in want:
        for key, expected in want[name].items():
            actual = getattr(got[name], key).double()
            assert (actual - expected).abs().le(1e-5 + 1e-4 * expected.abs()).all(), (name, key)
    assert losses.shape == (4,) and torch.isfinite(losses).all()


@pytest.mark.parametrize("preset,backend", [("paper", "cpp"), ("all-linear", "torch")])
def test_engine_equals_paper_loop(llava, preset, backend):
    _engine_equals_paper_loop(*llava, preset, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["paper", "all-linear"])
def test_engine_equals_paper_loop_on_cuda(preset):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, processor = tiny_llava(seed=0)
    _engine_equals_paper_loop(freeze(model).cuda(), processor, preset, "triton", "cuda")


@pytest.mark.parametrize("preset", ["paper", "all-linear"])
def test_paligemma_engine_equals_paper_loop(preset):
    model, processor = tiny_paligemma(seed=3)
    names = [t.name for t in select_targets(freeze(model), preset)]
    assert not any("lm_head" in n for n in names)  # tied to the embedding: excluded
    assert any("vision_tower.encoder.layers.3." in n for n in names)  # SigLIP's last block feeds the projector
    _engine_equals_paper_loop(model, processor, preset, "torch", "cpu")


@pytest.mark.parametrize("preset", ["paper", "all-linear"])
def test_qwen2_vl_engine_equals_paper_loop(preset):
    """Packed vision patches (no batch dimension) and a merger seeing them merged 2×2."""
    model, processor = tiny_qwen2_vl(seed=4)
    names = [t.name for t in select_targets(freeze(model), preset)]
    assert any("visual.merger" in n for n in names) and any("visual.blocks.3." in n for n in names)
    _engine_equals_paper_loop(model, processor, preset, "cpp", "cpu")


@pytest.mark.parametrize("smolvlm", [False, True])
def test_idefics3_engine_equals_paper_loop(smolvlm):
    """Vision rows are crops, a varying number a sample (padding crops dropped); the connector sees them
    pixel-shuffled. Batches built by hand: the image processor needs torchvision, which the CPU machine
    lacks (test_idefics3_through_its_processor runs where it is)."""
    model, tok = tiny_idefics3(seed=5, smolvlm=smolvlm)
    pixels = torch.randn(len(PROMPTS), 2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    pixels[[1, 3], 1] = 0.0  # samples 1 and 3 have one crop, the others two

    def make_batch(idx):
        crops = pixels[idx]
        if len(idx) == 1 and not crops[0, 1].any():
            crops = crops[:, :1]  # alone, a one-crop sample has no padding crop
        return idefics3_batch(tok, crops, [PROMPTS[i] for i in idx], [TEXTS[i] for i in idx])

    names = [t.name for t in select_targets(freeze(model), "paper")]
    assert any("connector" in n for n in names) and any("vision_model.encoder.layers.3." in n for n in names)
    _engine_equals_paper_loop(model, None, "paper", "cpp", "cpu", make_batch)


def test_lora_model_engine_equals_paper_loop():
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_llava(seed=2)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,  # B ≠ 0: A gets gradients
                      target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    model = freeze(get_peft_model(model, lora).eval())
    names = [t.name for t in select_targets(model, "paper")]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert names == [t.name for t in select_targets(model, "lora")]
    _engine_equals_paper_loop(model, processor, "lora", "cpp", "cpu")


def test_adapter_records_its_base_models_token_quantities():
    """With a PEFT adapter, the capture also records the baselines' per-token quantities with the adapter
    switched off: equal to those of the base model alone, and not to the fine-tune's."""
    from peft import LoraConfig, get_peft_model

    from gradaudit.capture.losses import token_quantities

    base, processor = tiny_llava(seed=2)
    batch = _batch(base, processor, [0, 1, 3])
    with torch.no_grad():
        want = token_quantities(base(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])[0]
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=r".*language_model.*\.q_proj")
    model = freeze(get_peft_model(base, lora).eval())
    result = batch_stats(model, batch, batch_layout(model, batch), select_targets(model, "lora"))
    torch.testing.assert_close(result.base_tokens, want)
    assert not torch.allclose(result.tokens, want) and result.tensors()["base_tokens"].shape == want.shape
    plain = batch_stats(base, batch, batch_layout(base, batch), select_targets(base, "paper"))
    assert plain.base_tokens is None and "base_tokens" not in plain.tensors()


def test_paper_preset_picks_the_blocks_that_reach_the_loss(llava):
    model, _ = llava
    names = [t.name for t in select_targets(model, "paper")]
    assert not any(".layers.3." in n for n in names if "vision_tower" in n)  # hidden_states[-2]: block 3 unused
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in names if "vision_tower" in n} == {0, 1, 2}
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in names if "language_model" in n} == {1, 2, 3}
    assert any("multi_modal_projector" in n for n in names)
    assert not any(n.startswith("lm_head") for n in names)
    assert any(n.startswith("lm_head") for n in (t.name for t in select_targets(model, "all-linear")))
    assert all(".q_proj." in n for n in (t.name for t in select_targets(model, "paper", pattern=r"q_proj")))
    with pytest.raises(ValueError, match="picked no weight"):
        select_targets(model, "paper", pattern="nothing-matches")
    with pytest.raises(ValueError, match="needs a model with a LoRA adapter"):
        select_targets(model, "lora")


def test_layer_that_does_not_reach_the_loss_is_refused(llava):
    model, processor = llava
    from gradaudit.models import Target

    last = model.model.vision_tower.encoder.layers[3].mlp.fc2  # after hidden_states[-2]
    targets = [Target("model.vision_tower.encoder.layers.3.mlp.fc2.weight", last, "vision")]
    batch = _batch(model, processor, [0, 1])
    with pytest.raises(ValueError, match="received no gradient"):
        batch_stats(model, batch, batch_layout(model, batch), targets)


def test_token_quantities_by_hand():
    import math

    from gradaudit.capture import token_quantities
    from gradaudit.schema import TOKEN_FIELDS

    p = torch.tensor([0.5, 0.25, 0.25])
    logits = torch.zeros(2, 3, 3)
    logits[0, 1] = p.log() + 7.0  # any shift: softmax is shift-free
    logits[1, 0] = torch.tensor([0.0, 0.0, 0.0])
    labels = torch.tensor([[-100, -100, 1], [-100, 2, -100]])  # position t predicts labels[t + 1]
    values, offsets = token_quantities(logits, labels)
    assert offsets.tolist() == [0, 1, 2] and values.shape == (2, len(TOKEN_FIELDS))
    lp = [math.log(0.5), math.log(0.25), math.log(0.25)]
    mean = sum(pi * li for pi, li in zip(p.tolist(), lp))
    std = math.sqrt(sum(pi * li * li for pi, li in zip(p.tolist(), lp)) - mean**2)
    want = [math.log(0.25), mean, std, 2 * math.log(math.sqrt(0.5) + 1.0), -mean, -math.log(0.375),
            -math.log(0.5), math.log(2.0)]
    torch.testing.assert_close(values[0], torch.tensor(want), rtol=1e-5, atol=1e-6)
    uniform = [-math.log(3)] * 2 + [0.0] + [math.log(3)] * 4 + [0.0]
    torch.testing.assert_close(values[1], torch.tensor(uniform), rtol=1e-5, atol=1e-6)


def _has_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_torchvision(), reason="Idefics3's image processor needs torchvision (run on the GPU machine)")
def test_idefics3_through_its_processor():
    """gradaudit's Idefics3 encoding through the real processor (no image splitting)."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    model, tok = tiny_idefics3(seed=5)
    tok.add_special_tokens({})  # attributes the processor reads:
    tok.image_token, tok.fake_image_token, tok.global_image_token = "<image>", "<fake_token_around_image>", "<global-img>"
    tok.end_of_utterance_token = "<end_of_utterance>"
    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                    max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4)
    _engine_equals_paper_loop(freeze(model), processor, "paper", "torch", "cpu")


def test_chat_template_shapes_the_prompt():
    """Where the processor has a chat template, the conversation comes from it; labels stay on the text and
    what the template puts right after it, if anything."""
    model, processor = tiny_llava(seed=0)
    processor.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    batch = encode_pairs(model, processor, random_images(2), ["Describe.", "Hi"], ["a red square", "x"],
                         PromptFormat("chat-template"))
    tok = processor.tokenizer
    first = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    # jinja's trim_blocks drops the newlines after the loops: this template puts nothing after the
    # assistant's text, so the text alone carries labels
    assert first.startswith("<|user|>") and first.endswith("\nDescribe.<|assistant|>a red square")
    labelled = tok.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert labelled == "a red square"
    _engine_equals_paper_loop(freeze(model), processor, "paper", "torch", "cpu")


def test_per_sample_text_loss_by_a_loop():
    """Mean next-token cross-entropy over each sample's labelled positions, a sample without any giving 0;
    the gradient reaches only the logits that predict a text token."""
    from gradaudit.capture.losses import TextRows

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64).requires_grad_(True)
    labels = torch.full((3, 7), -100)
    labels[0, 2:5] = torch.tensor([1, 4, 9])
    labels[2, 6] = 3  # the last position: predicted by position 5
    losses = per_sample_text_loss(logits, labels)
    want = torch.zeros(3)
    for b in range(3):
        text = [t for t in range(1, 7) if labels[b, t] >= 0]
        for t in text:
            want[b] -= float(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]) / len(text)
    torch.testing.assert_close(losses, want)
    losses.sum().backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert touched.nonzero().tolist() == [[0, 1], [0, 2], [0, 3], [2, 5]]
    rows = TextRows.of(labels)
    assert rows.offsets.tolist() == [0, 3, 3, 4] and rows.target.tolist() == [1, 4, 9, 3]
