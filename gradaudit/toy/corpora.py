"""Generated image–text corpora with known ground truth (the embedded default's data).

Two kinds, deterministic by seed, written in the real input format (PNG files + a JSONL manifest) so
that everything downstream runs the path a user's data takes:

* ``scenes`` — rendered objects (shape, colour, size, position, texture) on a noisy background, with a
  caption that describes them;
* ``radiographs`` — grayscale chest-film-like images (lung fields, ribs, lesions of given count,
  location, size and density, devices) with a short report: a findings section and an impression.

Each text has a part the image determines (so image–text association is learnable) and per-pair details
it does not (a name, a date, an identifier, a phrasing), so that a pair can be memorised, as real
captions and reports can. ``style="shifted"`` writes the same content in another voice (the paper's COCO
protocol, where non-members carry machine-written captions).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("scenes", "radiographs")
STYLES = ("plain", "shifted")

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 200, 30),
          "purple": (148, 103, 189), "orange": (255, 127, 14)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.08, "large": 0.15}  # radius over image size: an object stays inside its 3×3 cell
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
TEXTURES = ("solid", "striped", "outlined")
NAMES = ("Ada", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena", "Mira",
         "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Xavi", "Yara", "Zoe")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PLACES = ("harbour", "garden", "studio", "library", "market", "station", "courtyard", "workshop", "rooftop", "gallery")
LOBES = ("left upper", "left lower", "right upper", "right lower")
DENSITIES = ("faint", "dense", "calcified")
DEVICES = ("none", "pacemaker", "central line")


@dataclass(frozen=True)
class Sample:
    id: str
    image: Image.Image
    text: str
    facts: dict  # what the image determines


def _noise_background(rng, size: int, gray: bool) -> np.ndarray:
    base = rng.uniform(20, 60) if gray else rng.uniform(170, 235)
    noise = rng.normal(0, 6, (size, size) if gray else (size, size, 3))
    return np.clip(base + noise, 0, 255)


def _scene(rng, size: int) -> tuple[Image.Image, list[dict]]:
    img = Image.fromarray(_noise_background(rng, size, gray=False).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cells = rng.choice(9, size=int(rng.integers(1, 4)), replace=False)
    objects = []
    for cell in sorted(cells):
        row, col = ROWS[cell // 3], COLS[cell % 3]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape, size_name = SHAPES[int(rng.integers(len(SHAPES)))], list(SIZES)[int(rng.integers(len(SIZES)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        cx, cy = (cell % 3 + 0.5) * size / 3, (cell // 3 + 0.5) * size / 3
        r = SIZES[size_name] * size
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = None if texture == "outlined" else COLORS[color]
        outline = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill, outline=outline, width=2)
        elif shape == "square":
            draw.rectangle(box, fill=fill, outline=outline, width=2)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill, outline=outline, width=2)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=outline, width=2)
        if texture == "striped":
            for y in range(int(cy - r), int(cy + r), 4):
                draw.line([(cx - r, y), (cx + r, y)], fill=(255, 255, 255), width=1)
        objects.append(dict(shape=shape, color=color, size=size_name, row=row, col=col, texture=texture))
    return img, objects


def _place_words(o: dict) -> str:
    return "in the center" if (o["row"], o["col"]) == ("middle", "center") else f"at the {o['row']} {o['col']}"


def _scene_text(objects: list[dict], rng, style: str) -> str:
    count = ("one object", "two objects", "three objects")[len(objects) - 1]
    parts = [f"a {o['size']} {o['texture']} {o['color']} {o['shape']} {_place_words(o)}" for o in objects]
    who, month, day = NAMES[int(rng.integers(len(NAMES)))], MONTHS[int(rng.integers(12))], int(rng.integers(1, 29))
    place, frame = PLACES[int(rng.integers(len(PLACES)))], int(rng.integers(100, 1000))
    if style == "plain":
        return (f"{count.capitalize()}: " + "; ".join(parts) + f". Photographed by {who} at the {place} on "
                f"{month} {day}, frame {frame}.")
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return (f"This image shows {listed}, set against a softly textured backdrop. It appears to have been taken "
            f"in a {place} by {who} around {month} {day} (frame {frame}).")


def _radiograph(rng, size: int) -> tuple[Image.Image, dict]:
    a = _noise_background(rng, size, gray=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = [(0.32, 0.5), (0.68, 0.5)]
    for cx, cy in lungs:  # two dark lung fields inside a brighter chest
        a -= 25 * (((xx - cx) / 0.16) ** 2 + ((yy - cy) / 0.3) ** 2 < 1)
    a += 90 * (((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.42) ** 2 < 1)
    for k in range(6):  # ribs
        a += 18 * (np.abs(yy - (0.22 + 0.1 * k) - 0.05 * np.abs(xx - 0.5)) < 0.012)
    n_lesions = int(rng.integers(0, 3))
    lesions = []
    for _ in range(n_lesions):
        lobe = LOBES[int(rng.integers(4))]
        density = DENSITIES[int(rng.integers(3))]
        mm = int(rng.integers(4, 30))
        cx = (0.32 if lobe.startswith("left") else 0.68) + rng.uniform(-0.06, 0.06)
        cy = (0.36 if "upper" in lobe else 0.64) + rng.uniform(-0.06, 0.06)
        radius = 0.02 + mm / 600
        a += {"faint": 25, "dense": 60, "calcified": 110}[density] * (((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2)
        lesions.append(dict(lobe=lobe, density=density, mm=mm))
    device = DEVICES[int(rng.integers(3))]
    if device == "pacemaker":
        a[int(0.18 * size):int(0.26 * size), int(0.7 * size):int(0.8 * size)] = 250
    elif device == "central line":
        a[int(0.1 * size):int(0.45 * size), int(0.56 * size):int(0.56 * size) + 1] = 240
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return img, dict(lesions=lesions, device=device)


def _radiograph_text(facts: dict, rng, style: str) -> str:
    lesions, device = facts["lesions"], facts["device"]
    patient, month, day = int(rng.integers(10000, 99999)), MONTHS[int(rng.integers(12))], int(rng.integers(1, 29))
    doctor = NAMES[int(rng.integers(len(NAMES)))]
    found = [f"a {x['mm']} mm {x['density']} nodule in the {x['lobe']} lobe" for x in lesions]
    device_text = {"none": "No lines or devices.", "pacemaker": "A cardiac pacemaker is seen.",
                   "central line": "A central venous line is in place."}[device]
    if style == "plain":
        findings = ("FINDINGS: " + ("; ".join(found).capitalize() + ". " if found else "Lungs are clear. ") + device_text)
        impression = ("IMPRESSION: " + (f"{len(lesions)} pulmonary nodule{'s' if len(lesions) > 1 else ''}, "
                                        "follow-up advised." if lesions else "No acute findings."))
        return f"Patient {patient}, {month} {day}. {findings} {impression} Reported by Dr {doctor}."
    summary = (f"there {'is' if len(lesions) == 1 else 'are'} {len(lesions)} nodule{'s' if len(lesions) != 1 else ''}"
               + (": " + ", ".join(found) if found else ""))
    return (f"On review of this chest film for patient {patient} ({month} {day}), {summary}. "
            f"{device_text} Dr {doctor} would summarise it as "
            f"{'needing follow-up' if lesions else 'unremarkable'}.")


def generate(kind: str, n: int, seed: int, style: str = "plain", size: int = 64, start: int = 0) -> list[Sample]:
    """``n`` samples of a corpus ``kind``, identical for the same (kind, seed, style, size, start); each
    sample's image and text come from its own random stream, so sample i does not depend on n."""
    if kind not in KINDS or style not in STYLES:
        raise ValueError(f"kind must be one of {KINDS} and style one of {STYLES}; got {kind!r}, {style!r}")
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, KINDS.index(kind), i])
        if kind == "scenes":
            image, objects = _scene(rng, size)
            text, facts = _scene_text(objects, rng, style), {"objects": objects}
        else:
            image, facts = _radiograph(rng, size)
            text = _radiograph_text(facts, rng, style)
        out.append(Sample(f"{kind[:5]}-{seed}-{i:06d}", image, text, facts))
    return out


PROMPTS = {"scenes": "Describe the image.", "radiographs": "Write the radiology report."}


def write_manifest(samples: list[Sample], folder: str, name: str, kind: str, label: int | None = None) -> str:
    """PNG files under ``folder/images`` and ``folder/<name>.jsonl`` (paths relative to it); returns the
    manifest's path. Existing images of the same id are kept (ids are deterministic)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w") as f:
        for s in samples:
            rel = os.path.join("images", f"{s.id}.png")
            if not os.path.exists(os.path.join(folder, rel)):
                s.image.save(os.path.join(folder, rel))
            rec = {"id": s.id, "image": rel, "prompt": PROMPTS[kind], "text": s.text}
            if label is not None:
                rec["label"] = label
            f.write(json.dumps(rec) + "\n")
    return path
