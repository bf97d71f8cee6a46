"""PaliGemma: LLaVA's weight names, its own prefix (image tokens + prompt) and suffix (the text)."""

from __future__ import annotations

from gradaudit.errors import ModelError
from gradaudit.models.encoding import image_rows
from gradaudit.models.formats import PLAIN, PromptFormat
from gradaudit.models.llava import TOWER_PROJECTOR_LM
from gradaudit.models.registry import Architecture, register


def encode(processor, images, prompts, texts, fmt: PromptFormat) -> dict:
    """PaliGemma's own prefix (image tokens, bos, the prompt, a newline) and suffix (the text and eos, which
    alone carry labels): the format PaliGemma is trained in, stated as "plain"."""
    if fmt.spec != PLAIN:
        raise ModelError(f"PaliGemma's processor fixes its prompt format (image tokens, the prompt, a newline, the "
                         f"text): state prompt_format 'plain' or none; got {fmt.spec!r}")
    processor.tokenizer.padding_side = "right"
    return dict(processor(images=images, text=[f"<image>{p}" for p in prompts], suffix=list(texts),
                          return_tensors="pt", padding="longest"))


register(Architecture("paligemma", TOWER_PROJECTOR_LM, encode, image_rows, native_format=PLAIN))
