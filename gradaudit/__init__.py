"""GradAudit: training-data exposure audits of vision-language models from parameter gradients.

The foundation is :func:`slice_stats`, per-sample row and column statistics of a linear layer's
weight gradient computed from its inputs and output gradients without materialising them.
"""

from gradaudit.ops import available_backends, gram_is_cheaper, slice_stats, slice_stats_padded
from gradaudit.stats import SliceStats, ref_slice_norms, slice_cosines

__all__ = [
    "SliceStats",
    "available_backends",
    "gram_is_cheaper",
    "ref_slice_norms",
    "slice_cosines",
    "slice_stats",
    "slice_stats_padded",
]
__version__ = "0.1.0"
