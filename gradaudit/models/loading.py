"""Loading a model folder (nothing is fetched), freezing it, and its fingerprint: what stored results
depend on."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from gradaudit.errors import ConfigError, ModelError
from gradaudit.models.layout import Target
from gradaudit.models.registry import ARCHITECTURES


def freeze(model: nn.Module) -> nn.Module:
    """Turns off weight gradients everywhere: backward then computes activation gradients only."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class ImageTextProcessor:
    """An image processor and a tokenizer, where the model's own processor cannot be built."""

    image_processor: object
    tokenizer: object


def _unsupported(model_dir: str, model: nn.Module) -> str:
    """What an unsupported architecture holds: its 2-D weights, and what a supported one needs."""
    weights = [f"  {n}  {tuple(p.shape)}" for n, p in model.named_parameters() if p.dim() == 2]
    shown = "\n".join(weights[:30]) + (f"\n  … and {len(weights) - 30} more" if len(weights) > 30 else "")
    return (f"{model_dir}: model_type {model.config.model_type!r} is not supported yet (supported: "
            f"{', '.join(ARCHITECTURES)}). Capturing needs to know which of its weights belong to the vision "
            f"tower, the projector and the language model, and where each sample's positions are "
            f"(gradaudit.models.registry: one file per family). Its {len(weights)} 2-D weights:\n{shown}")


def _image_text_processor(model_dir: str) -> ImageTextProcessor:
    """The folder's image processor (its class named in preprocessor_config.json, which falls back to
    Pillow without torchvision) and tokenizer."""
    import transformers

    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        kind = json.load(f).get("image_processor_type", "")
    if not hasattr(transformers, kind):
        raise ModelError(f"{model_dir}: cannot build its image processor {kind!r} without torchvision")
    images = getattr(transformers, kind).from_pretrained(model_dir, local_files_only=True)
    return ImageTextProcessor(images, transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: str, *, adapter: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model in eval mode with every weight frozen, processor) from a local folder, with an optional
    PEFT LoRA adapter folder on top; nothing is fetched.

    The ``model_type`` must be one of :data:`ARCHITECTURES`; others raise with the list of what works.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ModelError(f"{model_dir} is not a model folder (no config.json); give a save_pretrained folder")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=DTYPES[dtype])
    if config.model_type not in ARCHITECTURES:
        raise ModelError(_unsupported(model_dir, model))
    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError:  # e.g. Qwen2-VL's video processor needs torchvision; images and text suffice here
        processor = _image_text_processor(model_dir)
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ModelError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        model.gradaudit_adapter_sha256 = _folder_sha256(adapter)
    return freeze(model.to(device).eval()), processor


def _folder_sha256(folder: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            digest.update(name.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def fingerprint(model: nn.Module, targets: list[Target]) -> dict:
    """What stored results depend on: the model's configuration (hash), the selected weights' names,
    shapes and values (a hash of up to 65,536 evenly spaced entries of each, so two trainings of one
    configuration differ)."""
    config = model.config.to_json_string(use_diff=False)
    values = hashlib.sha256()
    for t in targets:
        w = t.module.weight.detach().flatten()
        values.update(w[:: max(1, w.numel() // 65536)].float().cpu().numpy().tobytes())
    return {
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "weights_sha256": values.hexdigest(),
        "adapter_sha256": getattr(model, "gradaudit_adapter_sha256", None),
        "targets": [{"name": t.name, "shape": list(t.module.weight.shape), "domain": t.domain} for t in targets],
    }
