"""Which weights an audit captures: presets of the paper, LoRA matrices, every linear weight, or a pattern."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from gradaudit.errors import ConfigError, ModelError
from gradaudit.models.layout import Target
from gradaudit.models.registry import architecture

PRESETS = ("paper", "lora", "all-linear")
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+$")


@dataclass(frozen=True)
class _Candidate:
    """A linear module the selection may keep: its domain, block number (None outside the blocks) and
    whether it is a LoRA matrix."""

    name: str
    module: nn.Linear
    domain: str
    block: int | None
    lora: bool


def _tied(model: nn.Module, head: nn.Linear) -> bool:
    """Whether the output head shares its weight with the input embedding (its gradient is shared)."""
    embed = model.get_input_embeddings()
    return embed is not None and embed.weight.data_ptr() == head.weight.data_ptr()


def _candidates(model: nn.Module, preset: str) -> list[_Candidate]:
    arch = architecture(model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        core = _PEFT_PREFIX.sub("", name)
        if core == "lm_head":
            if preset == "all-linear" and not _tied(model, module):
                found.append(_Candidate(name, module, "language", None, False))
            continue
        for domain, rx in arch.domains:
            m = rx.match(core)
            if m:
                block = int(m.group(1)) if m.groups() else None
                found.append(_Candidate(name, module, domain, block, bool(_LORA.search(core))))
                break
    return found


def select_targets(model: nn.Module, preset: str = "paper", pattern: str | None = None) -> list[Target]:
    """Selected linear weights of a supported model, or of a PEFT LoRA model wrapping one.

    ``paper``: the last 3 language blocks, the last 3 vision blocks that reach the loss, every projector
    weight (docs/method.md); for a LoRA model, its LoRA A and B matrices only. ``lora``: the LoRA A and B
    matrices. ``all-linear``: every linear weight that reaches the loss except a tied output head.
    ``pattern``: a regular expression on parameter names (``….weight``), applied after the preset.
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {PRESETS}; got {preset!r}")
    found = _candidates(model, preset)
    has_lora = any(c.lora for c in found)
    if preset == "lora" and not has_lora:
        raise ModelError("preset 'lora' needs a model with a LoRA adapter; load one with the model")
    lora_only = preset == "lora" or (preset == "paper" and has_lora)
    n_blocks = {d: 1 + max((c.block for c in found if c.domain == d and c.block is not None), default=-1)
                for d in ("vision", "language")}
    reach = architecture(model).vision_blocks_reaching(model.config, n_blocks["vision"])
    keep = []
    for c in found:
        if c.domain == "vision" and c.block >= reach:
            continue  # its output never reaches the loss
        if lora_only and not c.lora:
            continue
        if preset == "paper" and not has_lora and c.block is not None:
            last = reach if c.domain == "vision" else n_blocks[c.domain]
            if c.block < last - 3:
                continue
        weight = f"{c.name}.weight"
        if pattern is not None and not re.search(pattern, weight):
            continue
        keep.append(Target(weight, c.module, c.domain))
    if not keep:
        raise ModelError(f"the selection (preset={preset!r}, pattern={pattern!r}) picked no weight")
    return keep
