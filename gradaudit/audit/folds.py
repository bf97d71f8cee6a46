"""How the reference pairs are cut into cross-validation folds."""

from __future__ import annotations

import numpy as np


def stratified_folds(n_members: int, n_nonmembers: int, folds: int, seed: int) -> np.ndarray:
    """Fold of every reference pair (members first, then non-members), each class spread evenly."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_members, n_nonmembers):
        f = np.arange(n) % folds
        rng.shuffle(f)
        out.append(f)
    return np.concatenate(out)
