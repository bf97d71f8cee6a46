"""Vision-language models built and trained here (the embedded default): a tokenizer trained on the
corpus, a LLaVA-wired model (CLIP-style tower + Llama-style language model) built from configs, and a
real training loop (AdamW, warm-up and cosine decay, held-out loss per epoch), full or LoRA.
Saved folders load with the ordinary loader (``gradaudit.models.load_model``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from gradaudit.capture.losses import per_sample_text_loss
from gradaudit.models import PromptFormat, encode_pairs
from gradaudit.models.formats import CHAT_TEMPLATE
from gradaudit.store.manifest import Pair

# The shapes of the models trained here: tiny trains on a 2-core CPU in minutes, small (~25M) on a GPU.
# Keys: width, blocks (language; the vision tower has one more, since LLaVA reads its second-to-last
# layer), image size, patch, the trained tokenizer's vocabulary; optional: "vision_blocks", "mlp" (the
# MLP's width over the model's), "max_positions", "special_ids" (pad/bos/eos ids in the text config).
SIZES = {
    "tiny": dict(width=96, blocks=3, image=32, patch=8, vocab=512),
    "small": dict(width=384, blocks=6, image=64, patch=8, vocab=4096),
}


# The prompt format the models here are trained in, LLaVA-1.5's: "USER: <image>\n{prompt} ASSISTANT: {text}</s>".
# It is saved with every model as its chat template, so an audit states prompt_format = "chat-template".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}"
    "{% endfor %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
FORMAT = PromptFormat(CHAT_TEMPLATE)


def build_llava(size: str | dict, tokenizer, seed: int = 0):
    """(model, processor): a LLaVA-wired model of ``size`` (a name in :data:`SIZES`, or a shape with the
    same keys) around ``tokenizer``, its processor carrying :data:`LLAVA_CHAT_TEMPLATE`."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}; got {size!r}")
    s = SIZES[size] if isinstance(size, str) else size
    torch.manual_seed(seed)
    heads, mlp = max(2, s["width"] // 64), s.get("mlp", 4) * s["width"]
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id) if s.get("special_ids", True) else {}
    vision = CLIPVisionConfig(hidden_size=s["width"], intermediate_size=mlp,
                              num_hidden_layers=s.get("vision_blocks", s["blocks"] + 1),
                              num_attention_heads=heads, image_size=s["image"], patch_size=s["patch"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["width"], intermediate_size=mlp,
                       num_hidden_layers=s["blocks"], num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=s.get("max_positions", 512), tie_word_embeddings=False, **ids)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": s["image"]}, crop_size={"height": s["image"], "width": s["image"]})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=s["patch"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


@dataclass
class Recipe:
    """A training recipe; ``lora_rank`` > 0 trains LoRA adapters (α = 2·rank) on the language model only."""

    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of steps
    lora_rank: int = 0
    seed: int = 0


def _loss(model, processor, pairs: list[Pair], device, fmt: PromptFormat = FORMAT) -> torch.Tensor:
    batch = encode_pairs(model, processor, [p.load_image() for p in pairs], [p.prompt for p in pairs],
                         [p.text for p in pairs], fmt)
    labels = batch.pop("labels").to(device)
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
    return per_sample_text_loss(logits, labels).mean()


@torch.no_grad()
def held_out_loss(model, processor, pairs: list[Pair], batch_size: int = 32, device="cpu",
                  fmt: PromptFormat = FORMAT) -> float:
    """Mean per-pair text-token loss on ``pairs`` in format ``fmt`` (eval mode)."""
    model.eval()
    total = 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        total += _loss(model, processor, chunk, device, fmt).item() * len(chunk)
    return total / len(pairs)


def train(model, processor, pairs: list[Pair], recipe: Recipe, held_out: list[Pair] | None = None,
          device="cpu", progress=None, fmt: PromptFormat = FORMAT):
    """Trains ``model`` on ``pairs`` in prompt format ``fmt`` (each epoch a fresh shuffle); returns (model,
    history): per epoch the training loss and, given ``held_out``, the held-out loss. With ``recipe.lora_rank`` the returned model
    is a PEFT model whose adapter is what was trained."""
    if recipe.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * math.ceil(len(pairs) / recipe.batch_size)
    warm = max(1, int(recipe.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(recipe.seed)
    history = []
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(pairs), generator=gen).tolist()
        seen, running = 0, 0.0
        for i in range(0, len(order), recipe.batch_size):
            chunk = [pairs[j] for j in order[i:i + recipe.batch_size]]
            loss = _loss(model, processor, chunk, device, fmt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            running += loss.item() * len(chunk)
            seen += len(chunk)
        row = {"epoch": epoch + 1, "train_loss": running / seen}
        if held_out:
            row["held_out_loss"] = held_out_loss(model, processor, held_out, device=device, fmt=fmt)
        history.append(row)
        if progress:
            progress(row)
    model.eval()
    return model, history


def save(model, processor, folder: str) -> str:
    """save_pretrained of the model (a PEFT model saves its adapter) and the processor."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
