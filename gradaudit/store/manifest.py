"""Audited pairs in: the JSONL manifest (docs/data-and-runs.md), checked line by line before any work.

One pair a line: ``{"id", "image" (a path relative to the manifest), "prompt" (optional), "text"}``
and an optional ``"label"`` (1 member, 0 non-member); no other key. Every problem is reported with its
manifest line; the caller chooses to skip bad lines (keeping a record) or to stop before any work.
Manifests may come from someone else, so an image outside the manifest's folder is refused unless the
caller allows it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from gradaudit.errors import ConfigError, ManifestError

DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Pair:
    id: str
    image: str  # absolute path
    text: str
    prompt: str = DEFAULT_PROMPT
    label: int | None = None
    line: int = 0  # 1-based line of the manifest

    def load_image(self) -> Image.Image:
        with Image.open(self.image) as im:
            return im.convert("RGB")

    def image_statistics(self) -> list[float]:
        """The image's :data:`IMAGE_STATS`, read without a model: the blind guard's image features (a
        collection whose images differ from the known non-members' in size, compression or colour
        differs by distribution, not by training)."""
        rgb = np.asarray(self.load_image(), dtype=np.float64) / 255.0
        height, width = rgb.shape[:2]
        size = os.path.getsize(self.image)
        gray = rgb.mean(axis=2)
        return [float(width), float(height), float(size), size / (width * height), float(gray.mean()),
                float(gray.std()), *(float(rgb[..., c].mean()) for c in range(3))]


@dataclass(frozen=True)
class Problem:
    line: int
    id: str | None
    reason: str

    def __str__(self):
        who = f" (id {self.id!r})" if self.id is not None else ""
        return f"line {self.line}{who}: {self.reason}"


KEYS = ("id", "image", "prompt", "text", "label")
IMAGE_STATS = ("image_width", "image_height", "image_file_bytes", "image_file_bytes_per_pixel", "image_mean",
               "image_std", "image_red", "image_green", "image_blue")
OUTSIDE = "outside the manifest's folder"  # the reason's words for an image elsewhere (the CLI looks for them)


def _unicode_problem(rec: dict) -> str | None:
    """JSON may spell lone surrogates (``"\\ud800"``), which no file or CSV can hold as UTF-8."""
    for key, value in rec.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f'"{key}" holds a lone surrogate (\\ud800–\\udfff), not text'
    return None


def _inside(root: str, path: str) -> bool:
    """Whether ``path`` (normalised) lies in the folder ``root``, by its spelling: a link inside the
    folder is followed wherever it leads, since only the folder's owner can make one."""
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # another drive
        return False


def _id_of(rec: dict) -> str | None:
    """The line's id as a string (an integer is read as its string), or None without a usable one."""
    pid = rec.get("id")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
        return None
    return str(pid)


