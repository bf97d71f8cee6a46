"""A run folder keeps one audit's results as they are produced (DESIGN.md §5): safetensors and JSON only.

    fingerprint.json                 model configuration and weights hashes, the selected weights
    reference.safetensors            R sums per weight (fp32), with the ids and N in its metadata
    reference_norms.safetensors      R's squared row and column norms per weight, once R is complete
    stats/<set>/chunk-000000.safetensors   per-sample statistics of one batch, ids in the metadata
    skipped/<set>.jsonl              manifest lines left out, with the reason

Every file is written to a temporary name and renamed, so a crash loses at most the batch in flight,
and rerunning continues from what is there without duplicating a sample.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from gradaudit.capture import BatchResult

STAT_KEYS = ("row_sq", "col_sq", "row_dot", "col_dot")


class RunMismatch(ValueError):
    """Stored results were made with another model, selection or reference."""


def _text(text: str):
    return lambda path: Path(path).write_text(text)


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)

    # fingerprint ---------------------------------------------------------------------------------
    def bind(self, fingerprint: dict) -> None:
        """Records the fingerprint, or checks it against the one recorded; says what differs."""
        path = os.path.join(self.path, "fingerprint.json")
        if not os.path.exists(path):
            _atomic(path, _text(json.dumps(fingerprint, indent=1)))
            return
        with open(path) as f:
            stored = json.load(f)
        keys = ("config_sha256", "weights_sha256", "adapter_sha256", "targets", "mode", "autocast")
        differs = [k for k in keys if stored.get(k) != fingerprint.get(k)]
        if differs:
            what = {"config_sha256": "the model's configuration", "weights_sha256": "the model's weights",
                    "adapter_sha256": "the adapter", "targets": "the selected weights (preset or pattern)",
                    "mode": "the mode (eval or train)", "autocast": "the autocast setting"}
            raise RunMismatch(
                f"{self.path} holds results of another run: {', '.join(what[k] for k in differs)} differ(s). "
                "Use a new run folder, or the model and selection it was made with."
            )

    # reference -----------------------------------------------------------------------------------
    @property
    def reference_path(self) -> str:
        return os.path.join(self.path, "reference.safetensors")

    @property
    def reference_norms_path(self) -> str:
        return os.path.join(self.path, "reference_norms.safetensors")

    def save_reference(self, sums: dict[str, torch.Tensor], ids: list[str], complete: bool) -> None:
        """R's sums over the ids so far; once complete, also R's squared row and column norms
        ("<weight>|row_sq", "<weight>|col_sq"), which cosines and leave-one-out need."""
        meta = {"ids": json.dumps(ids), "n": str(len(ids)), "complete": json.dumps(complete)}
        tensors = {k: v.contiguous().cpu() for k, v in sums.items()}
        if complete:
            norms = {}
            for name, total in tensors.items():
                r_sq = (total.double() / len(ids)) ** 2
                norms[f"{name}|row_sq"], norms[f"{name}|col_sq"] = r_sq.sum(1).float(), r_sq.sum(0).float()
            _atomic(self.reference_norms_path, lambda p: save_file(norms, p, metadata={"n": str(len(ids))}))
        _atomic(self.reference_path, lambda p: save_file(tensors, p, metadata=meta))

    def reference_norms(self) -> dict[str, torch.Tensor]:
        """R's squared row and column norms per weight, written when the reference pass completed."""
        if not os.path.exists(self.reference_norms_path):
            raise ValueError(f"{self.path}: the reference pass has not finished; run `gradaudit reference` first")
        return load_file(self.reference_norms_path)

    def load_reference(self) -> tuple[dict[str, torch.Tensor], list[str], bool]:
        """(sums, ids, complete); empty when nothing is stored yet."""
        if not os.path.exists(self.reference_path):
            return {}, [], False
        with safe_open(self.reference_path, "pt") as f:
            meta = f.metadata()
        return load_file(self.reference_path), json.loads(meta["ids"]), json.loads(meta["complete"])

    def reference(self) -> tuple[dict[str, torch.Tensor], int, str]:
        """R = sums / N for each weight, N, and the file's hash (that statistics record)."""
        sums, ids, complete = self.load_reference()
        if not complete:
            raise ValueError(f"{self.path}: the reference pass has not finished; run `gradaudit reference` first")
        with open(self.reference_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return {k: v / len(ids) for k, v in sums.items()}, len(ids), digest

    # statistics ----------------------------------------------------------------------------------
    def _stats_dir(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"a statistics set needs a plain name; got {name!r}")
        return os.path.join(self.path, "stats", name)

    def done_ids(self, name: str, ref_sha: str) -> set[str]:
        """Ids already stored for set ``name``; refuses chunks made against another R."""
        done = set()
        for path in sorted(glob.glob(os.path.join(self._stats_dir(name), "chunk-*.safetensors"))):
            with safe_open(path, "pt") as f:
                meta = f.metadata()
            if meta["reference_sha256"] != ref_sha:
                raise RunMismatch(f"{path} was computed against another reference R; use a new set name")
            done.update(json.loads(meta["ids"]))
        return done

    def save_chunk(self, name: str, pairs: list, result: BatchResult, ref_sha: str) -> str:
        """Stores one batch of ``pairs`` (data.Pair): per weight "<weight>|<stat>" (B, d); "loss" (B,);
        "tokens" (N_text, 8) with "token_offsets" (B+1,) (the fields of stats.TOKEN_FIELDS); the pairs'
        ids, texts and labels in the metadata, so that later steps need only the run folder."""
        ids = [p.id for p in pairs]
        folder = self._stats_dir(name)
        os.makedirs(folder, exist_ok=True)
        index = len(glob.glob(os.path.join(folder, "chunk-*.safetensors")))
        tensors = {"loss": result.losses.float().cpu(), "tokens": result.tokens.float().cpu().contiguous(),
                   "token_offsets": result.token_offsets.cpu()}
        for target, s in result.stats.items():
            for key in STAT_KEYS:
                value = getattr(s, key)
                if value is not None:
                    tensors[f"{target}|{key}"] = value.float().cpu().contiguous()
        path = os.path.join(folder, f"chunk-{index:06d}.safetensors")
        meta = {"ids": json.dumps(ids), "reference_sha256": ref_sha, "texts": json.dumps([p.text for p in pairs]),
                "labels": json.dumps([p.label for p in pairs])}
        _atomic(path, lambda p: save_file(tensors, p, metadata=meta))
        return path

    def pair_info(self, name: str) -> tuple[list[str], list[str], list]:
        """(ids, texts, labels) of set ``name`` in stored order; a label is None where the manifest had none."""
        ids, texts, labels = [], [], []
        for path in sorted(glob.glob(os.path.join(self._stats_dir(name), "chunk-*.safetensors"))):
            with safe_open(path, "pt") as f:
                meta = f.metadata()
            ids += json.loads(meta["ids"])
            texts += json.loads(meta["texts"])
            labels += json.loads(meta["labels"])
        return ids, texts, labels

    def load_stats(self, name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
        """All chunks of a set concatenated: ids, and {"<weight>|<stat>", "loss", "tokens": (n, …),
        "token_offsets": (n+1,)}."""
        ids, parts, offsets = [], {}, [torch.zeros(1, dtype=torch.int64)]
        for path in sorted(glob.glob(os.path.join(self._stats_dir(name), "chunk-*.safetensors"))):
            with safe_open(path, "pt") as f:
                ids += json.loads(f.metadata()["ids"])
            chunk = load_file(path)
            offsets.append(chunk.pop("token_offsets")[1:] + offsets[-1][-1])
            for k, v in chunk.items():
                parts.setdefault(k, []).append(v)
        out = {k: torch.cat(v) for k, v in parts.items()}
        out["token_offsets"] = torch.cat(offsets)
        return ids, out

    def slice_set(self, name: str):
        """Set ``name`` as the method's plain arrays: (ids, SliceSet with R's norms and N, and which pairs
        built R), plus the other stored per-pair arrays ("loss", "tokens", "token_offsets")."""
        import numpy as np

        from gradaudit.method import SliceSet

        _, ref_ids, complete = self.load_reference()
        if not complete:
            raise ValueError(f"{self.path}: the reference pass has not finished; run `gradaudit reference` first")
        norms = self.reference_norms()
        ids, stats = self.load_stats(name)
        if not ids:
            raise ValueError(f"{self.path}: no statistics stored for set {name!r}; run `gradaudit extract` first")
        weights = sorted({k.split("|")[0] for k in stats if "|" in k})
        arrays = {key: {w: stats[f"{w}|{key}"].double().numpy() for w in weights}
                  for key in ("row_dot", "row_sq", "col_dot", "col_sq")}
        members = set(ref_ids)
        pairs = SliceSet(weights, **arrays,
                         ref_row_sq={w: norms[f"{w}|row_sq"].double().numpy() for w in weights},
                         ref_col_sq={w: norms[f"{w}|col_sq"].double().numpy() for w in weights},
                         n_ref=len(ref_ids), in_ref=np.array([i in members for i in ids]))
        rest = {k: v.numpy() for k, v in stats.items() if "|" not in k}
        return ids, pairs, rest

    def record_skipped(self, name: str, records: list[dict]) -> None:
        if not records:
            return
        folder = os.path.join(self.path, "skipped")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.jsonl")
        _atomic(path, _text("".join(json.dumps(r) + "\n" for r in records)))
