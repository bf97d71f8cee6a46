"""Model families and their registry (floor 3, beside capture): which weights to capture, how pairs become
a batch, where each sample's positions are, and how a model folder is loaded and fingerprinted.

Supported: LLaVA, PaliGemma, Qwen2-VL, Idefics3/SmolVLM (transformers ≥ 5), one image per sample; a family
is one file here that registers its :class:`~gradaudit.models.registry.Architecture`.
"""

from torch import nn

from gradaudit.models import formats, idefics3, llava, paligemma, qwen2_vl  # noqa: F401  (each registers its family)
from gradaudit.models.formats import PromptFormat
from gradaudit.models.layout import Layout, Target
from gradaudit.models.loading import fingerprint, freeze, load_model
from gradaudit.models.registry import ARCHITECTURES, Architecture, architecture
from gradaudit.models.selection import PRESETS, select_targets


def encode_pairs(model: nn.Module, processor, images, prompts, texts, fmt: PromptFormat) -> dict:
    """A batch of tensors for ``model`` in prompt format ``fmt``, with labels on the text tokens and their
    end token only (-100 elsewhere)."""
    return architecture(model).encode(processor, images, prompts, texts, fmt)


def prompt_format(model: nn.Module, processor, stated: str | None) -> PromptFormat:
    """The stated prompt format for ``model``; unstated, the one its processor fixes, if any, else refused."""
    return formats.resolve(stated, processor, architecture(model).native_format)


def batch_layout(model: nn.Module, batch: dict) -> Layout:
    """Where each sample's positions are in ``batch``, per domain."""
    return architecture(model).layout(batch)


__all__ = ["ARCHITECTURES", "Architecture", "Layout", "PRESETS", "Target", "architecture", "batch_layout",
           "PromptFormat", "encode_pairs", "fingerprint", "prompt_format", "freeze", "load_model", "select_targets"]
