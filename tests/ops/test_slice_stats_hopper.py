"""The Gluon kernel for Hopper compiled for sm_90 on this machine (no GPU needed); its results are checked
on the GPU by tests/ops/test_kernels_gpu.py."""

import json
import os
import subprocess
import sys

import pytest

from gradaudit.kernels import slice_stats_hopper as hopper

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
