"""Floor 2: per-sample gradient statistics of any ``nn.Module`` (DESIGN.md §3.1, docs/grads.md).

``hooks.py`` holds the one hook mechanism that hands a layer's input and output gradient over in
backward (the capture engine uses it too); ``per_sample.py`` the context manager that turns them into
per-sample squared norms, dots with reference gradients and row/column statistics for every linear
layer, never materialising a per-sample gradient.
"""

from gradaudit.grads.hooks import LayerHooks
from gradaudit.grads.per_sample import GradStats, LayerStats, covered_modules, per_sample_grads

__all__ = ["GradStats", "LayerHooks", "LayerStats", "covered_modules", "per_sample_grads"]
