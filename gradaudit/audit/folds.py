"""How the reference pairs are cut into cross-validation folds."""

from __future__ import annotations

import hashlib

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


def fold_of_ids(ids: list[str], folds: int) -> np.ndarray:
    """A fold for each audited pair, from a hash of its id: scored by that fold's model alone, an audited
    pair is scored by the same kind of function as a reference pair's out-of-fold score (one fold model,
    which never saw it), so calibration fitted on out-of-fold scores applies to it as it is."""
    return np.array([int.from_bytes(hashlib.sha256(pid.encode("utf-8")).digest()[:8], "big") % folds for pid in ids],
                    dtype=np.int64)
