"""Experiment: the direct route's kernel written in Gluon for Hopper (sm_90), checked against a float64
reference and timed against the Triton kernel (benchmarks/results/NOTES.md has the figures). Not used by
the package. Two kernels:

* ``direct_kernel_hopper``: one software-pipelined loop with masked ``cp.async`` copies. Its first version
  ran at 0.63–0.76× the Triton kernel's speed on an H100; this is the second (one barrier a block in the
  source, to which Triton's lowering adds two; the copy two blocks ahead; the sample table read only where
  a sample ends): compiled for sm_90 (197 registers, none spilled), not yet run.
* ``direct_kernel_pingpong``: warp-specialised, a one-warp TMA loader and two consumer warpgroups taking
  alternate samples, so that one reduces its sample while the other's products run (NOTES.md, the plan).
  Compiled for sm_90 (168 registers, none spilled, 196 KiB of shared memory with R), not yet run.

Both keep the contract and output buffers of ``gradaudit.kernels.slice_stats._direct_kernel`` and give it
what Triton's compiler would not (every tuned configuration with R spilled at 255 registers, and the
pipeline drained at each sample's end): the R tile in shared memory (fp32), read in the epilogue, not held
in registers; one pipeline across all token blocks of a group's samples. Each block of Δ is loaded as
(BK, BM) and read by ``warpgroup_mma`` transposed. ``direct_kernel_hopper`` uses masked copies (a
sample's last block stops at its last token) and 8 warps sharing the accumulator; it takes bf16 and fp16
rows that are multiples of 16 elements (others fail to compile: narrower copies into the swizzled
layout). ``direct_kernel_pingpong`` loads whole blocks with TMA and zeroes the X rows past a sample's
end in shared memory (rows a multiple of 8 elements, as TMA needs).

    python benchmarks/gluon_direct.py            # check both, then time them (CUDA, Hopper)
    python benchmarks/gluon_direct.py --force    # time even where a check failed
    python benchmarks/gluon_direct.py --compile-only   # any machine: compile for sm_90, print registers
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                            warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.testing import do_bench

import gradaudit.kernels.slice_stats as ks
from profile_direct import random_case


@gluon.jit
def _stage_r(R, r_smem, ti, tj, d_in, d_out, stride_ri, stride_rj, BM: gl.constexpr, BN: gl.constexpr,
             num_warps: gl.constexpr):
    """The program's BM × BN tile of R into shared memory as fp32 (zeros past R's edges)."""
    r_load: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    ri = ti * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, r_load))
    rj = tj * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, r_load))
    r = gl.load(R + ri[:, None] * stride_ri + rj[None, :] * stride_rj,
                mask=(ri < d_out)[:, None] & (rj < d_in)[None, :], other=0.0)
    r_smem.store(r.to(gl.float32))


@gluon.jit
def _next_block(t0, start, end, b, k, hi, SMP, OFF, BK: gl.constexpr):
    """The block after (sample b, the group's k-th, its tokens start to end, this block's from t0):
    (t0, start, end, b, k), where k == hi is past the group's last sample. Reads the sample table only
    when a sample ends."""
    t0 = t0 + BK
    if t0 >= end:
        k = k + 1
        b = gl.load(SMP + gl.minimum(k, hi - 1))
        start = gl.load(OFF + b)
        end = gl.load(OFF + b + 1)
        t0 = start
    return t0, start, end, b, k


@gluon.jit
def _copy_block(X, D, xs, ds, t0, end, offs_ti, offs_i, offs_tj, offs_j, mi, mj,
                stride_xt, stride_xj, stride_dt, stride_di, live):
    """Copies Δ[t0:t0+BK, tile rows] into ds (BK, BM) and X[t0:t0+BK, tile cols] into xs (BK, BN); tokens
    at or past ``end`` (and everything when not ``live``) read as zeros."""
    td = t0 + offs_ti
    tx = t0 + offs_tj
    cp.async_copy_global_to_shared(ds, D + td[:, None] * stride_dt + offs_i[None, :] * stride_di,
                                   mask=((td < end) & live)[:, None] & mi[None, :])
    cp.async_copy_global_to_shared(xs, X + tx[:, None] * stride_xt + offs_j[None, :] * stride_xj,
                                   mask=((tx < end) & live)[:, None] & mj[None, :])
    cp.commit_group()


@gluon.jit
def direct_kernel_hopper(
    X, D, R, GRP, SMP, OFF, ROW, COL,
    n_out, d_in, d_out,
    stride_xt, stride_xj, stride_dt, stride_di, stride_ri, stride_rj,
    HAS_REF: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Program (tile, group): as ``_direct_kernel``, ROW[q, tj, b, i] and COL[q, ti, b, j] (q = 0 squares,
    q = 1 dot products with R) for the samples SMP[GRP[g]:GRP[g+1]]."""
    gl.static_assert(STAGES >= 3, "the copy runs STAGES - 2 blocks ahead")
    dtype: gl.constexpr = X.dtype.element_ty
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    rows_of: gl.constexpr = gl.SliceLayout(1, mma)
    cols_of: gl.constexpr = gl.SliceLayout(0, mma)
    # copies: 16 bytes a thread along the contiguous feature axis, tokens across the rest
    load: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    tok_of: gl.constexpr = gl.SliceLayout(1, load)
    feat_of: gl.constexpr = gl.SliceLayout(0, load)

    pid = gl.program_id(0)
    n_tn = gl.cdiv(d_in, BN)
    n_tm = gl.cdiv(d_out, BM)
    ti = pid // n_tn
    tj = pid % n_tn
    lo = gl.load(GRP + gl.program_id(1))
    hi = gl.load(GRP + gl.program_id(1) + 1)

    offs_ti = gl.arange(0, BK, layout=tok_of)
    offs_tj = gl.arange(0, BK, layout=tok_of)
    offs_i = ti * BM + gl.arange(0, BM, layout=feat_of)
    offs_j = tj * BN + gl.arange(0, BN, layout=feat_of)
    mi_load = offs_i < d_out
    mj_load = offs_j < d_in

    d_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, BM], gl.NVMMASharedLayout.get_default_for([BK, BM], dtype))
    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, BN], gl.NVMMASharedLayout.get_default_for([BK, BN], dtype))

    out_i = ti * BM + gl.arange(0, BM, layout=rows_of)
    out_j = tj * BN + gl.arange(0, BN, layout=cols_of)
    mi = out_i < d_out
    mj = out_j < d_in
    r_smem = gl.allocate_shared_memory(gl.float32, [BM, BN], gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
    if HAS_REF:
        _stage_r(R, r_smem, ti, tj, d_in, d_out, stride_ri, stride_rj, BM, BN, num_warps)

    # the copy cursor runs STAGES - 2 blocks ahead of the compute cursor, across sample boundaries; a buffer
    # is refilled two blocks after it was read (STAGES >= 3)
    cb = gl.load(SMP + lo)
    ct = gl.load(OFF + cb)
    cs = ct
    ce = gl.load(OFF + cb + 1)
    ck = lo
    for s in gl.static_range(STAGES - 2):
        _copy_block(X, D, x_smem.index(s), d_smem.index(s), ct, ce, offs_ti, offs_i, offs_tj, offs_j, mi_load,
                    mj_load, stride_xt, stride_xj, stride_dt, stride_di, ck < hi)
        ct, cs, ce, cb, ck = _next_block(ct, cs, ce, cb, ck, hi, SMP, OFF, BK)

    b = gl.load(SMP + lo)
    t0 = gl.load(OFF + b)
    end = gl.load(OFF + b + 1)
    start = t0
    k = lo
    stage = 0
    acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma)
    while k < hi:
        cp.wait_group(STAGES - 3)  # this block's copy is done (each thread's own; the barrier makes it everyone's)
        fence_async_shared()
        gl.thread_barrier()
        # past the barrier both warpgroups are done with the block two back: its buffer takes the next copy
        ahead = (stage + STAGES - 2) % STAGES
        _copy_block(X, D, x_smem.index(ahead), d_smem.index(ahead), ct, ce, offs_ti, offs_i, offs_tj, offs_j,
                    mi_load, mj_load, stride_xt, stride_xj, stride_dt, stride_di, ck < hi)
        ct, cs, ce, cb, ck = _next_block(ct, cs, ce, cb, ck, hi, SMP, OFF, BK)
        acc = warpgroup_mma(d_smem.index(stage).permute((1, 0)), x_smem.index(stage), acc,
                            use_acc=t0 > start, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        if t0 + BK >= end:  # the sample's last block: reduce its tile of G_b
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            row_at = (tj * n_out + b).to(gl.int64) * d_out + out_i
            col_at = (ti * n_out + b).to(gl.int64) * d_in + out_j
            sq = acc * acc
            gl.store(ROW + row_at, gl.sum(sq, axis=1), mask=mi)
            gl.store(COL + col_at, gl.sum(sq, axis=0), mask=mj)
            if HAS_REF:
                gr = acc * r_smem.load(mma)
                gl.store(ROW + (n_tn * n_out).to(gl.int64) * d_out + row_at, gl.sum(gr, axis=1), mask=mi)
                gl.store(COL + (n_tm * n_out).to(gl.int64) * d_in + col_at, gl.sum(gr, axis=0), mask=mj)
        t0, start, end, b, k = _next_block(t0, start, end, b, k, hi, SMP, OFF, BK)
        stage = (stage + 1) % STAGES
    cp.wait_group(0)



# Version 3, "ping-pong": a one-warp TMA loader and two consumer warpgroups taking alternate samples, so
# one reduces its sample while the other's products run. Each consumer keeps its 128 × BN tile as two
# 64-row accumulators, so that R's rows are read from shared memory half a tile at a time.


@gluon.jit
def _pp_load(d_desc, x_desc, d_smem, x_smem, ready, empty, GRP, SMP, OFF, off_i, off_j,
             BK: gl.constexpr, RING: gl.constexpr):
    """Loader: every block of every sample of the group, in order, into the ring of the sample's consumer
    (samples alternate between consumers 0 and 1; consumer c owns buffers c·RING to c·RING + RING − 1)."""
    lo = gl.load(GRP + gl.program_id(1)).to(gl.int32)
    hi = gl.load(GRP + gl.program_id(1) + 1).to(gl.int32)
    i0 = 0  # blocks put in each ring so far
    i1 = 0
    for k in range(lo, hi):
        c = (k - lo) % 2
        b = gl.load(SMP + k)
        start = gl.load(OFF + b).to(gl.int32)
        n = gl.maximum(gl.cdiv(gl.load(OFF + b + 1).to(gl.int32) - start, BK), 1)
        i = gl.where(c == 0, i0, i1)
        for j in range(n):
            s = c * RING + (i + j) % RING
            mbarrier.wait(empty.index(s), (((i + j) // RING) & 1) ^ 1)  # the first pass finds every buffer free
            mbarrier.expect(ready.index(s), d_desc.block_type.nbytes + x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(d_desc, [start + j * BK, off_i], ready.index(s), d_smem.index(s))
            tma.async_copy_global_to_shared(x_desc, [start + j * BK, off_j], ready.index(s), x_smem.index(s))
        i0 = gl.where(c == 0, i0 + n, i0)
        i1 = gl.where(c == 1, i1 + n, i1)


@gluon.jit
def _pp_half(acc, r_smem, ROW, ti, tj, b, h, n_out, d_out, n_tn, HAS_REF: gl.constexpr, BM: gl.constexpr,
             HALF: gl.constexpr, layout: gl.constexpr):
    """Row statistics of one 64-row half of the tile; returns its column sums (squares, products with R)."""
    out_i = ti * BM + h * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, layout))
    mi = out_i < d_out
    row_at = (tj * n_out + b).to(gl.int64) * d_out + out_i
    sq = acc * acc
    gl.store(ROW + row_at, gl.sum(sq, axis=1), mask=mi)
    col_sq = gl.sum(sq, axis=0)
    col_dot = col_sq
    if HAS_REF:
        gr = acc * r_smem.slice(h * HALF, HALF, dim=0).load(layout)
        gl.store(ROW + (n_tn * n_out).to(gl.int64) * d_out + row_at, gl.sum(gr, axis=1), mask=mi)
        col_dot = gl.sum(gr, axis=0)
    return col_sq, col_dot


@gluon.jit
def _pp_consume(c, d_smem, x_smem, r_smem, ready, empty, GRP, SMP, OFF, ROW, COL, n_out, d_in, d_out, ti, tj,
                HAS_REF: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, RING: gl.constexpr):
    """Consumer c (0 or 1): the group's samples c, c + 2, … from its own ring (one reader a ring, so a
    buffer's barrier phases never alias); products, then the sample's statistics."""
    HALF: gl.constexpr = BM // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    n_tn = gl.cdiv(d_in, BN)
    n_tm = gl.cdiv(d_out, BM)
    out_j = tj * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    mj = out_j < d_in
    tok = gl.arange(0, BK, layout=gl.SliceLayout(1, zl))
    lo = gl.load(GRP + gl.program_id(1)).to(gl.int32)
    hi = gl.load(GRP + gl.program_id(1) + 1).to(gl.int32)
    i = 0  # blocks taken from this consumer's ring so far
    for k in range(lo + c, hi, 2):
        b = gl.load(SMP + k)
        start = gl.load(OFF + b).to(gl.int32)
        end = gl.load(OFF + b + 1).to(gl.int32)
        n = gl.maximum(gl.cdiv(end - start, BK), 1)
        top = gl.zeros((HALF, BN), dtype=gl.float32, layout=mma)
        bot = gl.zeros((HALF, BN), dtype=gl.float32, layout=mma)
        for j in range(n):
            s = c * RING + (i + j) % RING
            mbarrier.wait(ready.index(s), ((i + j) // RING) & 1)
            t0 = start + j * BK
            ds = d_smem.index(s)
            if t0 + BK > end:  # the block runs past the sample: both operands' rows there become zeros (one
                # would do for finite values, but the next sample's Inf or NaN times zero is NaN)
                keep = (t0 + tok < end)[:, None]
                xs = x_smem.index(s)
                xv = xs.load(zl)
                xs.store(gl.where(keep, xv, gl.zeros_like(xv)))
                dv = ds.load(zl)
                ds.store(gl.where(keep, dv, gl.zeros_like(dv)))
                fence_async_shared()
                gl.thread_barrier()
            top = warpgroup_mma(ds.slice(0, HALF, dim=1).permute((1, 0)), x_smem.index(s), top,
                                use_acc=j > 0, is_async=True)
            bot = warpgroup_mma(ds.slice(HALF, HALF, dim=1).permute((1, 0)), x_smem.index(s), bot,
                                use_acc=j > 0, is_async=True)
            top, bot = warpgroup_mma_wait(num_outstanding=2, deps=(top, bot))  # the block before is done
            if j > 0:
                mbarrier.arrive(empty.index(c * RING + (i + j - 1) % RING))
        top, bot = warpgroup_mma_wait(num_outstanding=0, deps=(top, bot))
        mbarrier.arrive(empty.index(c * RING + (i + n - 1) % RING))
        i += n
        sq_t, dot_t = _pp_half(top, r_smem, ROW, ti, tj, b, 0, n_out, d_out, n_tn, HAS_REF, BM, HALF, mma)
        sq_b, dot_b = _pp_half(bot, r_smem, ROW, ti, tj, b, 1, n_out, d_out, n_tn, HAS_REF, BM, HALF, mma)
        col_at = (ti * n_out + b).to(gl.int64) * d_in + out_j
        gl.store(COL + col_at, sq_t + sq_b, mask=mj)
        if HAS_REF:
            gl.store(COL + (n_tm * n_out).to(gl.int64) * d_in + col_at, dot_t + dot_b, mask=mj)


@gluon.jit
def direct_kernel_pingpong(
    d_desc, x_desc, R, GRP, SMP, OFF, ROW, COL, n_out, d_in, d_out, stride_ri, stride_rj,
    HAS_REF: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """Program (tile, group) as ``_direct_kernel``'s; Δ and X come as TMA descriptors with blocks (BK, BM)
    and (BK, BN). Launched with num_warps=4 (the first consumer); the second consumer and the loader are
    worker partitions of 4 warps and 1. STAGES buffers, half of them each consumer's ring."""
    BK: gl.constexpr = d_desc.block_type.shape[0]
    BM: gl.constexpr = d_desc.block_type.shape[1]
    BN: gl.constexpr = x_desc.block_type.shape[1]
    gl.static_assert(STAGES >= 4 and STAGES % 2 == 0, "two rings of at least two buffers: with one, a consumer "
                     "frees a buffer only after waiting for the block that needs it")
    gl.static_assert(BM == 128, "each consumer's accumulator is two 64-row halves")
    dtype: gl.constexpr = d_desc.dtype
    pid = gl.program_id(0)
    n_tn = gl.cdiv(d_in, BN)
    ti = pid // n_tn
    tj = pid % n_tn
    d_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, BM], d_desc.layout)
    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, BN], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    r_smem = gl.allocate_shared_memory(gl.float32, [BM, BN], gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
    if HAS_REF:
        _stage_r(R, r_smem, ti, tj, d_in, d_out, stride_ri, stride_rj, BM, BN, num_warps)
    gl.thread_barrier()
    gl.warp_specialize([
        (_pp_consume, (0, d_smem, x_smem, r_smem, ready, empty, GRP, SMP, OFF, ROW, COL, n_out, d_in, d_out, ti, tj,
                       HAS_REF, BM, BN, BK, STAGES // 2)),
        (_pp_consume, (1, d_smem, x_smem, r_smem, ready, empty, GRP, SMP, OFF, ROW, COL, n_out, d_in, d_out, ti, tj,
                       HAS_REF, BM, BN, BK, STAGES // 2)),
        (_pp_load, (d_desc, x_desc, d_smem, x_smem, ready, empty, GRP, SMP, OFF, ti * BM, tj * BN, BK, STAGES // 2)),
    ], [4, 1], [232, 40])  # the second consumer's warps and the loader's; registers a thread for each


_made: dict = {}


def _descriptors(x, g, bm, bn, bk):
    """TMA descriptors of Δ (blocks BK × BM) and X (BK × BN), made once per tensor pair and block shape so
    that timing them does not time their making."""
    key = (x.data_ptr(), g.data_ptr(), tuple(x.shape), tuple(g.shape), bm, bn, bk)
    if key not in _made:
        dt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
        _made[key] = (TensorDescriptor.from_tensor(g, [bk, bm], gl.NVMMASharedLayout.get_default_for([bk, bm], dt)),
                      TensorDescriptor.from_tensor(x, [bk, bn], gl.NVMMASharedLayout.get_default_for([bk, bn], dt)),
                      (x, g))  # the tensors kept alive while their pointers key the cache
    return _made[key][:2]


def launch(kernel, x, g, r, bounds, cfg, outs=None):
    """One launch of ``kernel`` ("triton", "gluon" or "pingpong") in configuration (BM, BN, BK, warps,
    stages) with the package's group table; returns its partial-sum buffers (row, col)."""
    bm, bn, bk, warps, stages = cfg
    n_out = len(bounds) - 1
    d_in, d_out = x.shape[1], g.shape[1]
    n_tm, n_tn = ks._cdiv(d_out, bm), ks._cdiv(d_in, bn)
    samples = np.arange(n_out, dtype=np.int64)
    per_sm = 2 if kernel == "triton" else 1  # the Gluon kernels fill an SM's shared memory alone
    n_groups = min(n_out, ks._cdiv(per_sm * ks._num_sms(x.device), n_tm * n_tn))
    (grp, smp, off), n_groups = ks._device_table(bounds, samples, n_groups, x.device)
    n_q = 2 if r is not None else 1
    if outs is None:
        outs = (torch.empty(n_q, n_tn, n_out, d_out, device="cuda"), torch.empty(n_q, n_tm, n_out, d_in, device="cuda"))
    row, col = outs
    rr = r if r is not None else x
    tail = (rr.stride(0) if r is not None else 0, rr.stride(1) if r is not None else 0)
    if kernel == "pingpong":
        d_desc, x_desc = _descriptors(x, g, bm, bn, bk)
        direct_kernel_pingpong[(n_tm * n_tn, n_groups)](d_desc, x_desc, rr, grp, smp, off, row, col, n_out, d_in, d_out,
                                                        *tail, HAS_REF=r is not None, STAGES=stages, num_warps=4)
        return outs
    args = (x, g, rr, grp, smp, off, row, col, n_out, d_in, d_out, x.stride(0), x.stride(1), g.stride(0), g.stride(1),
            *tail)
    if kernel == "gluon":
        direct_kernel_hopper[(n_tm * n_tn, n_groups)](*args, HAS_REF=r is not None, BM=bm, BN=bn, BK=bk, STAGES=stages,
                                                     num_warps=warps)
    else:
        ks._direct_kernel[(n_tm * n_tn, n_groups)](*args, HAS_REF=r is not None, DOT_PRECISION="tf32", BM=bm, BN=bn,
                                                  BK=bk, num_warps=warps, num_stages=stages)
    return outs


def reference(x, g, r, bounds):
    """Row and column squares (and dots with r) of every G_b, float64, materialised."""
    rows = []
    for b in range(len(bounds) - 1):
        G = g[bounds[b]:bounds[b + 1]].double().T @ x[bounds[b]:bounds[b + 1]].double()
        q = [(G * G).sum(1), (G * G).sum(0)]
        if r is not None:
            q += [(G * r.double()).sum(1), (G * r.double()).sum(0)]
        rows.append(q)
    return [torch.stack([row[i] for row in rows]) for i in range(len(rows[0]))]


def check():
    """Both kernels against the float64 reference: ragged samples, an empty one, odd shapes, fp16."""
    ok = True
    for lengths, d_in, d_out, dtype, with_ref in [([256] * 8 + [31, 0, 700], 1024, 512, torch.bfloat16, True),
                                                  ([256] * 8 + [31, 0, 700], 1024, 512, torch.float16, False),
                                                  ([5, 64, 65, 129, 0, 1], 1000, 520, torch.bfloat16, True),
                                                  ([657] * 16, 2048, 2048, torch.bfloat16, True)]:
        gen = torch.Generator(device="cuda").manual_seed(1)
        n = sum(lengths)
        x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
        g = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
        r = torch.randn(d_out, d_in, device="cuda", generator=gen) if with_ref else None
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        want = reference(x, g, r, bounds)
        for kernel, cfg in (("triton", (128, 128, 64, 4, 3)), ("gluon", (128, 128, 64, 8, 4)),
                            ("pingpong", (128, 128, 64, 4, 4))):
            if kernel == "gluon" and (d_in % 16 or d_out % 16):
                print(f"check gluon {d_in}x{d_out}: skipped (rows not a multiple of 16 elements)", flush=True)
                continue
            try:
                row, col = launch(kernel, x, g, r, bounds, cfg)
                torch.cuda.synchronize()
                got = [row[0].sum(0), col[0].sum(0)] + ([row[1].sum(0), col[1].sum(0)] if with_ref else [])
                errs = [float((a.double() - w).norm() / w.norm().clamp_min(1e-30)) for a, w in zip(got, want)]
                good = all(e < 1e-4 for e in errs)
                ok &= good or kernel == "triton"
                print(f"check {kernel} {lengths[:3]}… {d_in}x{d_out} {dtype} ref={with_ref}: rel errors "
                      + " ".join(f"{e:.1e}" for e in errs) + (" OK" if good else " WRONG"), flush=True)
            except Exception:
                ok = False
                print(f"check {kernel} {lengths[:3]}… {d_in}x{d_out} {dtype} ref={with_ref} failed: "
                      f"{traceback.format_exc().strip().splitlines()[-1][:200]}", flush=True)
    return ok


def nan_isolation():
    """A NaN in one sample's rows of Δ and X leaves the samples before and after it finite (the contract of
    gradaudit.slice_stats), in each kernel."""
    ok = True
    lengths = [100, 50, 0, 70]
    gen = torch.Generator(device="cuda").manual_seed(2)
    n = sum(lengths)
    x = torch.randn(n, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    g = torch.randn(n, 512, device="cuda", generator=gen).to(torch.bfloat16)
    r = torch.randn(512, 1024, device="cuda", generator=gen)
    x[120, 3] = float("nan")
    g[130, 5] = float("inf")  # both inside sample 1 (tokens 100-149)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for kernel, cfg in (("triton", (128, 128, 64, 4, 3)), ("gluon", (128, 128, 64, 8, 4)),
                        ("pingpong", (128, 128, 64, 4, 4))):
        row, col = launch(kernel, x, g, r, bounds, cfg)
        torch.cuda.synchronize()
        stats = torch.cat([row.sum(1), col.sum(1)], dim=2)  # (q, B, d_out + d_in)
        finite = [bool(torch.isfinite(stats[:, b]).all()) for b in range(len(lengths))]
        good = finite == [True, False, True, True]
        ok &= good or kernel == "triton"
        print(f"nan isolation {kernel}: finite per sample {finite}" + (" OK" if good else " WRONG"), flush=True)
    return ok


def timing():
    """The Gluon kernel's configurations against the Triton kernel's usual one and cuBLAS, capture shapes."""
    print("| shape | B | T | cuBLAS ms | triton (128,128,64,4,3) ms | of rate | kernel, cfg | ms | of rate | speed / triton |")
    for d_in, d_out, nb, nt in [(1024, 4096, 16, 577), (2048, 5632, 16, 657), (4096, 11008, 8, 657), (4096, 4096, 32, 256),
                                (4096, 4096, 8, 2048)]:
        x, g, r, bounds, rate = random_case(d_in, d_out, nb, nt)
        tcfg = (128, 128, 64, 4, 3)
        outs = launch("triton", x, g, r, bounds, tcfg)
        t_tr = do_bench(lambda: launch("triton", x, g, r, bounds, tcfg, outs), return_mode="median")
        for kernel, gcfg in [("gluon", (128, 128, 64, 8, 4)), ("gluon", (128, 128, 32, 8, 6)),
                             ("pingpong", (128, 128, 64, 4, 4)), ("pingpong", (128, 128, 32, 4, 8))]:
            try:
                outs_g = launch(kernel, x, g, r, bounds, gcfg)
                t_gl = do_bench(lambda: launch(kernel, x, g, r, bounds, gcfg, outs_g), return_mode="median")
                print(f"| {d_in}x{d_out} | {nb} | {nt} | {rate:.3f} | {t_tr:.3f} | {rate / t_tr:.2f} | {kernel} {gcfg} | "
                      f"{t_gl:.3f} | {rate / t_gl:.2f} | {t_tr / t_gl:.2f}× |", flush=True)
            except Exception as e:
                print(f"| {d_in}x{d_out} | {kernel} {gcfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


def compile_only():
    """Both kernels compiled for sm_90 on any machine (no GPU needed): registers, spills (local memory) and
    shared memory per thread block, from cuobjdump."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    block = repr(gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16))
    tables = ["*fp32", "*i64", "*i64", "*i64", "*fp32", "*fp32"]  # R, GRP, SMP, OFF, ROW, COL
    kernels = {
        # unit strides are constants, as the GPU specialises an integer argument equal to 1
        "direct_kernel_hopper": (direct_kernel_hopper, ["*bf16", "*bf16"] + tables + ["i32"] * 6,
                                 dict(BM=128, BN=128, BK=64, STAGES=4, num_warps=8, stride_xj=1, stride_di=1,
                                      stride_rj=1), 8),
        "direct_kernel_pingpong": (direct_kernel_pingpong, [f"tensordesc<bf16[64, 128],{block}>"] * 2 + tables
                                   + ["i32"] * 4, dict(STAGES=4, num_warps=4, stride_rj=1), 4),
    }
    for name, (fn, types, const, warps) in kernels.items():
        for has_ref in (True, False):
            params = [p for p in fn.arg_names if p not in const and p != "HAS_REF"]
            sig = dict(zip(params, types))
            consts = dict(const, HAS_REF=has_ref)
            sig.update({c: "constexpr" for c in consts})
            # pointers 16-byte aligned and sizes and row strides multiples of 16, as the GPU specialises them
            attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
                     if types[i].startswith("*") or p in ("d_in", "d_out", "stride_xt", "stride_dt", "stride_ri")}
            kernel = triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
            fields = dict(f.split(":") for f in next(l for l in usage.stdout.splitlines() if "REG:" in l).split())
            print(f"{name} R={has_ref}: {fields['REG']} registers, {fields['LOCAL']} bytes spilled, "
                  f"{kernel.metadata.shared // 1024} KiB shared")


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
    elif (check() & nan_isolation()) or "--force" in sys.argv:
        timing()
