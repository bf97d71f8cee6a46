"""A run folder keeps one audit's results as they are produced (docs/data-and-runs.md): safetensors,
JSON and CSV only. It owns every path inside it:

    fingerprint.json                 model configuration and weights hashes, the selected weights
    reference.safetensors            R sums per weight (fp32), with the ids and N in its metadata
    reference_norms.safetensors      R's squared row and column norms per weight, once R is complete
    reference_pairs.json             the pairs R is built from: id, content digest, label
    stats/<set>/chunk-000000.safetensors   per-sample statistics of one batch, ids in the metadata
    stats/<set>/pairs.json           the pairs the set is extracted from: id, content digest, label
    skipped/<set>.jsonl              manifest lines left out, with the reason
    manifests/<name>.jsonl           manifests the audit derives (the split of the reference members,
                                     the association test's shuffled pairs)
    fit/summary.json, fit/models.safetensors   the cross-validated fit, stored once and reused
    results/<set>/pairs.csv, metrics.json, report.html, figures/*.png   what scoring a set writes

Every file is written to a temporary name and renamed, so a crash loses at most the batch in flight,
and rerunning continues from what is there without duplicating a sample. Every file carries a checksum
(``store/integrity.py``), checked whenever it is read: a truncated, altered or foreign file raises
``CorruptFile`` naming it and the step that writes it again.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from gradaudit import distributed
from gradaudit.errors import (ConfigError, CorruptFile, GradAuditError, ManifestChanged, NonFiniteStats, RunMismatch,
                              StageMissing)
from gradaudit.schema import STAT_KEYS
from gradaudit.store.integrity import (TEMPORARY, Unverified, pair_digest, read_metadata, read_tensors, read_text,
                                       refuse_id_collisions, save_tensors, tensors_sha256, write_text)
from gradaudit.store.lock import exclusive
from gradaudit.store.manifest import IMAGE_STATS


def _plain_name(kind: str, name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"a {kind} needs a plain name (no '/', not starting with '.'); got {name!r}")
    return name


def _non_finite(chunk: dict[str, torch.Tensor], ids: list[str]) -> list[str]:
    """Ids of a chunk's pairs with a NaN or infinite value in their statistics, loss or token quantities
    (a token row belongs to the pair whose span of "token_offsets" holds it)."""
    bad = torch.zeros(len(ids), dtype=torch.bool)
    for key, value in chunk.items():
        if key == "token_offsets":
            continue
        finite = torch.isfinite(value)
        rows = ~(finite.flatten(1).all(1) if finite.dim() > 1 else finite)
        if key in ("tokens", "base_tokens"):
            owner = torch.searchsorted(chunk["token_offsets"][1:], torch.arange(len(value)), right=True)
            bad[owner[rows]] = True
        else:
            bad |= rows
    return [pid for pid, b in zip(ids, bad.tolist()) if b]


@dataclass
class StoredSet:
    """One statistics set as plain arrays, in stored order: the pairs' ``ids``, ``texts`` and ``labels``
    (None where the manifest had none); ``stats[key][weight]`` (n, d) float64 for key in
    ``schema.STAT_KEYS``; R's squared slice norms ``ref_row_sq[weight]`` (d_out,), ``ref_col_sq[weight]``
    (d_in,); ``n_ref`` the members that built R and ``in_ref`` (n,) which of these pairs were among them;
    ``loss`` (n,), ``tokens`` (N_text, 8) in the order of ``schema.TOKEN_FIELDS`` with ``token_offsets``
    (n+1,), and for a model with an adapter ``base_tokens`` (N_text, 8), the same under its base model."""

    ids: list[str]
    texts: list[str]
    labels: list
    weights: list[str]
    stats: dict[str, dict[str, np.ndarray]]
    ref_row_sq: dict[str, np.ndarray]
    ref_col_sq: dict[str, np.ndarray]
    n_ref: int
    in_ref: np.ndarray
    loss: np.ndarray
    tokens: np.ndarray
    token_offsets: np.ndarray
    base_tokens: np.ndarray | None = None  # the same quantities under an adapter's base model


class RunFolder:
    """The run folder at ``path``. Making one creates nothing: only writing creates the folder (and the
    folders inside it), so a reader given a mistyped path fails instead of leaving an empty folder."""

    def __init__(self, path: str):
        self.path = path

    def _file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @contextlib.contextmanager
    def writing(self, command: str, create: bool = True):
        """Holds the folder's writer lock (``store/lock.py``) for a writing command's whole duration: a
        second writer is refused at once with ``RunBusy``. ``create``: make the folder if it is absent
        (the reference pass, the audit); otherwise an absent folder is ``StageMissing`` (the extract
        and the fit write only where R is). The outermost holder also removes the temporary files of writers that
        were killed: while the lock is held, nobody else is writing one.

        Under torchrun (``gradaudit.distributed``) the group is one writer: rank 0 takes the lock for all
        ranks (a rank whose rank 0 is refused raises too), and lets it go only once every rank has left
        the block. A collective: every rank enters it."""
        w = distributed.world()
        if w.size == 1:
            with self._locked(command, create):
                yield self
            return
        with contextlib.ExitStack() as held:
            refused = None
            if w.main:
                try:
                    held.enter_context(self._locked(f"{command} (rank 0 of {w.size}, for every rank)", create))
                except GradAuditError as exc:
                    refused = exc
            message = distributed.broadcast(None if refused is None else str(refused))
            if refused is not None:
                raise refused
            if message is not None:
                raise GradAuditError(f"rank 0 could not start {command!r} in {self.path}: {message}")
            yield self
            distributed.barrier()  # every rank's writes are done before rank 0 lets the lock go

    @contextlib.contextmanager
    def _locked(self, command: str, create: bool):
        if not os.path.isdir(self.path):
            if not create:
                raise self._nothing_captured()
            os.makedirs(self.path, exist_ok=True)
        with exclusive(self.path, command) as outermost:
            if outermost:
                for root, _, files in os.walk(self.path):
                    for name in files:
                        if TEMPORARY.search(name):
                            os.remove(os.path.join(root, name))
            yield self

    def _verified(self, read, path: str, stage: str, set_name: str | None = None):
        """``read(path)``; a failed check is raised as ``CorruptFile`` naming the step that writes the file."""
        try:
            return read(path)
        except Unverified as exc:
            raise CorruptFile(path, str(exc), stage, set_name) from None

    # fingerprint ---------------------------------------------------------------------------------
    @property
    def fingerprint_path(self) -> str:
        return self._file("fingerprint.json")

    def bind(self, fingerprint: dict) -> None:
        """Records the fingerprint, or checks it against the one recorded; says what differs."""
        path = self.fingerprint_path
        if not os.path.exists(path):
            write_text(path, json.dumps(fingerprint, indent=1))
            return
        stored = self.fingerprint()
        keys = ("config_sha256", "weights_sha256", "processor_sha256", "adapter_sha256", "targets", "mode", "autocast",
                "prompt_format")
        differs = [k for k in keys if stored.get(k) != fingerprint.get(k)]
        if differs:
            what = {"config_sha256": "the model's configuration", "weights_sha256": "the model's weights",
                    "processor_sha256": "the processor's files (tokenizer, image processor, chat template)",
                    "adapter_sha256": "the adapter", "targets": "the selected weights (preset or pattern)",
                    "mode": "the mode (eval or train)", "autocast": "the autocast setting",
                    "prompt_format": "the prompt format"}
            raise RunMismatch(f"{self.path} holds results of another run: "
                              f"{', '.join(what[k] for k in differs)} differ(s)")

    def _nothing_captured(self) -> StageMissing:
        if not os.path.isdir(self.path):
            return StageMissing(self.path, "reference", "no run folder here: nothing was captured into it")
        return StageMissing(self.path, "reference", "nothing was captured into this run folder yet")

    def fingerprint(self) -> dict:
        if not os.path.exists(self.fingerprint_path):
            raise self._nothing_captured()
        return json.loads(self._verified(read_text, self.fingerprint_path, "fingerprint"))

    # the pairs a pass is bound to -----------------------------------------------------------------
    def _pairs_path(self, name: str | None) -> str:
        if name is None:
            return self._file("reference_pairs.json")
        return os.path.join(self._stats_dir(name), "pairs.json")

    def bind_pairs(self, name: str | None, pairs: list) -> dict[str, str]:
        """Binds set ``name`` (None: R) to ``pairs`` (manifest.Pair) when its first pass starts; a later
        pass must be a resume over the same pairs: the same ids with the same contents
        (``integrity.pair_digest``) and labels, in any order. Anything else is ``ManifestChanged``:
        statistics of the old pairs must not pass for the new ones, nor two manifests merge into one
        set. Returns each pair's content digest by id."""
        bound = {p.id: [pair_digest(p), p.label] for p in pairs}
        path = self._pairs_path(name)
        if not os.path.exists(path):
            write_text(path, json.dumps([[pid, digest, label] for pid, (digest, label) in bound.items()]))
        else:
            stored = self._bound(name)
            differ = [pid for pid in bound if stored.get(pid) != bound[pid]]
            differ += [pid for pid in stored if pid not in bound]
            if differ:
                raise ManifestChanged(self.path, name, differ)
        return {pid: digest for pid, (digest, _) in bound.items()}

    def _bound(self, name: str | None) -> dict[str, list]:
        """The pairs set ``name`` (None: R) is bound to: [content digest, label] by id."""
        path, stage = self._pairs_path(name), "reference" if name is None else "extract"
        if not os.path.exists(path):
            raise CorruptFile(path, "missing: the pairs these results were computed from are not recorded", stage, name)
        return {pid: [digest, label] for pid, digest, label in json.loads(self._verified(read_text, path, stage, name))}

    def _check_bound(self, name: str | None, ids: list[str], digests: list[str]) -> None:
        """Refuses stored results over pairs that set ``name`` (None: R) is not bound to."""
        bound = self._bound(name)
        foreign = [pid for pid, digest in zip(ids, digests) if pid not in bound or bound[pid][0] != digest]
        if foreign:
            raise ManifestChanged(self.path, name, foreign)

    # reference -----------------------------------------------------------------------------------
    @property
    def reference_path(self) -> str:
        return self._file("reference.safetensors")

    @property
    def reference_norms_path(self) -> str:
        return self._file("reference_norms.safetensors")

    def _reference_incomplete(self) -> StageMissing:
        if not os.path.exists(self.reference_path):
            return self._nothing_captured()
        return StageMissing(self.path, "reference", "the reference pass has not finished")

    def save_reference(self, sums: dict[str, torch.Tensor], ids: list[str], digests: list[str],
                       complete: bool) -> None:
        """R's sums over the ids so far (and their pairs' content digests); once complete, also R's squared
        row and column norms ("<weight>|row_sq", "<weight>|col_sq"), which cosines and leave-one-out
        need, tied to the sums they were computed from by the sums' checksum. The norms go first: the
        reference file saying "complete" is what makes the pass complete."""
        meta = {"ids": json.dumps(ids), "digests": json.dumps(digests), "n": str(len(ids)),
                "complete": json.dumps(complete)}
        tensors = {k: v.contiguous().cpu() for k, v in sums.items()}
        if complete:
            norms = {}
            for name, total in tensors.items():
                r_sq = (total.double() / len(ids)) ** 2
                norms[f"{name}|row_sq"], norms[f"{name}|col_sq"] = r_sq.sum(1).float(), r_sq.sum(0).float()
            meta_norms = {"n": str(len(ids)), "sums_sha256": tensors_sha256(tensors)}
            save_tensors(self.reference_norms_path, norms, meta_norms, "reference norms")
        save_tensors(self.reference_path, tensors, meta, "reference sums")

    def _reference_parts(self) -> list[str]:
        return sorted(glob.glob(self._file("reference-part-*.safetensors")))

    def save_reference_part(self, rank: int, sums: dict[str, torch.Tensor], ids: list[str], digests: list[str]) -> None:
        """One rank's share of an unfinished distributed reference pass: the sums of its batches so far (not
        of what reference.safetensors already held) over ``ids``. Folded into R by
        :meth:`merge_reference_parts` when a pass resumes, whatever the world size then."""
        meta = {"ids": json.dumps(ids), "digests": json.dumps(digests), "n": str(len(ids))}
        save_tensors(self._file(f"reference-part-{rank}.safetensors"), {k: v.contiguous().cpu() for k, v in sums.items()},
                     meta, "reference part")

    def remove_reference_part(self, rank: int) -> None:
        """Removes rank ``rank``'s part, once R holds its sums (nothing if there is none)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._file(f"reference-part-{rank}.safetensors"))

    def merge_reference_parts(self) -> None:
        """Folds the parts of an interrupted distributed reference pass into reference.safetensors (not
        complete) and removes them; rank 0 does it, under the lock, before the pass resumes. A part whose
        pairs R already holds was folded before a crash and is only removed; a part holding some of them
        is refused as ``CorruptFile``."""
        parts = self._reference_parts()
        if not parts:
            return
        sums, ids, complete = self.load_reference()
        digests = self.reference_pairs()
        grew = False
        for path in parts:
            part, meta = self._verified(lambda p: read_tensors(p, "reference part"), path, "reference")
            part_ids, part_digests = json.loads(meta["ids"]), json.loads(meta["digests"])
            self._check_bound(None, part_ids, part_digests)
            held = [pid for pid in part_ids if pid in digests]
            if len(held) == len(part_ids):
                continue
            if held:
                raise CorruptFile(path, f"holds some pairs the reference holds too (e.g. id {held[0]!r})", "reference")
            sums = {k: sums[k].double() + v.double() if k in sums else v.double() for k, v in part.items()}
            digests.update(zip(part_ids, part_digests))
            ids, grew = ids + part_ids, True
        if grew:
            self.save_reference(sums, ids, [digests[pid] for pid in ids], complete=False)
        for path in parts:
            os.remove(path)

    def reference_norms(self) -> dict[str, torch.Tensor]:
        """R's squared row and column norms per weight, written when the reference pass completed."""
        if not os.path.exists(self.reference_norms_path):
            raise self._reference_incomplete()
        norms, meta = self._verified(lambda p: read_tensors(p, "reference norms"), self.reference_norms_path,
                                     "reference")
        sums = self._verified(lambda p: read_metadata(p, "reference sums"), self.reference_path, "reference")
        if meta["sums_sha256"] != sums["sha256"]:
            raise CorruptFile(self.reference_norms_path, "computed from other sums than reference.safetensors holds",
                              "reference")
        return norms

    def load_reference(self) -> tuple[dict[str, torch.Tensor], list[str], bool]:
        """(sums, ids, complete); empty when nothing is stored yet. The ids must be among the pairs R is
        bound to, with the same contents."""
        if not os.path.exists(self.reference_path):
            return {}, [], False
        sums, meta = self._verified(lambda p: read_tensors(p, "reference sums"), self.reference_path, "reference")
        ids = json.loads(meta["ids"])
        self._check_bound(None, ids, json.loads(meta["digests"]))
        return sums, ids, json.loads(meta["complete"])

    def reference_pairs(self) -> dict[str, str]:
        """The content digest of each pair that built R so far, by id; empty before the reference pass."""
        if not os.path.exists(self.reference_path):
            return {}
        meta = self._verified(lambda p: read_metadata(p, "reference sums"), self.reference_path, "reference")
        return dict(zip(json.loads(meta["ids"]), json.loads(meta["digests"])))

    def reference(self) -> tuple[dict[str, torch.Tensor], int, str]:
        """R = sums / N for each weight, N, and the file's hash (that statistics record). Non-finite sums
        are refused here, before any statistics are computed against them."""
        sums, ids, complete = self.load_reference()
        if not complete:
            raise self._reference_incomplete()
        if not all(torch.isfinite(v).all() for v in sums.values()):
            raise NonFiniteStats(self.reference_path, [], "reference")
        with open(self.reference_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return {k: (v.double() / len(ids)).float() for k, v in sums.items()}, len(ids), digest

    # statistics ----------------------------------------------------------------------------------
    def _stats_dir(self, name: str) -> str:
        return self._file("stats", _plain_name("statistics set", name))

    def _chunks(self, name: str) -> list[str]:
        return sorted(glob.glob(os.path.join(self._stats_dir(name), "chunk-*.safetensors")))

    def has_set(self, name: str) -> bool:
        return bool(self._chunks(name))

    def _chunk_metadata(self, name: str) -> list[tuple[str, dict[str, str]]]:
        """(path, metadata) of each chunk of set ``name``, verified: each holds pairs the set is bound to
        (ids and contents), and no pair is in two chunks."""
        out, seen = [], {}
        for path in self._chunks(name):
            meta = self._verified(lambda p: read_metadata(p, "statistics chunk"), path, "extract", name)
            ids = json.loads(meta["ids"])
            self._check_bound(name, ids, json.loads(meta["digests"]))
            twice = [pid for pid in ids if pid in seen]
            if twice:
                raise CorruptFile(path, f"holds pairs that {os.path.basename(seen[twice[0]])} holds too (e.g. id "
                                        f"{twice[0]!r})", "extract", name)
            seen.update(dict.fromkeys(ids, path))
            out.append((path, meta))
        return out

    def done_ids(self, name: str, ref_sha: str) -> set[str]:
        """Ids already stored for set ``name``; refuses chunks made against another R."""
        done = set()
        for path, meta in self._chunk_metadata(name):
            if meta["reference_sha256"] != ref_sha:
                raise RunMismatch(f"{path} was computed against another reference R; use a new set name")
            done.update(json.loads(meta["ids"]))
        return done

    def next_chunk_index(self, name: str) -> int:
        """The number the next chunk of set ``name`` gets: one after the last stored."""
        chunks = self._chunks(name)
        return int(os.path.basename(chunks[-1])[len("chunk-"):-len(".safetensors")]) + 1 if chunks else 0

    def save_chunk(self, name: str, pairs: list, tensors: dict[str, torch.Tensor], ref_sha: str,
                   index: int | None = None) -> str:
        """Stores one batch of ``pairs`` (manifest.Pair): ``tensors`` holds per weight
        "<weight>|<stat>" (B, d); "loss" (B,); "tokens" (N_text, 8) with "token_offsets" (B+1,) (the
        fields of schema.TOKEN_FIELDS). The pairs' ids, content digests, texts, labels and image statistics
        (``manifest.IMAGE_STATS``, for the blind guard) go in the metadata, so that later steps need only
        the run folder. The chunk is numbered after the last
        one (``index``: the number it gets, which ranks writing side by side take from one count), so that a
        chunk deleted to be recomputed never makes a later one be overwritten."""
        index = self.next_chunk_index(name) if index is None else index
        path = os.path.join(self._stats_dir(name), f"chunk-{index:06d}.safetensors")
        meta = {"ids": json.dumps([p.id for p in pairs]), "digests": json.dumps([pair_digest(p) for p in pairs]),
                "reference_sha256": ref_sha,
                "texts": json.dumps([p.text for p in pairs]), "labels": json.dumps([p.label for p in pairs]),
                "image_stats": json.dumps([p.image_statistics() for p in pairs])}
        save_tensors(path, {k: v.cpu().contiguous() for k, v in tensors.items()}, meta, "statistics chunk")
        return path

    def load_stats(self, name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
        """All chunks of a set concatenated: ids, and {"<weight>|<stat>", "loss", "tokens": (n, …),
        "token_offsets": (n+1,)}. A chunk holding NaN or infinite values is refused, naming its pairs."""
        ids, parts, offsets = [], {}, [torch.zeros(1, dtype=torch.int64)]
        for path, _ in self._chunk_metadata(name):
            chunk, meta = self._verified(lambda p: read_tensors(p, "statistics chunk"), path, "extract", name)
            chunk_ids = json.loads(meta["ids"])
            bad = _non_finite(chunk, chunk_ids)
            if bad:
                raise NonFiniteStats(path, bad, "extract", name)
            ids += chunk_ids
            offsets.append(chunk.pop("token_offsets")[1:] + offsets[-1][-1])
            for k, v in chunk.items():
                parts.setdefault(k, []).append(v)
        if len({len(v) for v in parts.values()}) > 1:  # e.g. base_tokens in some chunks only
            raise RunMismatch(f"{self.path}: the chunks of set {name!r} hold different quantities (captured by "
                              "different versions of GradAudit); extract it again into a new set")
        out = {k: torch.cat(v) for k, v in parts.items()}
        out["token_offsets"] = torch.cat(offsets)
        return ids, out

    def pair_digests(self, name: str) -> dict[str, str]:
        """The content digest of each pair of set ``name``, by id, in stored order."""
        digests = {}
        for _, meta in self._chunk_metadata(name):
            digests.update(zip(json.loads(meta["ids"]), json.loads(meta["digests"])))
        return digests

    def pair_info(self, name: str) -> tuple[list[str], list[str], list]:
        """(ids, texts, labels) of set ``name`` in stored order; a label is None where the manifest had none."""
        ids, texts, labels = [], [], []
        for _, meta in self._chunk_metadata(name):
            ids += json.loads(meta["ids"])
            texts += json.loads(meta["texts"])
            labels += json.loads(meta["labels"])
        return ids, texts, labels

    def image_stats(self, name: str) -> np.ndarray | None:
        """(n, len(IMAGE_STATS)) image statistics of set ``name`` in stored order; None for a set
        captured before they were stored."""
        rows = []
        for _, meta in self._chunk_metadata(name):
            if "image_stats" not in meta:
                return None
            rows += json.loads(meta["image_stats"])
        return np.array(rows, dtype=np.float64).reshape(len(rows), len(IMAGE_STATS))

    def stored_set(self, name: str) -> StoredSet:
        """Set ``name`` with R's norms and which pairs built R, as plain arrays. A pair built R when its
        id and content are those of one of R's pairs; an id of R's with other content is refused
        (``IdCollision``), as it would be scored leave-one-out against a gradient that is not in R."""
        _, ref_ids, complete = self.load_reference()
        if not complete:
            raise self._reference_incomplete()
        norms = self.reference_norms()
        ids, stats = self.load_stats(name)
        if not ids:
            raise StageMissing(self.path, "extract", f"no statistics stored for set {name!r}", set_name=name)
        info_ids, texts, labels = self.pair_info(name)
        if info_ids != ids:
            raise RunMismatch(f"{self.path}: set {name!r} has inconsistent chunks; extract it again into a new set")
        weights = sorted({k.split("|")[0] for k in stats if "|" in k})
        members = self.reference_pairs()
        refuse_id_collisions(name, self.pair_digests(name), "the pairs that built R", members)
        return StoredSet(
            ids=ids, texts=texts, labels=labels, weights=weights,
            stats={key: {w: stats[f"{w}|{key}"].double().numpy() for w in weights} for key in STAT_KEYS},
            ref_row_sq={w: norms[f"{w}|row_sq"].double().numpy() for w in weights},
            ref_col_sq={w: norms[f"{w}|col_sq"].double().numpy() for w in weights},
            n_ref=len(ref_ids), in_ref=np.array([i in members for i in ids]),
            loss=stats["loss"].numpy(), tokens=stats["tokens"].numpy(), token_offsets=stats["token_offsets"].numpy(),
            base_tokens=stats["base_tokens"].numpy() if "base_tokens" in stats else None)

    def record_skipped(self, name: str, records: list[dict]) -> None:
        if records:
            write_text(self._file("skipped", f"{_plain_name('set', name)}.jsonl"),
                       "".join(json.dumps(r) + "\n" for r in records))

    # manifests the audit derives -----------------------------------------------------------------
    def manifest_path(self, name: str) -> str:
        """Where a manifest the audit derives is kept (the caller writes it, creating the folder)."""
        return self._file("manifests", f"{_plain_name('manifest', name)}.jsonl")

    # the fit ---------------------------------------------------------------------------------------
    def save_fit(self, summary: dict, arrays: dict[str, np.ndarray]) -> None:
        """The fit: its fitted arrays, then a JSON summary (its structure included) that records the
        arrays' checksum, so that a summary is never read with arrays of another fit."""
        models = save_tensors(self._file("fit", "models.safetensors"),
                              {k: np.ascontiguousarray(v) for k, v in arrays.items()}, {}, "fit arrays")
        write_text(self._file("fit", "summary.json"), json.dumps({**summary, "models_sha256": models}, indent=1))

    def has_fit(self) -> bool:
        return os.path.exists(self._file("fit", "summary.json"))

    def load_fit(self) -> tuple[dict, dict[str, np.ndarray]]:
        if not self.has_fit():
            raise StageMissing(self.path, "fit", "no fit is stored")
        summary = json.loads(self._verified(read_text, self._file("fit", "summary.json"), "fit"))
        path = self._file("fit", "models.safetensors")
        arrays, meta = self._verified(lambda p: read_tensors(p, "fit arrays", "np"), path, "fit")
        if summary.pop("models_sha256", None) != meta["sha256"]:
            raise CorruptFile(path, "not the arrays fit/summary.json was written with", "fit")
        return summary, arrays

    # results per set -------------------------------------------------------------------------------
    def results_dir(self, name: str) -> str:
        return self._file("results", _plain_name("set", name))

    def figure_path(self, name: str, figure: str) -> str:
        """Where the report writes a figure; its folder is created, as the caller writes there at once."""
        path = os.path.join(self.results_dir(name), "figures", f"{figure}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def pairs_csv_path(self, name: str) -> str:
        return os.path.join(self.results_dir(name), "pairs.csv")

    def metrics_path(self, name: str) -> str:
        return os.path.join(self.results_dir(name), "metrics.json")

    def report_path(self, name: str) -> str:
        return os.path.join(self.results_dir(name), "report.html")

    def write_pairs_csv(self, name: str, header: list[str], rows: list[list]) -> str:
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(header)
        w.writerows(rows)
        return write_text(self.pairs_csv_path(name), text.getvalue())

    def write_metrics(self, name: str, metrics: dict) -> str:
        return write_text(self.metrics_path(name), json.dumps(metrics, indent=1, default=float))

    def read_metrics(self, name: str) -> dict:
        return json.loads(self._verified(read_text, self.metrics_path(name), "results", name))

    def write_report(self, name: str, page: str) -> str:
        return write_text(self.report_path(name), page)
