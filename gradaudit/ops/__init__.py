"""Floor 1: the primitive — per-sample row and column statistics of a linear layer's weight gradient,
straight from the layer's inputs and output gradients (docs/kernels.md).

``slice_stats.py`` holds the public functions, their argument checks and the registered custom op;
``backends.py`` the backend table (Triton kernels in ``gradaudit.kernels``, the C++ extension
``gradaudit._C``, and the plain PyTorch route in ``torch_route.py``); ``result.py`` the result type and
the cosines that follow from it.
"""

from gradaudit.ops.backends import available_backends
from gradaudit.ops.result import SliceStats, ref_slice_norms, slice_cosines
from gradaudit.ops.slice_stats import gram_is_cheaper, slice_stats, slice_stats_padded

__all__ = ["SliceStats", "available_backends", "gram_is_cheaper", "ref_slice_norms", "slice_cosines", "slice_stats",
           "slice_stats_padded"]
