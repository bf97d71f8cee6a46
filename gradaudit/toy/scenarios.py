"""The embedded default's ground truth: generated corpora, models trained here on known members, and
the audit sets drawn from them — shared by ``make demo`` and the evaluation.

Per corpus (``scenes``, ``radiographs``; the manifest format of docs/data-and-runs.md on disk):

* ``members``: the pairs a model is trained on (the first ``n_reference`` are the auditor's known
  members, the rest member probes);
* ``nonmembers``: pairs of the same generator never trained on (the *i.i.d.* protocol: nothing but
  membership separates them);
* ``nonmembers_shifted``: the same images and per-pair details as ``nonmembers``, the texts in another
  voice (the *shifted* protocol, like the paper's COCO runs whose non-members carry machine-written
  captions);
* ``held_out``: more pairs of the generator, for the training recipes' held-out loss only.

Two training scenarios per corpus:

* ``pretrain``: every weight trained from scratch on the corpus's members;
* ``finetune``: the other corpus's ``pretrain`` model as the base, LoRA-fine-tuned on this corpus's
  members (r = width / 4, α = 2r, on the language model's projections), as the paper fine-tunes
  pretrained models.

One tokenizer for every model, trained on a separate sample of both corpora. Recipes are chosen by the
models' own held-out caption loss (``benchmarks/choose_recipes.py``), never by an audit result.
Everything is cached under a root folder, keyed by what made it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from gradaudit.models import load_model
from gradaudit.store.manifest import Pair, read_manifest, write_pairs
from gradaudit.toy.corpora import KINDS, generate, write_manifest
from gradaudit.toy.models import LLAVA_CHAT_TEMPLATE, SIZES, Recipe, build_llava, held_out_loss, save, train
from gradaudit.toy.tokenizers import train_tokenizer

TRAININGS = ("pretrain", "finetune")
SEEDS = {"scenes": 11, "radiographs": 12}  # the generators' seeds; held-out pairs use seed + 1000
TOKENIZER_SEED = 99

# Chosen by held-out caption loss alone (benchmarks/choose_recipes.py → benchmarks/results/recipes_<size>.md),
# committed before any audit of these models. Held-out loss (scenes / radiographs) in the comments.
RECIPES = {
    ("tiny", "pretrain"): Recipe(epochs=10, lr=3e-3, batch_size=32),  # 0.634 / 0.486 (CPU)
    ("tiny", "finetune"): Recipe(epochs=20, lr=3e-3, batch_size=16,  # 2.137 / 1.903 (CPU)
                                 lora_rank=SIZES["tiny"]["width"] // 4),
    ("small", "pretrain"): Recipe(epochs=10, lr=5e-4, batch_size=32),  # 0.907 / 0.702 (H100)
    ("small", "finetune"): Recipe(epochs=10, lr=1e-3, batch_size=16,  # 1.562 / 1.221 (H100 / H200)
                                  lora_rank=SIZES["small"]["width"] // 4),
}


@dataclass(frozen=True)
class Corpus:
    """How many pairs of each kind a corpus folder holds (sample i is the same whatever the counts)."""

    members: int = 1200
    nonmembers: int = 1200
    held_out: int = 200


def other(corpus: str) -> str:
    return KINDS[1 - KINDS.index(corpus)]


def _stamp_matches(path: str, key: dict) -> bool:
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("key") == key


def _write_stamp(path: str, key: dict, **extra) -> None:
    with open(path, "w") as f:
        json.dump({"key": key, **extra}, f, indent=1)


def prepare_corpus(root: str, corpus: str, size: str, counts: Corpus = Corpus()) -> dict[str, str]:
    """Manifests of one corpus under ``root/data/<corpus>-<size>`` (written once; kept while the counts
    and image size are unchanged). Returns {set name: manifest path}."""
    if corpus not in KINDS:
        raise ValueError(f"corpus must be one of {KINDS}; got {corpus!r}")
    folder = os.path.join(root, "data", f"{corpus}-{size}")
    names = ("members", "nonmembers", "nonmembers_shifted", "held_out")
    paths = {n: os.path.join(folder, f"{n}.jsonl") for n in names}
    key = dict(dataclasses.asdict(counts), corpus=corpus, image=SIZES[size]["image"], seed=SEEDS[corpus])
    stamp = os.path.join(folder, "corpus.json")
    if _stamp_matches(stamp, key):
        return paths
    image, seed = SIZES[size]["image"], SEEDS[corpus]
    write_manifest(generate(corpus, counts.members, seed, size=image), folder, "members", corpus)
    for name, style in (("nonmembers", "plain"), ("nonmembers_shifted", "shifted")):
        samples = generate(corpus, counts.nonmembers, seed, style=style, size=image, start=counts.members)
        write_manifest(samples, folder, name, corpus)
    write_manifest(generate(corpus, counts.held_out, seed + 1000, size=image), folder, "held_out", corpus)
    _write_stamp(stamp, key)
    return paths


def tokenizer(root: str, size: str):
    """The tokenizer every model shares (trained once on 1000 plain texts of each corpus, separate seeds)."""
    from transformers import PreTrainedTokenizerFast

    folder = os.path.join(root, "models", f"tokenizer-{size}")
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    texts = [s.text for kind in KINDS for s in generate(kind, 1000, TOKENIZER_SEED, size=8)]
    tok = train_tokenizer(texts, vocab_size=SIZES[size]["vocab"])
    tok.save_pretrained(folder)
    return tok


def _load_pairs(path: str) -> list[Pair]:
    return read_manifest(path)[0]


def train_model(root: str, training: str, corpus: str, size: str = "tiny", counts: Corpus = Corpus(),
                device: str = "cpu", log=print) -> dict:
    """Trains (or finds in the cache) the model of one scenario under its recipe in :data:`RECIPES`;
    returns {"model": folder, "adapter": folder or None, "history": per-epoch losses, "held_out_loss":
    final, "key": what made it}. The finetune base is the other corpus's pretrain model."""
    if training not in TRAININGS:
        raise ValueError(f"training must be one of {TRAININGS}; got {training!r}")
    recipe = RECIPES[(size, training)]
    data = prepare_corpus(root, corpus, size, counts)
    key = dict(training=training, corpus=corpus, size=size, counts=dataclasses.asdict(counts),
               recipe=dataclasses.asdict(recipe), chat_template=LLAVA_CHAT_TEMPLATE)
    folder = os.path.join(root, "models", f"{training}-{corpus}-{size}")
    stamp = os.path.join(folder, "training.json")
    if training == "pretrain":
        out = {"model": folder, "adapter": None}
    else:
        base = train_model(root, "pretrain", other(corpus), size, counts, device=device, log=log)
        key["base"] = base["key"]
        out = {"model": base["model"], "adapter": folder}
    if _stamp_matches(stamp, key):
        with open(stamp) as f:
            return dict(out, **{k: v for k, v in json.load(f).items() if k != "key"}, key=key)

    import torch

    tok = tokenizer(root, size)
    torch.manual_seed(recipe.seed)
    if training == "pretrain":
        model, processor = build_llava(size, tok, seed=recipe.seed)
    else:
        model, processor = load_model(out["model"])
    members, held = _load_pairs(data["members"]), _load_pairs(data["held_out"])
    model.to(device)
    before = held_out_loss(model, processor, held, device=device)
    log(f"training {training} on {len(members)} {corpus} pairs ({size}): held-out loss {before:.3f} before")
    model, history = train(model, processor, members, recipe, held_out=held, device=device,
                           progress=lambda r: log(f"  epoch {r['epoch']}: train {r['train_loss']:.3f}, "
                                                  f"held-out {r['held_out_loss']:.3f}"))
    model.to("cpu")
    save(model, processor, folder)
    result = {"history": history, "held_out_loss_before": before, "held_out_loss": history[-1]["held_out_loss"]}
    _write_stamp(stamp, key, **result)
    return dict(out, **result, key=key)


