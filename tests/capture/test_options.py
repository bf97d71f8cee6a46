"""Capture options are checked when they are made, before a model is loaded: a wrong type, choice,
pattern or device raises an OptionError naming the option, never a TypeError or a torch traceback."""

import pytest
import torch

from gradaudit.capture import Options
from gradaudit.errors import ConfigError, OptionError


@pytest.mark.parametrize("options,option,message", [
    (dict(batch_size="8"), "batch_size", "batch_size must be an integer of at least 1; got '8'"),
    (dict(batch_size=0), "batch_size", "at least 1; got 0"),
    (dict(batch_size=True), "batch_size", "got True"),
    (dict(batch_size=2.0), "batch_size", "got 2.0"),
    (dict(on_error="ignore"), "on_error", "on_error must be one of ('stop', 'skip'); got 'ignore'"),
    (dict(dtype="fp16"), "dtype", "dtype must be one of"),
    (dict(backend="gpu"), "backend", "backend must be one of"),
    (dict(preset=["paper"]), "preset", "preset must be one of"),
    (dict(mode="training"), "mode", "mode must be one of ('eval', 'train')"),
    (dict(autocast=True), "autocast", "autocast must be one of"),
    (dict(pattern="("), "pattern", "pattern '(' is not a regular expression: missing )"),
    (dict(pattern=""), "pattern", "pattern must be a non-empty string"),
    (dict(adapter=5), "adapter", "adapter must be a non-empty string; got 5"),
    (dict(progress="no"), "progress", "progress must be true or false"),
    (dict(device="gpu"), "device", "device must be 'cpu' or 'cuda[:N]'; got 'gpu'"),
    (dict(device="mps"), "device", "device must be 'cpu' or 'cuda[:N]'"),
    (dict(device=0), "device", "device must be 'cpu' or 'cuda[:N]'; got 0"),
])
def test_bad_values_name_their_option(options, option, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as info:
        Options.of(**options)
    assert info.value.option == option and isinstance(info.value, ConfigError)


def test_cuda_is_refused_where_torch_sees_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match=r"device 'cuda' needs CUDA, which this machine's torch does not see"):
        Options(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Options(device="cuda:1").device == "cuda:1" and Options(device="cuda").device == "cuda"
    with pytest.raises(OptionError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        Options(device="cuda:2")


def test_good_values_pass_and_unknown_names_are_listed():
    opt = Options.of(batch_size=3, on_error="skip", dtype="bfloat16", device="cpu:0", backend="torch",
                     pattern=r"q_proj", mode="train", autocast="bfloat16", progress=False)
    assert opt.batch_size == 3 and opt.pattern == "q_proj"
    with pytest.raises(ConfigError, match=r"unknown capture option\(s\) \['batchsize'\]; known: \["):
        Options.of(batchsize=8)
