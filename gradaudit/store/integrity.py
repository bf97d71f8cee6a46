"""What makes a run folder's files trustworthy: atomic writes, a checksum on every file, and the content
digest of a pair (docs/data-and-runs.md, "Checksums").

- **safetensors** files carry two checksums in their own metadata: ``sha256`` over the tensors (each
  one's name, dtype, shape and bytes) and ``meta_sha256`` over the rest of the metadata, which also says
  what ``kind`` of file it is (a chunk, R's sums, ...), so that a valid file put in another's place is
  refused. A file is one rename, so its checksums are never out of step with it. Reading the metadata
  alone (ids, texts) checks ``meta_sha256`` and the file's length (safetensors refuses a truncated file
  at open); reading the tensors also checks ``sha256``.
- **Text files** (JSON, JSONL, CSV, HTML) have a sidecar ``<file>.sha256`` in ``sha256sum``'s format,
  written *before* the file: a writer killed between the two renames leaves either no file (nothing was
  written: the next run writes both) or the previous file beside the new checksum (refused as not
  matching; the command that writes the file overwrites both).

A file that cannot be read, does not match its checksum or carries none raises :class:`Unverified`,
which the run folder turns into ``CorruptFile`` naming the step that writes the file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors import numpy as safetensors_numpy
from safetensors import torch as safetensors_torch

from gradaudit.errors import IdCollision

CHECKSUM_KEYS = ("sha256", "meta_sha256")
NO_CHECKSUM = "carries no checksum: written before GradAudit kept checksums, or by something else"


class Unverified(Exception):
    """A file is unreadable, does not match its checksum or has none; the message says which."""


TEMPORARY = re.compile(r"\.tmp-\d+$")  # the end of the names atomic_write writes before renaming


def atomic_write(path: str, write) -> str:
    """Calls ``write(tmp)`` for a temporary name beside ``path``, then renames it to ``path``: a crash
    leaves the previous file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# pairs --------------------------------------------------------------------------------------------------
def pair_digest(pair) -> str:
    """SHA-256 over what the model sees of a pair (``store.manifest.Pair``): its image file's bytes, its
    prompt and its text. Two pairs are the same pair when their ids and digests match. The label is not
    part of it: it is what an auditor says of the pair, and the same pair may be labelled in one
    manifest and not in another."""
    image = _sha256(Path(pair.image).read_bytes())
    return _sha256(json.dumps([image, pair.prompt, pair.text]).encode())


def refuse_id_collisions(set_name: str, pairs: dict[str, str], other: str, other_pairs: dict[str, str]) -> None:
    """Pairs are the same pair only when their ids and content digests match. Ids that ``pairs`` (digest
    by id, of set ``set_name``) shares with ``other_pairs`` under another digest are refused with
    ``IdCollision``: whatever matches pairs by id would give one the other's results."""
    clash = [pid for pid, digest in pairs.items() if pid in other_pairs and other_pairs[pid] != digest]
    if clash:
        raise IdCollision(set_name, other, clash)


# tensors ------------------------------------------------------------------------------------------------
def tensors_sha256(tensors: dict) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order (torch or numpy alike)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            data = np.ascontiguousarray(t).reshape(-1).view(np.uint8)
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(data)
    return h.hexdigest()


def _metadata_sha256(metadata: dict[str, str]) -> str:
    return _sha256(json.dumps({k: v for k, v in sorted(metadata.items()) if k not in CHECKSUM_KEYS}).encode())


def save_tensors(path: str, tensors: dict, metadata: dict[str, str], kind: str) -> str:
    """Writes ``tensors`` (all torch or all numpy) and ``metadata`` atomically as a file of ``kind``,
    with both checksums; returns the tensors' checksum (what another file may record to be tied to it)."""
    checksum = tensors_sha256(tensors)
    meta = {**metadata, "kind": kind}
    meta.update(sha256=checksum, meta_sha256=_metadata_sha256(meta))
    is_numpy = any(isinstance(t, np.ndarray) for t in tensors.values())
    save_file = safetensors_numpy.save_file if is_numpy else safetensors_torch.save_file
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
    return checksum


def _open(path: str, framework: str):
    try:
        return safe_open(path, framework)
    except (SafetensorError, OSError) as exc:
        raise Unverified(f"unreadable: truncated, or not a safetensors file ({exc})") from None


def _checked_metadata(f, kind: str) -> dict[str, str]:
    meta = f.metadata() or {}
    if any(k not in meta for k in CHECKSUM_KEYS):
        raise Unverified(NO_CHECKSUM)
    if _metadata_sha256(meta) != meta["meta_sha256"]:
        raise Unverified("its metadata do not match their checksum: altered")
    if meta.get("kind") != kind:
        raise Unverified(f"foreign: a file of kind {meta.get('kind')!r} where one of kind {kind!r} belongs")
    return meta


def read_metadata(path: str, kind: str) -> dict[str, str]:
    """The verified metadata of a safetensors file of ``kind`` (checksums included), without its tensors."""
    with _open(path, "np") as f:
        return _checked_metadata(f, kind)


def read_tensors(path: str, kind: str, framework: str = "pt") -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file of ``kind``, both verified; ``framework`` "pt" (torch)
    or "np"."""
    with _open(path, framework) as f:
        meta = _checked_metadata(f, kind)
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise Unverified(f"unreadable tensors ({exc})") from None
    if tensors_sha256(tensors) != meta["sha256"]:
        raise Unverified("its tensors do not match their checksum: altered")
    return tensors, meta


# text ---------------------------------------------------------------------------------------------------
def write_text(path: str, text: str) -> str:
    """Writes ``text`` atomically, its checksum first into ``<path>.sha256`` (``sha256sum -c`` reads it)."""
    data = text.encode()
    atomic_write(f"{path}.sha256", lambda p: Path(p).write_text(f"{_sha256(data)}  {os.path.basename(path)}\n"))
    return atomic_write(path, lambda p: Path(p).write_bytes(data))


def read_text(path: str) -> str:
    """The text of a file written by :func:`write_text`, verified against its checksum."""
    data = Path(path).read_bytes()
    try:
        recorded = Path(f"{path}.sha256").read_text().split()[0]
    except (FileNotFoundError, IndexError):
        raise Unverified(f"{NO_CHECKSUM} (no {os.path.basename(path)}.sha256 beside it)") from None
    if _sha256(data) != recorded:
        raise Unverified(f"does not match its checksum ({os.path.basename(path)}.sha256): altered or truncated")
    return data.decode()