REFERENCE_POOL = 200  # the first pairs of each side are the known ones; probes come after them


def audit_sets(root: str, corpus: str, size: str, n_reference: int = REFERENCE_POOL, n_probes: int = 1000,
               protocol: str = "iid", counts: Corpus = Corpus(), pool: int = REFERENCE_POOL) -> dict[str, str]:
    """Manifests of one audit: the first ``n_reference`` known members and non-members (of a pool of
    ``pool``), and ``n_probes`` labelled member and non-member probes after the pool — the same probes
    whatever the reference size. ``protocol``: ``iid`` or ``shifted`` (which non-members)."""
    if protocol not in ("iid", "shifted"):
        raise ValueError(f"protocol must be 'iid' or 'shifted'; got {protocol!r}")
    if not 0 < n_reference <= pool or pool + n_probes > min(counts.members, counts.nonmembers):
        raise ValueError(f"{n_reference} reference pairs (at most {pool}) and {n_probes} probes per side "
                         f"do not fit the corpus ({counts.members} members, {counts.nonmembers} non-members)")
    data = prepare_corpus(root, corpus, size, counts)
    members = _load_pairs(data["members"])
    nonmembers = _load_pairs(data["nonmembers" if protocol == "iid" else "nonmembers_shifted"])
    folder = os.path.join(root, "audits", f"{corpus}-{size}-{protocol}-{n_reference}-of-{pool}-{n_probes}")
    probe_m, probe_n = (side[pool:pool + n_probes] for side in (members, nonmembers))
    return {
        "reference_members": write_pairs(os.path.join(folder, "reference_members.jsonl"), members[:n_reference]),
        "reference_nonmembers": write_pairs(os.path.join(folder, "reference_nonmembers.jsonl"),
                                            nonmembers[:n_reference]),
        "probes": write_pairs(os.path.join(folder, "probes.jsonl"), probe_m + probe_n,
                              labels=[1] * len(probe_m) + [0] * len(probe_n)),
    }


