"""The audit on plain arrays (numpy, scikit-learn; it never sees a model or a torch tensor): the paper's
score and its variants (``method.py``, ``variants.py``), the cross-validated protocol (``protocol.py``,
``folds.py``), calibration and the per-pair method's collection test (``calibration.py``), the logit
baselines (``baselines.py``), metrics (``metrics.py``), the per-pair audit's steps and state
(``per_pair.py``) and what a verdict may claim (``claims.py``). docs/method.md and docs/protocol.md
describe them."""
