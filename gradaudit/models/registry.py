"""The registry of supported model families: one :class:`Architecture` per ``model_type``, registered
by its family's module (``llava.py``, ``paligemma.py``, ``idefics3.py``, ``qwen2_vl.py``). A new family
is one such file, imported in ``gradaudit/models/__init__.py``."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from gradaudit.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """What GradAudit needs to know of one ``model_type``.

    ``domains``: (domain, regular expression on weight names with a block number as group 1, if any),
    matched in order after a PEFT prefix is stripped. ``encode(processor, images, prompts, texts, fmt)``:
    a batch dict in prompt format ``fmt`` (:class:`gradaudit.models.formats.PromptFormat`) with labels on
    the text tokens and their end token only. ``layout(batch)``: where each sample's positions are
    (:class:`gradaudit.models.layout.Layout`). ``vision_reach(config, n_blocks)``: how many vision blocks
    feed the loss (None: all of them). ``native_format``: the format the family's processor fixes, if it
    does (PaliGemma's prefix and suffix), used when none is stated."""

    model_type: str
    domains: tuple[tuple[str, re.Pattern], ...]
    encode: Callable
    layout: Callable
    vision_reach: Callable | None = None
    native_format: str | None = None

    def vision_blocks_reaching(self, config, n_blocks: int) -> int:
        return n_blocks if self.vision_reach is None else self.vision_reach(config, n_blocks)


ARCHITECTURES: dict[str, Architecture] = {}


def register(*architectures: Architecture) -> None:
    for arch in architectures:
        ARCHITECTURES[arch.model_type] = arch


def architecture(model: nn.Module) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ModelError(f"model_type {model_type!r} is not supported yet (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[model_type]


def tower_projector_lm(vision: str, projector: str, language: str) -> tuple[tuple[str, re.Pattern], ...]:
    """The domains of a vision tower, a projector and a language model from three name prefixes (regular
    expressions); the tower's and the language model's must capture the block number."""
    return (("vision", re.compile(vision)), ("projector", re.compile(projector)), ("language", re.compile(language)))