def collection_sets(root: str, corpus: str, size: str, n_members: int = 200, n_nonmembers: int = 500,
                    n_collection: int = 500, counts: Corpus = Corpus()) -> dict[str, str]:
    """Manifests of the collection audit on one corpus (i.i.d. protocol): the first ``n_members``
    members known as such, the first ``n_nonmembers`` non-members known as such (V), a collection of
    the next ``n_collection`` members (all used in training) and one of the next ``n_collection``
    non-members (fresh: none used), labelled."""
    if n_members + n_collection > counts.members or n_nonmembers + n_collection > counts.nonmembers:
        raise ValueError(f"{n_members} known members, {n_nonmembers} known non-members and collections of "
                         f"{n_collection} do not fit the corpus ({counts.members} members, {counts.nonmembers} "
                         "non-members)")
    data = prepare_corpus(root, corpus, size, counts)
    members, nonmembers = _load_pairs(data["members"]), _load_pairs(data["nonmembers"])
    folder = os.path.join(root, "audits", f"{corpus}-{size}-collections-{n_members}-{n_nonmembers}-{n_collection}")
    used = members[n_members:n_members + n_collection]
    fresh = nonmembers[n_nonmembers:n_nonmembers + n_collection]
    return {
        "reference_members": write_pairs(os.path.join(folder, "reference_members.jsonl"), members[:n_members]),
        "reference_nonmembers": write_pairs(os.path.join(folder, "reference_nonmembers.jsonl"),
                                            nonmembers[:n_nonmembers]),
        "used": write_pairs(os.path.join(folder, "used.jsonl"), used, labels=[1] * len(used)),
        "fresh": write_pairs(os.path.join(folder, "fresh.jsonl"), fresh, labels=[0] * len(fresh)),
    }
