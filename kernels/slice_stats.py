"""Triton kernels for per-sample row/column statistics of G_b = Δ[b]ᵀ X[b] (DESIGN.md §3).

Two routes, both over samples packed without padding (``offsets``, like ``cu_seqlens``):

* direct — one program per (BM × BN tile of G, group of samples): the tile of G_b is built in
  registers with ``tl.dot`` over the sample's tokens, then reduced in the epilogue to its rows' and
  columns' squared norms and dot products with the R tile, which is loaded once per program and
  reused for every sample of the group. 2·T·d_in·d_out FLOPs per sample.
* Gram (norms only) — r² = diag(Δᵀ(XXᵀ)Δ), c² = diag(Xᵀ(ΔΔᵀ)X): the T × T Gram matrix of each sample,
  then one pass that multiplies it into the other operand and reduces. ≈4T²(d_in+d_out) FLOPs.

Reductions across tiles go through partial-sum buffers summed in a fixed order, never atomics, so a
fixed configuration is bit-for-bit deterministic. The direct route's buffers hold
B·(d_out·⌈d_in/BN⌉ + d_in·⌈d_out/BM⌉) floats: with BM = BN = 128 that is 1/64 of B·d_in·d_out.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

TILE = 128  # BM = BN on a GPU: fixes the partial-buffer size (1/64 of B·d_in·d_out) for every config
INTERPRET_TILE = 16  # small tiles under TRITON_INTERPRET=1, so CPU tests cross tile edges cheaply


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit(do_not_specialize=["n_sel", "per"])
def _direct_kernel(
    X, D, R, OFF, SIDS,
    ROW_SQ, COL_SQ, ROW_DOT, COL_DOT,
    n_sel, per, d_in, d_out,
    stride_xt, stride_xj, stride_dt, stride_di, stride_ri, stride_rj,
    HAS_REF: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Program (tile, group of `per` samples): rows ROW_*[tj, k, i] and columns COL_*[ti, k, j] of the partial buffers."""
    pid = tl.program_id(0)
    n_tn = tl.cdiv(d_in, BN)
    ti = pid // n_tn
    tj = pid % n_tn
    offs_i = ti * BM + tl.arange(0, BM)
    offs_j = tj * BN + tl.arange(0, BN)
    mi = offs_i < d_out
    mj = offs_j < d_in
    if HAS_REF:
        r = tl.load(R + offs_i[:, None] * stride_ri + offs_j[None, :] * stride_rj,
                    mask=mi[:, None] & mj[None, :], other=0.0).to(tl.float32)
    for kk in range(0, per):
        k = tl.program_id(1) * per + kk
        b = tl.load(SIDS + k, mask=k < n_sel, other=0)
        start = tl.load(OFF + b)
        end = tl.where(k < n_sel, tl.load(OFF + b + 1), start)  # past the group's end: no tokens, no store
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t0 in range(start, end, BK):
            offs_t = t0 + tl.arange(0, BK)
            mt = offs_t < end
            d_t = tl.load(D + offs_i[:, None] * stride_di + offs_t[None, :] * stride_dt,
                          mask=mi[:, None] & mt[None, :], other=0.0)  # (BM, BK): Δᵀ tile
            x = tl.load(X + offs_t[:, None] * stride_xt + offs_j[None, :] * stride_xj,
                        mask=mt[:, None] & mj[None, :], other=0.0)  # (BK, BN)
            acc = tl.dot(d_t, x, acc, input_precision=DOT_PRECISION)
        sq = acc * acc
        row_at = (tj * n_sel + k).to(tl.int64) * d_out + offs_i
        col_at = (ti * n_sel + k).to(tl.int64) * d_in + offs_j
        valid = k < n_sel
        tl.store(ROW_SQ + row_at, tl.sum(sq, axis=1), mask=mi & valid)
        tl.store(COL_SQ + col_at, tl.sum(sq, axis=0), mask=mj & valid)
        if HAS_REF:
            gr = acc * r
            tl.store(ROW_DOT + row_at, tl.sum(gr, axis=1), mask=mi & valid)
            tl.store(COL_DOT + col_at, tl.sum(gr, axis=0), mask=mj & valid)


