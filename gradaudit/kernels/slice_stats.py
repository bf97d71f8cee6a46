"""Triton kernels for per-sample row/column statistics of G_b = Δ[b]ᵀ X[b] (docs/kernels.md).

Two routes, both over samples packed without padding (``offsets``, like ``cu_seqlens``):

* direct — a program per (BM × BN tile of G, group of samples) builds the tile of G_b for each sample
  of its group with ``tl.dot`` in a software-pipelined loop over the sample's tokens, then reduces it
  in the epilogue to its rows' and columns' squared norms and dot products with the R tile, which is
  loaded once per program and reused for every sample of the group. 2·T·d_in·d_out FLOPs.
  (Variants measured slower or broken are listed in benchmarks/results/NOTES.md.) On Hopper a second
  kernel for the same route, written in Gluon (``slice_stats_hopper.py``), is timed beside this one
  and taken per shape where it is faster.
* Gram (norms only) — r² = diag(Δᵀ(XXᵀ)Δ), c² = diag(Xᵀ(ΔΔᵀ)X): the T × T Gram matrix of each sample,
  then one pass that multiplies it into the other operand and reduces. ≈4T²(d_in+d_out) FLOPs.

Reductions across tiles go through partial-sum buffers summed in a fixed order, never atomics, so a
fixed configuration is bit-for-bit deterministic; configurations are tuned once per shape and kept
in a JSON cache so that later processes reuse them. The direct route's buffers hold
B·(d_out·⌈d_in/BN⌉ + d_in·⌈d_out/BM⌉) floats per statistic: with BM, BN ≥ 128, at most 1/64 of
B·d_in·d_out for the norms and as much again for the dot products with R.
"""

from __future__ import annotations

import functools
import json
import os

import logging

import numpy as np
import torch
import triton
import triton.language as tl

log = logging.getLogger("gradaudit")

