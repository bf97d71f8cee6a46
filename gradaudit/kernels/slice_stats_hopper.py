"""The direct route's kernel for Hopper (sm_90), written in Gluon: the same contract and partial-sum buffers
as ``slice_stats._direct_kernel``, in the structure Triton's compiler does not reach (docs/kernels.md).

"Ping-pong", as CUTLASS calls it: ``gl.warp_specialize`` with a one-warp TMA loader and two consumer
warpgroups that take alternate samples of the program's group, so one reduces its sample's tile of G_b
while the other's products run on the tensor cores. Each consumer has its own ring of buffers (with one
shared ring, a consumer waiting for a block several uses of a buffer ahead would see an older phase
complete) and keeps its 128 × BN tile as two 64-row accumulators; the R tile sits in shared memory as
fp32 and is read half a tile at a time in the epilogue. Every configuration of the Triton kernel with R
ran at 255 registers and spilled; this one runs at 168, none spilled (``tests/ops/test_slice_stats_hopper.py``
compiles it for sm_90 on any machine and checks).

TMA loads whole blocks of BK tokens; where a block runs past a sample's end, the consumer zeroes both
operands' rows there in shared memory (one would do for finite values, but the next sample's Inf or NaN
times zero is NaN). Rows past the last token are zero-filled by TMA itself.

Inputs it takes (:func:`usable`): bf16 or fp16, on a device of compute capability 9.0, rows contiguous,
16-byte aligned and a multiple of 8 elements long (what TMA reads and the GPU tests cover); anything
else takes the Triton kernel. Measured against that kernel at the capture engine's shapes by
``benchmarks/profile_direct.py --configs`` (figures in benchmarks/results/NOTES.md).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                            warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# (name, BM, BN, BK, warps of the first consumer, STAGES): the tuner in slice_stats.py times these beside the
# Triton kernel's configurations. 8 stages of BK = 32 take 128 KiB of shared memory, R's tile 64 KiB more.
CONFIGS = [("pingpong", 128, 128, 32, 4, 8), ("pingpong", 128, 128, 64, 4, 4)]


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


@functools.cache
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def _tma_ready(t: torch.Tensor) -> bool:
    """Rows contiguous, 16-byte aligned, a multiple of 16 bytes long and not overlapping (no broadcast rows).
    TMA itself would take a narrower view of aligned rows (zeros past its edge), but the GPU tests cover
    only whole rows: so does this."""
    size = t.element_size()
    return (t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.stride(0) * size % 16 == 0
            and t.shape[1] * size % 16 == 0 and t.data_ptr() % 16 == 0)


def usable(x: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """Whether this kernel takes these inputs: bf16 or fp16 on a Hopper GPU (sm_90), both operands' rows
    contiguous, 16-byte aligned and a multiple of 8 elements long, at least one token and fewer than 2³¹
    (TMA's coordinates and the kernel's token arithmetic are int32)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 0 < x.shape[0] < 2**31
            and _hopper(x.device) and _tma_ready(x) and _tma_ready(grad_out))


def _layout(block, dtype):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def launch(x, grad_out, r, grp, smp, off, row, col, n_groups, bm, bn, bk, num_warps, stages):
    """One launch over the grid (tiles, ``n_groups``) with the group table (grp, smp, off) of
    ``slice_stats._device_table``; writes the partial sums ``row`` (n_q, n_tn, B, d_out) and ``col``
    (n_q, n_tm, B, d_in) like the Triton kernel. ``r`` None without R."""
    d_in, d_out = x.shape[1], grad_out.shape[1]
    n_tiles = -(-d_out // bm) * -(-d_in // bn)
    d_desc = TensorDescriptor.from_tensor(grad_out, [bk, bm], _layout([bk, bm], grad_out.dtype))
    x_desc = TensorDescriptor.from_tensor(x, [bk, bn], _layout([bk, bn], x.dtype))
    rr = x if r is None else r
    return direct_kernel_pingpong[(n_tiles, n_groups)](
        d_desc, x_desc, rr, grp, smp, off, row, col, row.shape[2], d_in, d_out,
        rr.stride(0) if r is not None else 0, rr.stride(1) if r is not None else 0,
        HAS_REF=r is not None, STAGES=stages, num_warps=num_warps)


def compile_sm90(has_ref: bool, bk: int = 32, stages: int = 8) -> dict:
    """The kernel compiled ahead of time for sm_90 on any machine (no GPU needed), as a launch on a GPU
    specialises it (16-byte aligned pointers, row lengths a multiple of 16 bytes): registers a thread,
    bytes spilled to local memory and shared memory a block, read from the binary with cuobjdump."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = direct_kernel_pingpong
    block = repr(gl.NVMMASharedLayout.get_default_for([bk, 128], gl.bfloat16))
    types = [f"tensordesc<bf16[{bk}, 128],{block}>"] * 2 + ["*fp32", "*i64", "*i64", "*i64", "*fp32", "*fp32"] + ["i32"] * 4
    consts = dict(STAGES=stages, num_warps=4, stride_rj=1, HAS_REF=has_ref)
    params = [p for p in fn.arg_names if p not in consts]
    sig = dict(zip(params, types), **{c: "constexpr" for c in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if types[i].startswith("*") or p in ("d_in", "d_out", "stride_ri")}
    kernel = triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(f.split(":") for f in next(line for line in usage.splitlines() if "REG:" in line).split())
    return dict(registers=int(fields["REG"]), spilled=int(fields["LOCAL"]), shared=kernel.metadata.shared)
