"""Several processes on one run folder, through ``torch.distributed`` (DESIGN.md §7): the ground floor's
helpers, so that the run folder (its lock), the capture passes (their shares of the work) and the
workflow (the files it derives) agree on who does what.

GradAudit starts no process: ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) does, and :func:`join` joins the group it describes — gloo on CPUs, NCCL
on GPUs. In a single process (no WORLD_SIZE, or 1) every helper here does nothing and costs nothing.

The rules the callers keep: rank 0 holds the run folder's writer lock for the whole group and writes
every file the group shares (fingerprint, bound pairs, derived manifests, the complete R); each rank
writes only its own statistics chunks and its own partial sums; every rank makes the same sequence of
collective calls (a helper that is a collective says so).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the group: ``rank`` of ``size`` (one process: 0 of 1), and ``local_rank``,
    its index on its node (its GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes what the group shares."""
        return self.rank == 0


def world() -> World:
    """The group this process is in (one process of one when none was joined)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launched() -> int:
    """The world size a launcher asks for in the environment (1 when none did)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: str) -> tuple[World, str]:
    """Joins the group the launcher describes, once per process (gloo for ``device`` "cpu", NCCL for
    "cuda"), and returns it with the device this rank runs on: "cuda" becomes "cuda:<LOCAL_RANK>", one GPU
    per rank. Without a launcher: (one process of one, ``device`` unchanged)."""
    if launched() > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    w = world()
    if w.size > 1 and torch.device(device).type == "cuda":
        given = torch.device(device).index
        if given is not None and given != w.local_rank:
            raise ValueError(f"device {device!r}: under torchrun each rank runs on the GPU of its LOCAL_RANK "
                             f"(cuda:{w.local_rank} here); give device 'cuda'")
        device = f"cuda:{w.local_rank}"
    return w, device


def leave() -> World:
    """Ends the group once every rank is here (a collective) and returns this process's place in it; from
    then on each process runs alone (``gradaudit audit``: rank 0 fits and reports, the others end)."""
    w = world()
    if w.size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return w


def barrier() -> None:
    """Every rank waits for every other (a collective; nothing in one process)."""
    if world().size > 1:
        dist.barrier()


def broadcast(value=None):
    """Rank 0's ``value`` (any picklable object), returned on every rank (a collective)."""
    if world().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's ``value``, in rank order, on every rank (a collective)."""
    if world().size == 1:
        return [value]
    out = [None] * world().size
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed over the ranks, in place (a collective; the tensors on each rank's device, the
    same names and shapes on every rank)."""
    if world().size > 1:
        for name in sorted(tensors):
            dist.all_reduce(tensors[name], op=dist.ReduceOp.SUM)
    return tensors


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first, then every other rank (a collective): files rank 0 writes in it are
    there, whole, when the others read them. Where each rank writes only when a file is absent, only rank
    0 writes."""
    w = world()
    if w.size > 1 and not w.main:
        dist.barrier()
    yield w
    if w.size > 1 and w.main:
        dist.barrier()


def share(mine: list, w: World | None = None) -> list:
    """This rank's items of ``mine`` (a list every rank holds the same): every ``size``-th from its rank on,
    so that consecutive items (batches sorted by length) spread over the ranks."""
    w = w or world()
    return mine[w.rank::w.size]