# Direct-kernel configurations ("triton", BM, BN, BK, num_warps, num_stages) tried on a GPU; the first is the
# untuned default. BM, BN ≥ 128 keeps the partial sums at most 1/64 of B·d_in·d_out per statistic.
# Measured on an H100 (benchmarks/profile_direct.py, see benchmarks/results/NOTES.md): re-reading the
# R tile per sample instead of holding it was slower in every shape tried; tl.range(flatten=True) over
# the sample loop changed nothing; Triton 3.6's Hopper warp specialisation aborts on this epilogue
# (its data partitioning refuses a reduction along the partitioned dimension). On Hopper the Gluon
# kernel's configurations (slice_stats_hopper.CONFIGS) are timed beside these.
CONFIGS = [
    ("triton", 128, 128, 64, 4, 3), ("triton", 128, 128, 64, 8, 3), ("triton", 128, 128, 32, 4, 4),
    ("triton", 128, 128, 64, 8, 4), ("triton", 128, 256, 64, 8, 3), ("triton", 128, 256, 64, 8, 4),
]
INTERPRET_CONFIG = ("triton", 16, 16, 16, 4, 1)  # small tiles under TRITON_INTERPRET=1 cross tile edges cheaply


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function: ~8 µs a host call against ~0.1 µs


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit(do_not_specialize=["n_out"])
def _direct_kernel(
    X, D, R, GRP, SMP, OFF, ROW, COL,
    n_out, d_in, d_out,
    stride_xt, stride_xj, stride_dt, stride_di, stride_ri, stride_rj,
    HAS_REF: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Program (tile, group): samples SMP[GRP[g]:GRP[g+1]], each a pipelined loop over its tokens.

    The tile of G_b is reduced into ROW[q, tj, b, i] and COL[q, ti, b, j] (q = 0 squares, q = 1 dot
    products with R) once the sample's tokens are done.
    """
    pid = tl.program_id(0)
    n_tn = tl.cdiv(d_in, BN)
    n_tm = tl.cdiv(d_out, BM)
    ti = pid // n_tn
    tj = pid % n_tn
    offs_i = ti * BM + tl.arange(0, BM)
    offs_j = tj * BN + tl.arange(0, BN)
    mi = offs_i < d_out
    mj = offs_j < d_in
    if HAS_REF:
        r = tl.load(R + offs_i[:, None] * stride_ri + offs_j[None, :] * stride_rj,
                    mask=mi[:, None] & mj[None, :], other=0.0).to(tl.float32)
    lo = tl.load(GRP + tl.program_id(1))
    hi = tl.load(GRP + tl.program_id(1) + 1)
    for k in range(lo, hi):
        b = tl.load(SMP + k)
        start = tl.load(OFF + b)
        end = tl.load(OFF + b + 1)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t0 in range(start, end, BK):
            offs_t = t0 + tl.arange(0, BK)
            mt = offs_t < end
            d_t = tl.load(D + offs_i[:, None] * stride_di + offs_t[None, :] * stride_dt,
                          mask=mi[:, None] & mt[None, :], other=0.0)  # (BM, BK): Δᵀ tile
            x = tl.load(X + offs_t[:, None] * stride_xt + offs_j[None, :] * stride_xj,
                        mask=mt[:, None] & mj[None, :], other=0.0)  # (BK, BN)
            acc = tl.dot(d_t, x, acc, input_precision=DOT_PRECISION)
        row_at = (tj * n_out + b).to(tl.int64) * d_out + offs_i
        col_at = (ti * n_out + b).to(tl.int64) * d_in + offs_j
        sq = acc * acc
        tl.store(ROW + row_at, tl.sum(sq, axis=1), mask=mi)
        tl.store(COL + col_at, tl.sum(sq, axis=0), mask=mj)
        if HAS_REF:
            gr = acc * r
            tl.store(ROW + (n_tn * n_out).to(tl.int64) * d_out + row_at, tl.sum(gr, axis=1), mask=mi)
            tl.store(COL + (n_tm * n_out).to(tl.int64) * d_in + col_at, tl.sum(gr, axis=0), mask=mj)


@triton.jit
def _gram_kernel(
    Y, OFF, SIDS, GOFF, K_OUT, d, stride_yt, stride_yd,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """Program (k, t-tile, s-tile): K_k[t, s] = ⟨Y[start+t, :], Y[start+s, :]⟩ into the packed T_k × T_k block."""
    k = tl.program_id(0)
    b = tl.load(SIDS + k)
    start = tl.load(OFF + b)
    n_tok = tl.load(OFF + b + 1) - start
    offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
    offs_s = tl.program_id(2) * BT + tl.arange(0, BT)
    if (tl.program_id(1) * BT < n_tok) & (tl.program_id(2) * BT < n_tok):
        mt = offs_t < n_tok
        ms = offs_s < n_tok
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        for d0 in range(0, d, BD):
            offs_d = d0 + tl.arange(0, BD)
            md = offs_d < d
            a = tl.load(Y + (start + offs_t)[:, None] * stride_yt + offs_d[None, :] * stride_yd,
                        mask=mt[:, None] & md[None, :], other=0.0)
            bt = tl.load(Y + (start + offs_s)[None, :] * stride_yt + offs_d[:, None] * stride_yd,
                         mask=ms[None, :] & md[:, None], other=0.0)
            acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
        base = tl.load(GOFF + k)
        tl.store(K_OUT + base + offs_t[:, None] * n_tok + offs_s[None, :], acc,
                 mask=mt[:, None] & ms[None, :])


@triton.jit
def _gram_apply_kernel(
    K, GOFF, Y, OFF, SIDS, OUT, n_sel, d, stride_yt, stride_yd,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """Program (k, d-tile, t-tile): OUT[t-tile, k, d] = Σ_{t in tile} (K_k Y_k)[t, d] · Y_k[t, d]."""
    k = tl.program_id(0)
    b = tl.load(SIDS + k)
    start = tl.load(OFF + b)
    n_tok = tl.load(OFF + b + 1) - start
    tt = tl.program_id(2)
    if tt * BT < n_tok:
        offs_t = tt * BT + tl.arange(0, BT)
        offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
        mt = offs_t < n_tok
        md = offs_d < d
        base = tl.load(GOFF + k)
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for s0 in range(0, n_tok, BT):
            offs_s = s0 + tl.arange(0, BT)
            ms = offs_s < n_tok
            kk = tl.load(K + base + offs_t[:, None] * n_tok + offs_s[None, :],
                         mask=mt[:, None] & ms[None, :], other=0.0)
            y = tl.load(Y + (start + offs_s)[:, None] * stride_yt + offs_d[None, :] * stride_yd,
                        mask=ms[:, None] & md[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(kk, y, acc, input_precision=DOT_PRECISION)
        y_t = tl.load(Y + (start + offs_t)[:, None] * stride_yt + offs_d[None, :] * stride_yd,
                      mask=mt[:, None] & md[None, :], other=0.0).to(tl.float32)
        tl.store(OUT + (tt * n_sel + k).to(tl.int64) * d + offs_d, tl.sum(acc * y_t, axis=0), mask=md)


def _gram_norms(x, grad_out, offsets, ids, lengths):
    """Gram route for samples ``ids`` with token counts ``lengths`` (Python ints, all > 0)."""
    n_sel = ids.numel()
    tile = INTERPRET_CONFIG[1] if _interpreting() else 64
    precision = _dot_precision(x.dtype)
    n_tok_max = max(lengths)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n * n)
    goff = torch.tensor(starts, dtype=torch.int64, device=x.device)
    gram = torch.empty(starts[-1] + lengths[-1] ** 2, dtype=torch.float32, device=x.device)
    n_tt = _cdiv(n_tok_max, tile)
    out = []
    for a, y in ((x, grad_out), (grad_out, x)):  # row_sq: K = XXᵀ applied to Δ; col_sq: ΔΔᵀ applied to X
        d_a, d_y = a.shape[1], y.shape[1]
        _gram_kernel[(n_sel, n_tt, n_tt)](
            a, offsets, ids, goff, gram, d_a, a.stride(0), a.stride(1),
            DOT_PRECISION=precision, BT=tile, BD=tile, num_warps=4,
        )
        part = torch.zeros(n_tt, n_sel, d_y, dtype=torch.float32, device=x.device)
        _gram_apply_kernel[(n_sel, _cdiv(d_y, tile), n_tt)](
            gram, goff, y, offsets, ids, part, n_sel, d_y, y.stride(0), y.stride(1),
            DOT_PRECISION=precision, BT=tile, BD=tile, num_warps=4,
        )
        out.append(part.sum(0))
    return out


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sample_groups(bounds: np.ndarray, samples: np.ndarray, block: int, n_groups: int):
    """Split ``samples`` into at most ``n_groups`` contiguous groups of about equal work (token blocks,
    at least one per sample for its epilogue).

    Returns one int64 array [group starts (G+1) | samples | offsets (B+1)] and G, so that a single
    host-to-device copy carries it.
    """
    work = np.maximum(1, -(-(bounds[samples + 1] - bounds[samples]) // block))
    cum = np.cumsum(work)
    cuts = np.searchsorted(cum, np.arange(1, n_groups) * cum[-1] / n_groups, side="right")
    group_starts = np.unique(np.concatenate([[0], cuts, [len(samples)]]))
    return np.concatenate([group_starts, samples, bounds]).astype(np.int64), len(group_starts) - 1


class _Tuner:
    """Picks a configuration per shape among the candidates it is given (:data:`CONFIGS`, and on Hopper the
    Gluon kernel's) by timing each once on the real inputs, and keeps the choice in memory and in a JSON
    file (GRADAUDIT_CACHE_DIR, default ~/.cache/gradaudit), so reruns use the same configuration.
    GRADAUDIT_AUTOTUNE=0 takes the first candidate untimed."""

    def __init__(self):
        self.best: dict[str, tuple] | None = None
        self.times: dict[str, dict] = {}  # what each configuration took, for benchmarks/profile_direct.py
        root = os.environ.get("GRADAUDIT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gradaudit"))
        self.path = os.path.join(root, f"direct-{triton.__version__}.json")

    def _load(self):
        try:
            with open(self.path) as f:
                self.best = {k: tuple(v) for k, v in json.load(f).items()}
        except (OSError, ValueError, TypeError, AttributeError):  # unreadable, or not the mapping written here
            self.best = {}

    def __call__(self, key: str, launch, candidates: list[tuple]) -> tuple:
        if self.best is None:
            self._load()
        if self.best.get(key) not in candidates:  # not tuned yet, or a cache from another version of the list
            if os.environ.get("GRADAUDIT_AUTOTUNE", "1") in ("", "0"):
                return candidates[0]
            from triton.testing import do_bench

            times = {}
            for cfg in candidates:
                try:
                    times[cfg] = do_bench(lambda: launch(cfg), warmup=5, rep=25)
                except Exception as exc:  # e.g. out of shared memory on this card, or a compiler limitation
                    log.info("direct kernel config %s skipped for %s: %s", cfg, key, type(exc).__name__)
            self.best[key] = min(times, key=times.get)
            self.times[key] = times
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                tmp = f"{self.path}.{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(self.best, f)
                os.replace(tmp, self.path)
            except OSError:
                pass  # a read-only home still gets the in-process cache
        return self.best[key]


_tune = _Tuner()
_chosen: dict[tuple, tuple] = {}  # the tuner's choices by a key cheaper to build than its string (host path)


_tables: dict = {}  # recent device copies of group tables: one batch's layers share the same offsets


def _device_table(bounds, samples, n_groups, device):
    key = (bounds.tobytes(), samples.tobytes(), n_groups, device)
    hit = _tables.get(key)
    if hit is None:
        table, n_groups = _sample_groups(bounds, samples, 64, n_groups)
        table = torch.from_numpy(table).to(device, non_blocking=True)
        hit = (torch.split(table, [n_groups + 1, len(samples), len(bounds)]), n_groups)
        if len(_tables) >= 16:
            _tables.pop(next(iter(_tables)))
        _tables[key] = hit
    return hit


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def _hopper_kernel():
    """The Gluon kernel's module, imported on first use on a CUDA device (None where Triton has no Gluon)."""
    try:
        from gradaudit.kernels import slice_stats_hopper
    except ImportError as exc:
        log.info("the Hopper kernel is not available: %s", exc)
        return None
    return slice_stats_hopper


def _hopper_reads(x, grad_out) -> bool:
    hopper = _hopper_kernel() if x.is_cuda else None
    return hopper is not None and hopper.usable(x, grad_out)


def candidates(x, grad_out) -> list[tuple]:
    """The direct-route configurations that can run on these inputs: the Triton kernel's, and on Hopper,
    for bf16/fp16 rows TMA can read, the Gluon kernel's."""
    if _interpreting():
        return [INTERPRET_CONFIG]
    return CONFIGS + (_hopper_kernel().CONFIGS if _hopper_reads(x, grad_out) else [])


def launch_direct(x, grad_out, ref, bounds, samples, cfg, outs=None):
    """One launch of the direct route in configuration ``cfg`` (kernel, BM, BN, BK, warps, stages) for
    ``samples`` (np int64 indices into the B samples of ``bounds``). Returns the partial-sum buffers rows
    (n_q, ⌈d_in/BN⌉, B, d_out) and cols (n_q, ⌈d_out/BM⌉, B, d_in), float32 (written into ``outs`` if
    given), and what the launcher returned (the compiled kernel)."""
    kernel, bm, bn, bk, num_warps, num_stages = cfg
    n_out = len(bounds) - 1
    d_in, d_out = x.shape[1], grad_out.shape[1]
    has_ref = ref is not None
    n_q = 2 if has_ref else 1
    n_tm, n_tn = _cdiv(d_out, bm), _cdiv(d_in, bn)
    per_sm = 1 if kernel == "pingpong" else 2  # the Gluon kernel fills an SM's shared memory alone
    n_groups = min(len(samples), _cdiv(per_sm * _num_sms(x.device), n_tm * n_tn))
    (grp, smp, offsets), n_groups = _device_table(bounds, samples, n_groups, x.device)
    if outs is None:
        outs = (torch.empty(n_q, n_tn, n_out, d_out, dtype=torch.float32, device=x.device),
                torch.empty(n_q, n_tm, n_out, d_in, dtype=torch.float32, device=x.device))
    row, col = outs
    if kernel == "pingpong":
        compiled = _hopper_kernel().launch(x, grad_out, ref, grp, smp, offsets, row, col, n_groups, bm, bn, bk,
                                           num_warps, num_stages)
        return row, col, compiled
    r = ref if has_ref else x
    compiled = _direct_kernel[(n_tm * n_tn, n_groups)](
        x, grad_out, r, grp, smp, offsets, row, col, n_out, d_in, d_out,
        x.stride(0), x.stride(1), grad_out.stride(0), grad_out.stride(1),
        r.stride(0) if has_ref else 0, r.stride(1) if has_ref else 0,
        HAS_REF=has_ref, DOT_PRECISION=_dot_precision(x.dtype), BM=bm, BN=bn, BK=bk,
        num_warps=num_warps, num_stages=num_stages,
    )
    return row, col, compiled


def _direct(x, grad_out, bounds, samples, ref):
    """Direct route for ``samples`` (np int64 indices into the B samples of ``bounds``).

    Returns rows (n_q, B, d_out) and cols (n_q, B, d_in) float32, q = 0 squares, 1 dot products with R;
    only the rows of ``samples`` are meaningful.
    """
    d_in, d_out = x.shape[1], grad_out.shape[1]
    has_ref = ref is not None
    if _interpreting():
        cfg = INTERPRET_CONFIG
    else:
        tokens = int(bounds[samples + 1].sum() - bounds[samples].sum()) // len(samples)
        bucket = 1 << max(tokens, 1).bit_length()  # mean tokens per sample, to the power of 2 above
        ref_dtype = ref.dtype if has_ref else None
        tma = _hopper_reads(x, grad_out)  # which candidates there are: part of both keys
        fast_key = (x.device, x.dtype, ref_dtype, d_in, d_out, bucket, tma)
        cfg = _chosen.get(fast_key)
        if cfg is None:
            options = candidates(x, grad_out)
            tma = "|tma" if tma else ""
            key = f"{_device_name(x.device)}|{x.dtype}|{ref_dtype}|{d_in}x{d_out}|ref={has_ref}|T~{bucket}{tma}"
            cfg = _chosen[fast_key] = _tune(key, lambda c: launch_direct(x, grad_out, ref, bounds, samples, c),
                                            options)
    row, col, _ = launch_direct(x, grad_out, ref, bounds, samples, cfg)
    # partial sums added in a fixed order; a single tile along an axis needs no sum
    return (row[:, 0] if row.shape[1] == 1 else row.sum(1)), (col[:, 0] if col.shape[1] == 1 else col.sum(1))


@functools.lru_cache(maxsize=64)
def _all_samples(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def slice_stats_triton(x, grad_out, bounds, ref, gram):
    """Backend entry: ``bounds`` the B+1 sample boundaries as Python ints, ``gram[b]`` whether sample b
    takes the Gram route (only when ref is None). Returns (row_sq, col_sq, row_dot, col_dot) float32."""
    n_samples = len(bounds) - 1
    d_in, d_out = x.shape[1], grad_out.shape[1]
    bounds_np = np.asarray(bounds, dtype=np.int64)
    if ref is not None or not any(gram):  # every sample direct: the usual case, kept light on the host
        direct, via_gram = _all_samples(n_samples), ()
    else:
        lengths = np.diff(bounds_np)
        use_gram = np.asarray(gram, dtype=bool) & (lengths > 0)
        direct, via_gram = np.flatnonzero(~use_gram), np.flatnonzero(use_gram)
    n_q = 1 if ref is None else 2
    if len(direct):
        rows, cols = _direct(x, grad_out, bounds_np, direct, ref)
    else:
        rows = torch.empty(n_q, n_samples, d_out, dtype=torch.float32, device=x.device)
        cols = torch.empty(n_q, n_samples, d_in, dtype=torch.float32, device=x.device)
    if len(via_gram):
        offsets = torch.from_numpy(bounds_np).to(x.device, non_blocking=True)
        ids = torch.from_numpy(via_gram.astype(np.int32)).to(x.device, non_blocking=True)
        res = _gram_norms(x, grad_out, offsets, ids, lengths[via_gram].tolist())
        for dst, src in zip((rows[0], cols[0]), res):
            dst.index_copy_(0, ids.long(), src)
    if ref is None:
        return rows[0], cols[0], None, None
    return rows[0], cols[0], rows[1], cols[1]
