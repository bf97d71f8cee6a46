"""The backend table of the slice-statistics primitive: one row per backend.

A row says where a backend runs, how to load it (None when it cannot be loaded here), how dear its Gram
route's FLOPs are against its direct route's, and what it needs. A new backend is one row here (plus
its build in ``setup.py`` if it is compiled); :func:`available_backends` and the command line's
``--backend`` choices read this table.

Every backend is called as ``run(x, grad_out, bounds, ref, gram)`` with ``bounds`` the B+1 sample
boundaries as Python ints and ``gram[b]`` whether sample b takes the Gram route (norms only, used only
when ``ref`` is None); it returns (row_sq, col_sq, row_dot, col_dot) float32, the dots None without R.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("gradaudit")


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_triton():
    try:
        from gradaudit.kernels.slice_stats import slice_stats_triton
    except ImportError as exc:
        log.info("Triton kernels are not available (%s); the triton backend is off", exc)
        return None
    return slice_stats_triton


def _load_cpp():
    try:
        from gradaudit import _C
    except ImportError as exc:  # built with GRADAUDIT_NO_EXT=1, or the build failed
        log.info("gradaudit._C is not available (%s); the cpp backend is off", exc)
        return None

    def run(x, grad_out, bounds, ref, gram):
        out = _C.slice_stats(x, grad_out, bounds, ref, gram)
        return out[0], out[1], (out[2] if ref is not None else None), (out[3] if ref is not None else None)

    return run


def _load_torch():
    from gradaudit.ops.torch_route import slice_stats_torch

    return slice_stats_torch


@dataclass(frozen=True)
class Backend:
    """``devices``: tensor device types it runs on, fastest backend first in table order (None: any);
    ``interpreted``: also runs on CPU tensors under ``TRITON_INTERPRET=1``, after every other backend;
    ``gram_slowdown``: how many times dearer one Gram-route FLOP is than one direct-route FLOP."""

    name: str
    devices: tuple[str, ...] | None
    load: Callable[[], Callable | None]
    gram_slowdown: float
    needs: str
    interpreted: bool = False

    def runner(self) -> Callable | None:
        return _loaded(self.name)

    def runs_on(self, device: torch.device) -> bool:
        return self.devices is None or device.type in self.devices


BACKENDS = (
    # Triton's Gram kernels ran at 1/5 of its direct kernel's throughput on an H200 (4096², T 64–640,
    # benchmarks/results); cpp and torch run both routes through the same BLAS products.
    Backend("triton", ("cuda",), _load_triton, gram_slowdown=5.0, interpreted=True,
            needs="triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"),
    Backend("cpp", ("cpu",), _load_cpp, gram_slowdown=1.0,
            needs="the gradaudit._C extension (rebuild without GRADAUDIT_NO_EXT) and CPU tensors"),
    Backend("torch", None, _load_torch, gram_slowdown=1.0, needs="nothing"),
)
BY_NAME = {b.name: b for b in BACKENDS}
NAMES = ("auto",) + tuple(BY_NAME)


@functools.cache
def _loaded(name: str):
    return BY_NAME[name].load()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` in this process, fastest first."""
    device = torch.device(device)
    found = [b.name for b in BACKENDS if b.runs_on(device) and b.runner() is not None]
    if device.type == "cpu" and triton_interpreting():  # the interpreter is for tests, never the fastest
        found += [b.name for b in BACKENDS if b.interpreted and b.name not in found and b.runner() is not None]
    return found


def resolve(name: str, device: torch.device) -> Backend:
    """The backend ``name`` ("auto": the fastest available) for tensors on ``device``."""
    return _resolve(name, device.type, triton_interpreting())


@functools.cache  # every layer of every batch asks: the answer depends on these three only
def _resolve(name: str, device_type: str, interpreting: bool) -> Backend:
    device = torch.device(device_type)
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}; got {name!r}")
    found = available_backends(device)
    if name == "auto":
        return BY_NAME[found[0]]
    if name not in found:
        raise ValueError(f"backend={name!r} is not available for {device.type} tensors: it needs "
                         f"{BY_NAME[name].needs}")
    return BY_NAME[name]