def _short(value) -> str:
    """``repr(value)`` cut to 40 characters: a reason quotes what the line holds, which may be long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_line(raw: str, line: int, root: str, seen: set[str],
                allow_outside: bool) -> tuple[Pair | None, Problem | None]:
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, Problem(line, None, f"not valid JSON ({exc.msg} at column {exc.colno})")
    except (ValueError, RecursionError) as exc:  # a number of over 4300 digits; nesting too deep
        return None, Problem(line, None, f"not valid JSON ({type(exc).__name__}: {exc})")
    if not isinstance(rec, dict):
        return None, Problem(line, None, "not a JSON object")
    pid = _id_of(rec)
    unknown = sorted(set(rec) - set(KEYS))
    if unknown:
        listed = ", ".join(_short(k) for k in unknown)
        return None, Problem(line, pid, f"unknown key(s) {listed}; the keys are {', '.join(KEYS)}")
    if pid is None:
        return None, Problem(line, None, 'missing "id" (a non-empty string)')
    unreadable = _unicode_problem(rec)
    if unreadable:
        return None, Problem(line, pid, unreadable)
    if pid in seen:
        return None, Problem(line, pid, "duplicate id (an earlier line has it)")
    text, image = rec.get("text"), rec.get("image")
    if not isinstance(text, str) or not text.strip():
        return None, Problem(line, pid, 'empty or missing "text"')
    if not isinstance(image, str) or not image:
        return None, Problem(line, pid, 'missing "image" (a path relative to the manifest)')
    path = os.path.normpath(os.path.join(root, image))
    if not allow_outside and not _inside(root, path):
        return None, Problem(line, pid, f"image {_short(image)} is {OUTSIDE} {root}; not read")
    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        return None, Problem(line, pid, f"image not found: {path}")
    except Exception as exc:  # PIL raises many types for a broken file
        return None, Problem(line, pid, f"image unreadable: {path} ({type(exc).__name__}: {exc})")
    prompt = rec.get("prompt", DEFAULT_PROMPT)
    if not isinstance(prompt, str):
        return None, Problem(line, pid, '"prompt" must be a string')
    label = rec.get("label")
    if label is not None and (type(label) is not int or label not in (0, 1)):
        return None, Problem(line, pid, f'"label" must be the integer 1 (member) or 0 (non-member), or absent; '
                                        f"got {_short(label)}")
    return Pair(pid, path, text, prompt or DEFAULT_PROMPT, label, line), None


def read_manifest(path: str, on_error: str = "stop", *,
                  allow_outside: bool = False) -> tuple[list[Pair], list[Problem]]:
    """Reads and checks a manifest. ``on_error``: "stop" raises :class:`ManifestError` listing every bad
    line; "skip" leaves them out. An image outside the manifest's folder (an absolute path elsewhere, or
    one that climbs out with ``..``) is a bad line unless ``allow_outside``: a manifest from someone else
    should not make the audit read files it was not pointed at. Returns (pairs, problems)."""
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on_error must be 'stop' or 'skip'; got {on_error!r}")
    root = os.path.dirname(os.path.abspath(path))
    pairs, problems, seen = [], [], set()
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()  # the line breaks text mode knows: \n, \r\n and \r
    except OSError as exc:
        raise ConfigError(f"cannot read the manifest {path}: {exc}") from exc
    for i, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(i, None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))
            continue
        if not text.strip():
            continue
        pair, problem = _check_line(text, i, root, seen, allow_outside)
        if problem is not None:
            problems.append(problem)
        else:
            seen.add(pair.id)
            pairs.append(pair)
    if problems and on_error == "stop":
        raise ManifestError(path, problems)
    if not pairs:
        raise ConfigError(f"{path}: no usable pair ({len(problems)} bad line(s))")
    return pairs, problems


def problems_as_records(problems: list[Problem]) -> list[dict]:
    return [asdict(p) for p in problems]


def batches_by_length(pairs: list[Pair], batch_size: int, length=lambda p: len(p.prompt) + len(p.text)):
    """Batches of pairs of similar length (less padding), each batch in manifest order inside."""
    order = sorted(range(len(pairs)), key=lambda i: (length(pairs[i]), i))
    for start in range(0, len(order), batch_size):
        yield [pairs[i] for i in sorted(order[start : start + batch_size])]


def write_pairs(path: str, pairs: list[Pair], labels: list[int] | None = None, texts: list[str] | None = None,
                id_suffix: str = "", at_source_lines: bool = False) -> str:
    """Writes ``pairs`` as a manifest (absolute image paths, so it can live anywhere), optionally with
    labels, replaced texts and a suffix on every id; returns ``path``. ``at_source_lines``: each pair on
    the line it had in its own manifest (empty lines between; the pairs in that manifest's order), so a
    problem found later in this derived manifest names the line of the user's file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        line = 0
        for i, p in enumerate(pairs):
            if at_source_lines:
                f.write("\n" * (p.line - line - 1))
                line = p.line
            rec = {"id": p.id + id_suffix, "image": p.image, "prompt": p.prompt,
                   "text": p.text if texts is None else texts[i]}
            if labels is not None:
                rec["label"] = labels[i]
            f.write(json.dumps(rec) + "\n")
    return path


def shuffled_texts(pairs: list[Pair], seed: int = 0) -> list[str]:
    """Each pair's text replaced by another pair's (a random cyclic derangement): the association test's
    negatives — the same images with texts of the same collection, only not their own."""
    if len(pairs) < 2:
        raise ValueError("shuffling texts needs at least 2 pairs")
    order = np.random.default_rng(seed).permutation(len(pairs))
    source = np.empty(len(pairs), dtype=int)
    source[order] = np.roll(order, -1)  # along a random cycle every pair takes the next one's text
    return [pairs[j].text for j in source]
