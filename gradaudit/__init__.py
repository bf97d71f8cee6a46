"""GradAudit: training-data exposure audits of vision-language models from parameter gradients.

The foundation is :func:`slice_stats`, per-sample row and column statistics of a linear layer's
weight gradient computed from its inputs and output gradients without materialising them. The package
is a house of floors, each importing only from below (docs/layout.md): the primitive (``ops``), the run
folder (``store``), model families (``models``), capture, the audit on plain arrays (``audit``), the
report, the workflow and command line, and the embedded default (``toy``).

The primitive's names load on first use, so that ``import gradaudit.audit`` does not import torch.
"""

import importlib

_PUBLIC = ("SliceStats", "available_backends", "gram_is_cheaper", "ref_slice_norms", "slice_cosines", "slice_stats",
           "slice_stats_padded")
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module("gradaudit.ops"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradaudit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
