"""The Gluon kernel for Hopper (gradaudit/kernels/slice_stats_hopper.py): compiled for sm_90 on any machine
(no GPU needed), and on a Hopper GPU (pytest -m gpu) checked against float64 with the configuration forced —
the tuner picks it only where it is faster, and GRADAUDIT_AUTOTUNE=0 (make test-gpu) takes the Triton
kernel."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gradaudit import slice_stats
from gradaudit.kernels import slice_stats as ks
from tests.ops.test_kernels_gpu import KEYS, _case, check_against_float64

# a Triton without Gluon (before 3.6) has no Hopper kernel: the package then runs the Triton kernel alone
hopper = pytest.importorskip("gradaudit.kernels.slice_stats_hopper", reason="this Triton has no Gluon")

SHARED_PER_BLOCK = 227 * 1024  # an H100's or H200's most shared memory for one thread block
CASES = [(cfg, has_ref) for cfg in hopper.CONFIGS for has_ref in (True, False)]


@pytest.fixture(scope="module")
def usage():
    """Each case compiled in one child process: the suite runs Triton's interpreter (TRITON_INTERPRET=1,
    conftest.py), under which nothing compiles for a GPU."""
    code = ("import json, sys; from gradaudit.kernels import slice_stats_hopper as h; "
            f"print(json.dumps([h.compile_sm90(r, bk=c[3], stages=c[5]) for c, r in {CASES!r}]))")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(zip(CASES, json.loads(out.stdout.splitlines()[-1])))


@pytest.mark.parametrize("cfg,has_ref", CASES)
def test_hopper_kernel_compiles_without_spills(usage, cfg, has_ref):
    """Every configuration the tuner may pick compiles, keeps its accumulators and R's tile out of local
    memory (the Triton kernel's configurations with R all spilled at 255 registers) and fits a block's
    shared memory."""
    got = usage[(cfg, has_ref)]
    assert got["spilled"] == 0, got
    assert got["registers"] <= 232, got  # what the consumers' partition asks for
    assert got["shared"] <= SHARED_PER_BLOCK, got


@pytest.fixture
def force_config(monkeypatch):
    """``force_config(cfg)``: every direct-route call from now on runs in configuration ``cfg``."""

    def force(cfg):
        def tune(key, launch, options):
            assert cfg in options, f"{cfg} is not a candidate for {key}"
            return cfg

        monkeypatch.setattr(ks, "_chosen", {})
        monkeypatch.setattr(ks, "_tune", tune)

    return force


def _on_hopper():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", hopper.CONFIGS)
@pytest.mark.parametrize(
    "lengths,d_in,d_out,dtype,ref_dtype",
    [([300, 0, 1, 77, 700], 1024, 1024, torch.bfloat16, torch.float32),
     ([5, 129, 64, 0, 33], 520, 1000, torch.bfloat16, torch.bfloat16),
     ([3], 2048, 64, torch.float16, torch.float32),
     ([40] * 37, 256, 4096, torch.float16, None)],
)
def test_hopper_kernel_error_at_most_twice_plain_pytorch(force_config, cfg, lengths, d_in, d_out, dtype, ref_dtype):
    """The ping-pong kernel: ragged samples, empty ones, a block past the last token, odd group sizes."""
    if not _on_hopper():
        pytest.fail("the Gluon kernel needs a Hopper GPU (sm_90); this card is not one")
    force_config(cfg)
    x, g, off, bounds, r = _case(lengths, d_in, d_out, dtype, ref_dtype is not None, seed=4)
    r = r.to(ref_dtype) if r is not None else None
    assert hopper.usable(x, g)
    got = slice_stats(x, g, off, r, backend="triton")
    check_against_float64(got, x, g, bounds, r)
    again = slice_stats(x, g, off, r, backend="triton")
    for key in KEYS if r is not None else KEYS[:2]:
        assert torch.equal(getattr(got, key), getattr(again, key)), f"{key} not bit-identical when repeated"


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", hopper.CONFIGS)
def test_hopper_kernel_keeps_a_non_finite_value_in_its_sample(force_config, cfg):
    """A NaN in one sample's x and an Inf in its Δ leave the samples on either side finite (the ping-pong
    kernel zeroes both operands' rows past a sample's end, so the next sample's values never mix in)."""
    force_config(cfg)
    x, g, off, _, r = _case([100, 50, 0, 70, 20], 1024, 512, torch.bfloat16, True, seed=5)
    x[120, 3] = float("nan")
    g[110, 5] = float("inf")  # both in sample 1 (tokens 100–149), inside sample 0's last block of BK = 32 or 64
    # (tokens 96–127 or 64–127): without the zeroing of either operand's rows there, sample 0 turns NaN
    got = slice_stats(x, g, off, r, backend="triton")
    for key in KEYS:
        finite = torch.isfinite(getattr(got, key)).all(dim=1).tolist()
        assert finite == [True, False, True, True, True], (key, finite)


@pytest.mark.gpu
def test_hopper_kernel_is_offered_only_for_inputs_it_can_read():
    x, g, *_ = _case([64, 64], 1024, 512, torch.bfloat16, False)
    assert (hopper.CONFIGS[0] in ks.candidates(x, g)) == _on_hopper()
    assert not hopper.usable(x.float(), g.float())  # fp32: the Triton kernel only
    assert not hopper.usable(x[:0], g[:0])  # no tokens: TMA takes no empty tensor
    wide = torch.randn(128, 1032, device="cuda").to(torch.bfloat16)
    assert hopper.usable(wide[:, :1024], g) == _on_hopper()  # rows 16-byte aligned, stepped by a longer stride
    assert not hopper.usable(wide[:, 4:1028], g)  # the same rows 8 bytes on: not aligned
    assert not hopper.usable(x[:1].expand(128, 1024), g)  # broadcast rows
    assert not hopper.usable(x[:, :127], g)  # a row of 254 bytes, here a view of aligned rows
    assert not hopper.usable(x[:, :127].contiguous(), g)  # and as its own tensor, a stride TMA cannot step
    assert not hopper.usable(x.T.contiguous().T, g)  # columns contiguous instead of rows
    assert ks.candidates(x.float(), g.float()) == ks.CONFIGS
