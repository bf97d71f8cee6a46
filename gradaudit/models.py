"""Model-side glue: which weights to capture, how pairs become a batch, and how a batch's positions
map to samples — one :class:`Architecture` per supported ``model_type``.

So far LLaVA, PaliGemma, Qwen2-VL and Idefics3/SmolVLM (transformers ≥ 5), one image per sample (for
Idefics3 its crops are that image's rows); others join with their own block structure and layout.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradaudit.capture import Layout, Target

_TOWER_PROJECTOR_LM = (  # weight names of LLaVA-style models (after a PEFT prefix is stripped)
    ("vision", re.compile(r"^model\.vision_tower\..*?layers\.(\d+)\.")),
    ("projector", re.compile(r"^model\.multi_modal_projector\.")),
    ("language", re.compile(r"^model\.language_model\.layers\.(\d+)\.")),
)
PRESETS = ("paper", "lora", "all-linear")


def _tied(model: nn.Module, head: nn.Linear) -> bool:
    """Whether the output head shares its weight with the input embedding (its gradient is shared)."""
    embed = model.get_input_embeddings()
    return embed is not None and embed.weight.data_ptr() == head.weight.data_ptr()


def _llava_vision_reach(config, n_layers: int) -> int:
    """How many vision-encoder blocks feed the projector: LLaVA reads hidden_states[vision_feature_layer]
    (index 0 is the embeddings), so with -2 the last block's output is never used."""
    layer = config.vision_feature_layer
    layer = max(layer) if isinstance(layer, (list, tuple)) else layer
    return layer if layer >= 0 else n_layers + 1 + layer


_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+$")


def select_targets(model: nn.Module, preset: str = "paper", pattern: str | None = None) -> list[Target]:
    """Selected linear weights of a supported model, or of a PEFT LoRA model wrapping one.

    ``paper``: the last 3 language blocks, the last 3 vision blocks that reach the loss, every projector
    weight (DESIGN.md §2.1); for a LoRA model, its LoRA A and B matrices only. ``lora``: the LoRA A and B
    matrices. ``all-linear``: every linear weight that reaches the loss except a tied output head.
    ``pattern``: a regular expression on parameter names (``….weight``), applied after the preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}; got {preset!r}")
    arch = architecture(model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        core = _PEFT_PREFIX.sub("", name)
        if core == "lm_head":
            if preset == "all-linear" and not _tied(model, module):
                found.append((name, module, "language", None, False))
            continue
        for domain, rx in arch.domains:
            m = rx.match(core)
            if m:
                block = int(m.group(1)) if m.groups() else None
                found.append((name, module, domain, block, bool(_LORA.search(core))))
                break
    has_lora = any(lora for *_, lora in found)
    if preset == "lora" and not has_lora:
        raise ValueError("preset 'lora' needs a model with a LoRA adapter (load it with --adapter)")
    lora_only = preset == "lora" or (preset == "paper" and has_lora)
    n_blocks = {d: 1 + max((b for _, _, dd, b, _ in found if dd == d and b is not None), default=-1)
                for d in ("vision", "language")}
    reach = arch.vision_reach(model.config, n_blocks["vision"])
    keep = []
    for name, module, domain, block, lora in found:
        if domain == "vision" and block >= reach:
            continue  # its output never reaches the loss
        if lora_only and not lora:
            continue
        if preset == "paper" and not has_lora and block is not None:
            last = reach if domain == "vision" else n_blocks[domain]
            if block < last - 3:
                continue
        weight = f"{name}.weight"
        if pattern is not None and not re.search(pattern, weight):
            continue
        keep.append(Target(weight, module, domain))
    if not keep:
        raise ValueError(f"the selection (preset={preset!r}, pattern={pattern!r}) picked no weight")
    return keep


def _image_rows(batch: dict) -> Layout:
    """Language rows are samples (padding masked); vision and projector rows are images, in sample order.

    ``pixel_values`` (B, 3, H, W) holds one image per sample; (B, N, 3, H, W) (Idefics3) up to N, an
    all-zero image being padding, which the model drops as this layout does.
    """
    n_samples = batch["input_ids"].shape[0]
    pixels = batch["pixel_values"]
    if pixels.dim() == 5:
        per_sample = (pixels != 0).flatten(2).any(-1).sum(1).cpu()
        image_rows = torch.repeat_interleave(torch.arange(n_samples), per_sample)
    elif pixels.shape[0] == n_samples:
        image_rows = torch.arange(n_samples)
    else:
        raise ValueError(f"this architecture's batches need one image per sample; got {pixels.shape[0]} images "
                         f"for {n_samples} samples")
    return Layout(
        num_samples=n_samples,
        keep={"language": batch["attention_mask"].bool().cpu(), "vision": None, "projector": None},
        row_sample={"language": torch.arange(n_samples), "vision": image_rows, "projector": image_rows},
    )


def _chat_heads(templated, prompts, default: str) -> list[str]:
    """The user turn (an image, then the prompt) and the assistant's cue, through the chat template of
    ``templated`` (a processor or tokenizer) where it has one, else ``default`` formatted with the prompt."""
    if not getattr(templated, "chat_template", None):
        return [default.format(prompt=p) for p in prompts]
    return [templated.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
        add_generation_prompt=True, tokenize=False) for p in prompts]


def _joined(heads, texts, end: str) -> list[str]:
    return [f"{h}{'' if h.endswith((' ', chr(10))) else ' '}{t}{end}" for h, t in zip(heads, texts)]


def _text_labels(batch: dict, head_lens) -> dict:
    """Labels = input ids, -100 on padding and on each sample's first ``head_lens[b]`` positions."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for b, n in enumerate(head_lens):
        labels[b, : int(n)] = -100
    batch["labels"] = labels
    return batch


