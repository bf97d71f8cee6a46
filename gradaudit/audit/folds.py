"""How the reference pairs are cut into cross-validation folds."""

from __future__ import annotations

import numpy as np


def stratified_folds(n_members: int, n_nonmembers: int, folds: int, seed: int) -> np.ndarray:
    """Fold of every reference pair (members first, then non-members), each class spread evenly.

    This is what ``sklearn.model_selection.StratifiedKFold(folds, shuffle=True)`` does, with another
    random assignment. It stays our own for one reason: every committed evaluation figure (the tiny
    tables on CPU, the small ones from 4 × H200 runs) was made with these folds, and StratifiedKFold's
    would move each of them by resampling noise without making any of them better; switching is worth
    doing together with the next full re-evaluation, not alone.
    """
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_members, n_nonmembers):
        f = np.arange(n) % folds
        rng.shuffle(f)
        out.append(f)
    return np.concatenate(out)
