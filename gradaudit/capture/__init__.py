"""Vision-language capture (floor 4): hooks that reduce each selected layer's inputs and output
gradients with the primitive as backward produces them (``engine.py``), the per-sample loss and the
logit baselines' per-token quantities (``losses.py``), and the two passes over manifests into a run
folder (``passes.py``). Model families, their sample layouts and loading live beside it in
``gradaudit.models``."""

from gradaudit.capture.engine import BatchResult, batch_stats, reference_sums
from gradaudit.capture.format_check import check_formats, rank_formats
from gradaudit.capture.losses import per_sample_text_loss, token_quantities
from gradaudit.capture.passes import Options, joined, run_extract, run_reference, selection_table

__all__ = ["BatchResult", "Options", "batch_stats", "check_formats", "joined", "rank_formats", "per_sample_text_loss", "reference_sums", "run_extract",
           "run_reference", "selection_table", "token_quantities"]