def _encode_turns(processor, images, prompts, texts, *, default: str, nest_images: bool = False) -> dict:
    """The chat template's user turn (or ``default``), then the text and the end token, which alone carry
    labels; right padding, so every sample keeps the positions it has alone. ``nest_images``: the
    processor takes a list of images per sample (Idefics3)."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    heads = _chat_heads(processor, prompts, default)
    images = [[im] for im in images] if nest_images else images
    batch = dict(processor(images=images, text=_joined(heads, texts, tok.eos_token), return_tensors="pt",
                           padding=True))
    return _text_labels(batch, processor(images=images, text=heads, return_tensors="pt",
                                         padding=True)["attention_mask"].sum(1))


_encode_llava = functools.partial(_encode_turns, default="USER: <image>\n{prompt} ASSISTANT:")
_encode_idefics3 = functools.partial(_encode_turns, default="User:<image>{prompt}<end_of_utterance>\nAssistant:",
                                     nest_images=True)


def _encode_paligemma(processor, images, prompts, texts) -> dict:
    """PaliGemma's own prefix (image tokens + prompt) and suffix (the text, which carries the labels)."""
    processor.tokenizer.padding_side = "right"
    return dict(processor(images=images, text=[f"<image>{p}" for p in prompts], suffix=list(texts),
                          return_tensors="pt", padding="longest"))


_IDEFICS3 = (
    ("vision", re.compile(r"^model\.vision_model\.encoder\.layers\.(\d+)\.")),
    ("projector", re.compile(r"^model\.connector\.")),
    ("language", re.compile(r"^model\.text_model\.layers\.(\d+)\.")),
)
_QWEN2_VL = (
    ("vision", re.compile(r"^model\.visual\.blocks\.(\d+)\.")),
    ("projector", re.compile(r"^model\.visual\.merger\.")),
    ("language", re.compile(r"^model\.language_model\.layers\.(\d+)\.")),
)


