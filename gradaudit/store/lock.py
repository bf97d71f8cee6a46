"""The writer lock of a run folder: one writing command at a time.

An exclusive ``flock`` on ``writer.lock`` inside the folder, taken without waiting: a second writer is
refused at once with :class:`RunBusy`, naming the holder (its pid, command and start time, which the
holder writes into the lock file). The kernel releases a ``flock`` when its holder exits or is killed,
so a lock file left behind by a killed writer blocks nothing: the file's existence means nothing, only
the lock on it does.

The lock is re-entrant within one process (``gradaudit audit`` holds it while its steps, which also
write, take it again): ``flock`` locks belong to an open file, and a second open of the same file in
the same process would refuse its own holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time

from gradaudit.errors import RunBusy

LOCK_FILE = "writer.lock"

_held: dict[str, list] = {}  # the lock file's real path -> [its descriptor, depth], while held


@contextlib.contextmanager
def exclusive(folder: str, command: str):
    """Holds ``folder``'s writer lock for the block, yielding True where this call took it (the outermost
    holder in this process) and False where it was already held here. ``command`` says what writes
    (e.g. "extract set probes"); it is recorded, with the pid and argv, for a refused second writer."""
    key = os.path.realpath(os.path.join(folder, LOCK_FILE))
    if key in _held:
        _held[key][1] += 1
        try:
            yield False
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunBusy(folder, holder) from None
    me = {"pid": os.getpid(), "command": command, "argv": sys.argv, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield True
    finally:
        del _held[key]
        os.ftruncate(fd, 0)  # no holder recorded once released
        os.close(fd)  # closing the file releases the lock


def _holder(fd: int) -> dict:
    """What the holder recorded of itself; empty if it has not written it yet (or wrote something else)."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