_DIRECT_CONFIGS = [
    triton.Config({"BK": bk}, num_warps=w, num_stages=s)
    for bk in (32, 64)
    for w in (4, 8)
    for s in (3, 4)
]
_direct_tuned = triton.autotune(
    _DIRECT_CONFIGS, key=["d_in", "d_out", "HAS_REF", "DOT_PRECISION"], cache_results=True
)(_direct_kernel)


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


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _direct(x, grad_out, offsets, ref, ids, n_tok_max):
    """Direct route for samples ``ids`` (int32 on the device); returns four (len(ids), d) tensors."""
    n_sel = ids.numel()
    d_in, d_out = x.shape[1], grad_out.shape[1]
    tile = INTERPRET_TILE if _interpreting() else TILE
    n_tm, n_tn = triton.cdiv(d_out, tile), triton.cdiv(d_in, tile)
    n_tiles = n_tm * n_tn
    per = triton.cdiv(n_sel, min(n_sel, triton.cdiv(2 * _num_sms(x.device), n_tiles)))
    grid = (n_tiles, triton.cdiv(n_sel, per))
    kw = dict(dtype=torch.float32, device=x.device)
    row_sq, col_sq = torch.empty(n_tn, n_sel, d_out, **kw), torch.empty(n_tm, n_sel, d_in, **kw)
    has_ref = ref is not None
    row_dot = torch.empty_like(row_sq) if has_ref else row_sq
    col_dot = torch.empty_like(col_sq) if has_ref else col_sq
    r = ref if has_ref else x
    args = (
        x, grad_out, r, offsets, ids, row_sq, col_sq, row_dot, col_dot, n_sel, per, d_in, d_out,
        x.stride(0), x.stride(1), grad_out.stride(0), grad_out.stride(1),
        r.stride(0) if has_ref else 0, r.stride(1) if has_ref else 0,
    )
    meta = dict(HAS_REF=has_ref, DOT_PRECISION=_dot_precision(x.dtype), BM=tile, BN=tile)
    if _interpreting():
        _direct_kernel[grid](*args, **meta, BK=INTERPRET_TILE)
    else:
        _direct_tuned[grid](*args, **meta)
    out = [row_sq.sum(0), col_sq.sum(0)]
    if has_ref:
        out += [row_dot.sum(0), col_dot.sum(0)]
    return out


def _gram_norms(x, grad_out, offsets, ids, lengths):
    """Gram route for samples ``ids`` with token counts ``lengths`` (Python ints, all > 0)."""
    n_sel = ids.numel()
    tile = INTERPRET_TILE if _interpreting() else 64
    precision = _dot_precision(x.dtype)
    n_tok_max = max(lengths)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n * n)
    goff = torch.tensor(starts, dtype=torch.int64, device=x.device)
    gram = torch.empty(starts[-1] + lengths[-1] ** 2, dtype=torch.float32, device=x.device)
    n_tt = triton.cdiv(n_tok_max, tile)
    out = []
    for a, y in ((x, grad_out), (grad_out, x)):  # row_sq: K = XXᵀ applied to Δ; col_sq: ΔΔᵀ applied to X
        d_a, d_y = a.shape[1], y.shape[1]
        _gram_kernel[(n_sel, n_tt, n_tt)](
            a, offsets, ids, goff, gram, d_a, a.stride(0), a.stride(1),
            DOT_PRECISION=precision, BT=tile, BD=tile, num_warps=4,
        )
        part = torch.zeros(n_tt, n_sel, d_y, dtype=torch.float32, device=x.device)
        _gram_apply_kernel[(n_sel, triton.cdiv(d_y, tile), n_tt)](
            gram, goff, y, offsets, ids, part, n_sel, d_y, y.stride(0), y.stride(1),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BT=tile, BD=tile, num_warps=4,
        )
        out.append(part.sum(0))
    return out


def slice_stats_triton(x, grad_out, offsets, bounds, ref, gram):
    """Backend entry: ``offsets`` int64 on x's device, ``bounds`` the same as Python ints, ``gram[b]``
    whether sample b takes the Gram route (only when ref is None). Returns (row_sq, col_sq, row_dot, col_dot)."""
    n_samples = len(bounds) - 1
    d_in, d_out = x.shape[1], grad_out.shape[1]
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    use_gram = [gram[b] and ref is None and lengths[b] > 0 for b in range(n_samples)]
    kw = dict(dtype=torch.float32, device=x.device)
    row_sq, col_sq = torch.empty(n_samples, d_out, **kw), torch.empty(n_samples, d_in, **kw)
    row_dot = torch.empty(n_samples, d_out, **kw) if ref is not None else None
    col_dot = torch.empty(n_samples, d_in, **kw) if ref is not None else None
    outs = [t for t in (row_sq, col_sq, row_dot, col_dot) if t is not None]
    direct_ids = [b for b in range(n_samples) if not use_gram[b]]
    gram_ids = [b for b in range(n_samples) if use_gram[b]]
    if direct_ids:
        ids = torch.tensor(direct_ids, dtype=torch.int32, device=x.device)
        res = _direct(x, grad_out, offsets, ref, ids, max(lengths[b] for b in direct_ids))
        for dst, src in zip(outs, res):
            dst.index_copy_(0, ids.long(), src)
    if gram_ids:
        ids = torch.tensor(gram_ids, dtype=torch.int32, device=x.device)
        res = _gram_norms(x, grad_out, offsets, ids, [lengths[b] for b in gram_ids])
        for dst, src in zip((row_sq, col_sq), res):
            dst.index_copy_(0, ids.long(), src)
    return row_sq, col_sq, row_dot, col_dot