def _encode_qwen2_vl(processor, images, prompts, texts) -> dict:
    """Qwen2-VL's chat layout, built from the processor's image processor and tokenizer (its video
    processor, which needs torchvision, is not used): image pads expanded to the merged patch count."""
    tok, images_proc = processor.tokenizer, processor.image_processor
    tok.padding_side = "right"
    pixels = images_proc(images=images, return_tensors="pt")
    merged = (pixels["image_grid_thw"].prod(-1) // images_proc.merge_size**2).tolist()
    default = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
    heads = [h.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
             for h, n in zip(_chat_heads(processor if getattr(processor, "chat_template", None) else tok,
                                         prompts, default), merged)]
    batch = dict(tok(_joined(heads, texts, "<|im_end|>"), return_tensors="pt", padding=True))
    batch.update(pixels)
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    batch["mm_token_type_ids"] = (batch["input_ids"] == image_token).long()
    return _text_labels(batch, [len(tok(h)["input_ids"]) for h in heads])


def _qwen2_vl_layout(batch: dict) -> Layout:
    """Qwen2-VL packs every image's patches into one sequence; the merger sees them merged 2×2."""
    n_samples = batch["input_ids"].shape[0]
    thw = batch["image_grid_thw"]
    if thw.shape[0] != n_samples:
        raise ValueError(f"one image per sample is supported; got {thw.shape[0]} images for {n_samples} samples")
    patches = thw.prod(-1).cpu()
    merged = (batch["mm_token_type_ids"] == 1).sum(1).cpu()  # merged image tokens per sample

    def spans(counts):
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts.to(torch.int64), 0)])

    return Layout(
        num_samples=n_samples,
        keep={"language": batch["attention_mask"].bool().cpu()},
        row_sample={"language": torch.arange(n_samples)},
        flat_offsets={"vision": spans(patches), "projector": spans(merged)},
    )


@dataclass(frozen=True)
class Architecture:
    """What GradAudit needs to know of one ``model_type``: its weights' domains (regular expressions on
    names, a block number as group 1), how many vision blocks reach the loss, how to encode pairs, and
    where each sample's positions are in a batch."""

    model_type: str
    domains: tuple
    vision_reach: Callable
    encode: Callable
    layout: Callable


ARCHITECTURES = {
    "llava": Architecture("llava", _TOWER_PROJECTOR_LM, _llava_vision_reach, _encode_llava, _image_rows),
    "paligemma": Architecture("paligemma", _TOWER_PROJECTOR_LM, lambda config, n: n, _encode_paligemma,
                              _image_rows),
    "idefics3": Architecture("idefics3", _IDEFICS3, lambda config, n: n, _encode_idefics3, _image_rows),
    "smolvlm": Architecture("smolvlm", _IDEFICS3, lambda config, n: n, _encode_idefics3, _image_rows),
    "qwen2_vl": Architecture("qwen2_vl", _QWEN2_VL, lambda config, n: n, _encode_qwen2_vl, _qwen2_vl_layout),
}


def architecture(model: nn.Module) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported yet (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[model_type]


def encode_pairs(model: nn.Module, processor, images, prompts, texts) -> dict:
    """A batch of tensors for ``model`` with labels on the text tokens only (-100 elsewhere)."""
    return architecture(model).encode(processor, images, prompts, texts)


def batch_layout(model: nn.Module, batch: dict) -> Layout:
    """Where each sample's positions are in ``batch``, per domain."""
    return architecture(model).layout(batch)


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
            f"(gradaudit.models.ARCHITECTURES). Its {len(weights)} 2-D weights:\n{shown}")


def _image_text_processor(model_dir: str) -> ImageTextProcessor:
    """The folder's image processor (its class named in preprocessor_config.json, which falls back to
    Pillow without torchvision) and tokenizer."""
    import json

    import transformers

    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        kind = json.load(f).get("image_processor_type", "")
    if not hasattr(transformers, kind):
        raise ValueError(f"{model_dir}: cannot build its image processor {kind!r} without torchvision")
    images = getattr(transformers, kind).from_pretrained(model_dir, local_files_only=True)
    return ImageTextProcessor(images, transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: str, *, adapter: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model in eval mode with every weight frozen, processor) from a local folder, with an optional
    PEFT LoRA adapter folder on top; nothing is fetched.

    The ``model_type`` must be one of :data:`ARCHITECTURES`; others raise with the list of what works.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from gradaudit.capture import freeze

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir} is not a model folder (no config.json); give a save_pretrained folder")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=DTYPES[dtype])
    if config.model_type not in ARCHITECTURES:
        raise ValueError(_unsupported(model_dir, model))
    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError:  # e.g. Qwen2-VL's video processor needs torchvision; images and text suffice here
        processor = _image_text_processor(model_dir)
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ValueError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
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
