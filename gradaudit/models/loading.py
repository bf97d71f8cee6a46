"""Loading a model folder (nothing is fetched, no code from the folder runs, no pickle is read), freezing
it, and its fingerprint: what stored results depend on."""

from __future__ import annotations

import glob
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


def load_model(model_dir: str, *, adapter: str | None = None, dtype: str = "float32", device: str = "cpu",
               device_map: str | dict | None = None):
    """(model in eval mode with every weight frozen, processor) from a local folder, with an optional
    PEFT LoRA adapter folder on top; nothing is fetched.

    ``device_map`` (for a model larger than one GPU): placed by accelerate across the machine's devices
    instead of onto ``device`` — "auto", "balanced", "balanced_low_0", "sequential", or a dict of module
    names to devices ("cpu", "cuda:N", or "disk": loaded from an offload folder for each forward). Each
    layer then runs where it lives; :func:`input_device` says where a batch goes in.

    The ``model_type`` must be one of :data:`ARCHITECTURES`; others raise with the list of what works.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ModelError(f"{model_dir} is not a model folder (no config.json); give a save_pretrained folder")
    # The folder may come from the party being audited: its Python files never run (trust_remote_code=False
    # is given, so transformers neither asks nor imports them) and only safetensors weights load.
    safe = dict(local_files_only=True, trust_remote_code=False)
    if not glob.glob(os.path.join(model_dir, "*.safetensors")):
        raise ModelError(f"{model_dir} holds no .safetensors weights; GradAudit reads no pickle files (.bin, .pt), "
                         "which can run code: convert them with save_pretrained(safe_serialization=True)")
    config = AutoConfig.from_pretrained(model_dir, **safe)
    if config.model_type not in ARCHITECTURES:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, **safe, use_safetensors=True, dtype=DTYPES[dtype])
        raise ModelError(_unsupported(model_dir, model))
    placed = {} if device_map is None else dict(device_map=device_map, offload_folder=_offload_folder(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **safe, use_safetensors=True, dtype=DTYPES[dtype],
                                                        **placed)
    model.gradaudit_files_sha256 = files_sha256(model_dir)
    try:
        processor = AutoProcessor.from_pretrained(model_dir, **safe)
    except ImportError:  # e.g. Qwen2-VL's video processor needs torchvision; images and text suffice here
        processor = _image_text_processor(model_dir)
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ModelError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        model.gradaudit_files_sha256 = model.base_model.model.gradaudit_files_sha256
        model.gradaudit_adapter_sha256 = files_sha256(adapter, weights_only=False)
    return freeze((model if device_map is not None else model.to(device)).eval()), processor


def _offload_folder(model_dir: str) -> str:
    """Where weights a device map puts on "disk" are kept: the cache folder, one per model folder."""
    key = hashlib.sha256(os.path.realpath(model_dir).encode()).hexdigest()[:16]
    return os.path.join(os.environ.get("GRADAUDIT_CACHE_DIR", os.path.expanduser("~/.cache/gradaudit")), "offload", key)


def input_device(model: nn.Module) -> torch.device:
    """Where a batch goes in: the device of the input embedding (a model placed by a device map runs
    each layer where it lives, and accelerate's hooks move activations between them)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta":  # offloaded to disk: accelerate runs it on its execution device
        hook = getattr(model.get_input_embeddings(), "_hf_hook", None)
        return torch.device(getattr(hook, "execution_device", None) or "cpu")
    return weight.device


def _file_sha256(path: str) -> str:
    """A file's sha256, streamed; kept in the cache folder by (path, size, modification time), so a large
    checkpoint is hashed once."""
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    cache = os.path.join(os.environ.get("GRADAUDIT_CACHE_DIR", os.path.expanduser("~/.cache/gradaudit")), "sha256")
    cached = os.path.join(cache, key)
    if os.path.exists(cached):
        with open(cached) as f:
            return f.read().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    try:
        os.makedirs(cache, exist_ok=True)
        with open(f"{cached}.tmp-{os.getpid()}", "w") as f:
            f.write(digest.hexdigest())
        os.replace(f"{cached}.tmp-{os.getpid()}", cached)
    except OSError:  # a read-only home: hash again next time
        pass
    return digest.hexdigest()


# what a model folder's results depend on besides config.json: the weights, and the processor's files
_PROCESSOR_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                    "*preprocessor_config.json", "processor_config.json", "chat_template*")


def files_sha256(folder: str, weights_only: bool = True) -> dict[str, str]:
    """{file name: sha256} of a model folder's weights (*.safetensors) and processor files — or, with
    ``weights_only=False``, of every file in it (an adapter folder). Names, not paths: the same folder
    reached by another path has the same hashes."""
    names = sorted(os.listdir(folder)) if not weights_only else sorted(
        {os.path.basename(p) for pattern in ("*.safetensors", *_PROCESSOR_FILES)
         for p in glob.glob(os.path.join(folder, pattern))})
    return {n: _file_sha256(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))}


def _config_sha256(config) -> str:
    """The configuration's hash, without what depends on where the folder is (``_name_or_path``)."""
    data = config.to_dict()

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k != "_name_or_path"}

    return hashlib.sha256(json.dumps(strip(data), sort_keys=True, default=str).encode()).hexdigest()


def _digest(files: dict[str, str] | None) -> str | None:
    return None if files is None else hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def fingerprint(model: nn.Module, targets: list[Target]) -> dict:
    """What stored results depend on: the model's configuration, every weight file and processor file of
    its folder (hashes of the whole files, not of the selected weights alone), the adapter's files, and the
    selected weights' names and shapes. A model not loaded by :func:`load_model` has its selected weights'
    values hashed instead."""
    files = getattr(model, "gradaudit_files_sha256", None)
    if files is None:
        values = hashlib.sha256()
        for t in targets:
            values.update(t.module.weight.detach().float().cpu().numpy().tobytes())
        weights, processor = values.hexdigest(), None
    else:
        weights = _digest({n: h for n, h in files.items() if n.endswith(".safetensors")})
        processor = _digest({n: h for n, h in files.items() if not n.endswith(".safetensors")})
    return {
        "config_sha256": _config_sha256(model.config),
        "weights_sha256": weights,
        "processor_sha256": processor,
        "files": files,
        "adapter_sha256": _digest(getattr(model, "gradaudit_adapter_sha256", None)),
        "targets": [{"name": t.name, "shape": list(t.module.weight.shape), "domain": t.domain} for t in targets],
    }
