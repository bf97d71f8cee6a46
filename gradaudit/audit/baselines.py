"""Membership baselines from what the capture's forward pass recorded (docs/method.md), no second pass.

Inputs: per text token the fields of ``gradaudit.schema.TOKEN_FIELDS`` (label log-probability, mean and
standard deviation of log p under p, Rényi entropies at α = 0.5, 1, 2, ∞, the top-1 − top-2 gap) as one
(N_text, 8) array with per-pair ``offsets``. One direction for every score: higher = member.
"""

from __future__ import annotations

import zlib

import numpy as np

from gradaudit.schema import TOKEN_FIELDS

K_FRACTION = 0.2  # Min-K% and Min-K%++
RENYI_ALPHAS = ("0.5", "1", "2", "inf")
RENYI_KS = (0, 10, 100)
_FIELD = {name: i for i, name in enumerate(TOKEN_FIELDS)}


def _per_pair(tokens: np.ndarray, offsets: np.ndarray, fn) -> np.ndarray:
    out = np.empty(len(offsets) - 1)
    for b, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        if e <= s:
            raise ValueError(f"pair {b} has no text tokens: its baselines are undefined")
        out[b] = fn(tokens[s:e])
    return out


def _lowest_mean(values: np.ndarray, fraction: float) -> float:
    k = max(1, int(np.ceil(fraction * values.size)))
    return float(np.sort(values)[:k].mean())


def _highest_mean(values: np.ndarray, percent: int) -> float:
    """Mean of the K% largest values; K = 0 is the largest alone."""
    k = max(1, int(np.ceil(percent / 100 * values.size)))
    return float(np.sort(values)[::-1][:k].mean())


def token_baselines(tokens, offsets) -> dict[str, np.ndarray]:
    """Loss, Min-K%, Min-K%++, Max-Prob-Gap and MaxRényi-K% per pair, each (n,), higher = member."""
    tokens = np.asarray(tokens, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape[1] != len(TOKEN_FIELDS):
        raise ValueError(f"tokens must be (N_text, {len(TOKEN_FIELDS)}); got {tokens.shape}")
    lp, mu, sd = (_FIELD[k] for k in ("label_logp", "mean_logp", "std_logp"))
    out = {
        "loss": _per_pair(tokens, offsets, lambda t: t[:, lp].mean()),
        "min_k": _per_pair(tokens, offsets, lambda t: _lowest_mean(t[:, lp], K_FRACTION)),
        "min_k_plus_plus": _per_pair(
            tokens, offsets, lambda t: _lowest_mean((t[:, lp] - t[:, mu]) / np.maximum(t[:, sd], 1e-12), K_FRACTION)),
        "max_prob_gap": _per_pair(tokens, offsets, lambda t: t[:, _FIELD["top_gap"]].mean()),
    }
    for alpha in RENYI_ALPHAS:
        column = _FIELD[f"renyi_{alpha}"]
        for k in RENYI_KS:
            out[f"max_renyi_{k}_{alpha}"] = _per_pair(tokens, offsets, lambda t, c=column, k=k: -_highest_mean(t[:, c], k))
    return out


def zlib_ratio(loss_scores, texts) -> np.ndarray:
    """−(mean NLL) / zlib-compressed byte length of the text: the loss normalised by how compressible the
    text is; ``loss_scores`` are the "loss" baseline (mean log-probability, = −NLL)."""
    loss = np.asarray(loss_scores, dtype=np.float64)
    if len(texts) != loss.size:
        raise ValueError(f"{loss.size} scores but {len(texts)} texts")
    lengths = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)
    return loss / lengths  # −NLL/len: higher (less negative) = member


def gradient_norm(pairs) -> np.ndarray:
    """−log ‖G‖ over the selected weights (members' gradients are smaller), from the slice statistics."""
    total = sum(np.asarray(pairs.row_sq[w], dtype=np.float64).sum(1) for w in pairs.weights)
    return -0.5 * np.log(np.maximum(total, 1e-300))


VERSUS_BASE = ("loss", "min_k", "min_k_plus_plus")


def all_baselines(tokens, offsets, texts, pairs=None, base_tokens=None) -> dict[str, np.ndarray]:
    """Every baseline of docs/method.md for n pairs; ``pairs`` (a SliceSet) adds the gradient norm, and
    ``base_tokens`` (the same per-token quantities under a fine-tune's base model) adds, for the scores
    of :data:`VERSUS_BASE`, the fine-tuned model's score minus the base model's ("<score>_vs_base": a
    reference-model attack, higher = the fine-tune raised the pair more)."""
    out = token_baselines(tokens, offsets)
    out["zlib"] = zlib_ratio(out["loss"], texts)
    if pairs is not None:
        out["gradient_norm"] = gradient_norm(pairs)
    if base_tokens is not None:
        base = token_baselines(base_tokens, offsets)
        out.update({f"{k}_vs_base": out[k] - base[k] for k in VERSUS_BASE})
    return out
