"""The two capture passes over a manifest into a run folder (resumable): the reference gradient R over
members, then per-sample statistics of any set against R; and the table of what a selection picks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gradaudit import distributed
from gradaudit.capture.engine import batch_stats, join_chunks, reference_sums
from gradaudit.capture.format_check import candidates, format_table, rank_formats
from gradaudit.errors import ConfigError, ManifestError, OptionError
from gradaudit.models import (PRESETS, PromptFormat, batch_layout, encode_pairs, fingerprint, load_model, prompt_format,
                              select_targets)
from gradaudit.models.loading import DTYPES, input_device
from gradaudit.ops.backends import NAMES as BACKENDS
from gradaudit.store.integrity import refuse_id_collisions
from gradaudit.store.manifest import Pair, Problem, batches_by_length, problems_as_records, read_manifest
from gradaudit.store.runfolder import RunFolder


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements


@dataclass(frozen=True)
class Options:
    """How a capture runs. ``mode`` "train" keeps dropout on (then no leave-one-out later: the
    statistics pass does not see the gradients that built R); ``autocast`` "bfloat16" runs the forward
    under autocast; ``prompt_format`` is how pairs become the model's text ("chat-template", "plain" or a
    template: gradaudit.models.formats). All three are part of the run's fingerprint. ``allow_outside``:
    read images outside a manifest's folder (refused by default: a manifest may come from someone else).
    ``device_map``: a model larger than one GPU placed across the machine's by accelerate ("auto", …, or
    a table of module names to devices; ``models.load_model``), one process; not part of the fingerprint
    (where a layer runs does not change what it computes).

    Every value is checked when the options are made, before a model is loaded, since they come from
    a command line or a TOML file: a wrong type, an unknown choice, a regular expression that does not
    compile or a device this machine lacks raises :class:`OptionError` naming the option."""

    adapter: str | None = None
    preset: str = "paper"
    pattern: str | None = None
    batch_size: int = 8
    on_error: str = "stop"
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    mode: str = "eval"
    autocast: str | None = None
    prompt_format: str | None = None
    progress: bool = True
    allow_outside: bool = False
    device_map: str | dict | None = None

    @classmethod
    def of(cls, **options) -> Options:
        """Options from keyword values, an unknown name refused with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown capture option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def __post_init__(self):
        choices = {"preset": PRESETS, "on_error": ("stop", "skip"), "dtype": tuple(DTYPES), "backend": BACKENDS,
                   "mode": ("eval", "train"), "autocast": (None, "bfloat16", "float16")}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if not (value is None or isinstance(value, str)) or value not in allowed:
                raise OptionError(name, f"{name} must be one of {allowed}; got {value!r}")
        for name in ("adapter", "pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise OptionError(name, f"{name} must be a non-empty string; got {value!r}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise OptionError("pattern", f"pattern {self.pattern!r} is not a regular expression: {exc}") from None
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OptionError("batch_size", f"batch_size must be an integer of at least 1; got {self.batch_size!r}")
        for name in ("progress", "allow_outside"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"{name} must be true or false; got {getattr(self, name)!r}")
        if self.prompt_format is not None:
            try:
                PromptFormat(self.prompt_format)
            except ConfigError as exc:
                raise OptionError("prompt_format", str(exc)) from None
        self._check_device(self.device)
        self._check_device_map(self.device_map)

    @staticmethod
    def _check_device_map(device_map) -> None:
        """None, one of accelerate's placements, or a dict of module names to devices."""
        if device_map is None or (isinstance(device_map, str) and device_map in DEVICE_MAPS):
            return
        if isinstance(device_map, dict) and all(isinstance(k, str) and isinstance(v, (str, int))
                                                for k, v in device_map.items()):
            return
        raise OptionError("device_map", f"device_map must be one of {DEVICE_MAPS} or a table of module names to "
                                        f"devices (\"cpu\", \"cuda:N\", \"disk\"); got {device_map!r}")

    @staticmethod
    def _check_device(device) -> None:
        """A device string this machine can run on: "cpu" or "cuda[:N]" with that GPU present."""
        try:
            parsed = torch.device(device) if isinstance(device, str) else None
        except RuntimeError:  # torch's own message lists every device type it knows
            parsed = None
        if parsed is None or parsed.type not in ("cpu", "cuda"):
            raise OptionError("device", f"device must be 'cpu' or 'cuda[:N]'; got {device!r}")
        count = torch.cuda.device_count() if parsed.type == "cuda" and torch.cuda.is_available() else 0
        if parsed.type == "cuda" and count == 0:
            raise OptionError("device", f"device {device!r} needs CUDA, which this machine's torch does not see "
                                        "(torch.cuda.is_available() is False)")
        if parsed.type == "cuda" and parsed.index is not None and parsed.index >= count:
            raise OptionError("device", f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
                                        f"cuda:{count - 1}")


def _setup(model_dir, folder: RunFolder, opt: Options):
    """The model, its processor and selected weights; binds the run folder to their fingerprint."""
    model, processor = load_model(model_dir, adapter=opt.adapter, dtype=opt.dtype, device=opt.device,
                                  device_map=opt.device_map)
    model.train(opt.mode == "train")
    targets = select_targets(model, opt.preset, opt.pattern)
    fmt = prompt_format(model, processor, opt.prompt_format)
    with distributed.main_first():  # rank 0 writes the fingerprint; the others find it and compare
        folder.bind(fingerprint(model, targets) | {"mode": opt.mode, "autocast": opt.autocast,  # compared
                                                   "prompt_format": fmt.spec,
                                                   "model": os.path.abspath(model_dir),  # recorded only
                                                   "model_type": model.config.model_type, "adapter": opt.adapter})
    return model, processor, targets


def joined(opt: Options) -> Options:
    """Joins the torchrun group, if launched in one (``gradaudit.distributed``), and returns the options
    of this rank: "cuda" becomes this rank's GPU. Before a run folder's lock is taken: rank 0 takes it
    for all."""
    try:
        w, device = distributed.join(opt.device)
    except ValueError as exc:
        raise OptionError("device", str(exc)) from None
    if w.size > 1 and opt.device_map is not None:
        raise OptionError("device_map", "device_map places one model across a machine's GPUs in one process; under "
                                        "torchrun each rank holds a whole model on its GPU: use one or the other")
    return dataclasses.replace(opt, device=device)


def _input_device(model, opt: Options):
    """Where batches go in: the options' device, or for a model placed by a device map its embedding's."""
    return opt.device if opt.device_map is None else input_device(model)


def _home(model, target) -> torch.device:
    """Where a selected layer runs: its weight's device, or for a weight a device map keeps on disk (meta
    between forward passes), where the batch goes in."""
    device = target.module.weight.device
    return input_device(model) if device.type == "meta" else device


def _bind(folder: RunFolder, name: str | None, pairs: list[Pair], problems: list[Problem]) -> dict[str, str]:
    """Records the skipped lines and binds the pass to its pairs (rank 0 first; the others then compare)."""
    with distributed.main_first() as w:
        if w.main:
            folder.record_skipped("reference" if name is None else name, problems_as_records(problems))
        return folder.bind_pairs(name, pairs)


def _encode(model, processor, pairs: list[Pair], opt: Options) -> dict:
    return encode_pairs(model, processor, [p.load_image() for p in pairs], [p.prompt for p in pairs],
                        [p.text for p in pairs], prompt_format(model, processor, opt.prompt_format))


def _too_long(processor, model, pairs: list[Pair], opt: Options) -> list[Problem]:
    """Pairs whose image tokens, template, prompt and text exceed the language model's context. The
    template's and image's share is measured once on the first pair."""
    limit = model.config.get_text_config().max_position_embeddings
    tok = processor.tokenizer

    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    first = pairs[0]
    encoded = _encode(model, processor, [first], opt)
    overhead = encoded["input_ids"].shape[1] - n_tokens(first.prompt) - n_tokens(first.text)
    problems = []
    for p in pairs:
        n = overhead + n_tokens(p.prompt) + n_tokens(p.text)
        if n > limit:
            problems.append(Problem(p.line, p.id, f"{n} tokens with the image: over the context of {limit}"))
    return problems


def _pairs(manifest, opt: Options, processor, model) -> tuple[list[Pair], list[Problem]]:
    pairs, problems = read_manifest(manifest, opt.on_error, allow_outside=opt.allow_outside)
    long = _too_long(processor, model, pairs, opt)
    if long and opt.on_error == "stop":
        raise ManifestError(manifest, long)
    bad = {p.id for p in long}
    return [p for p in pairs if p.id not in bad], problems + long


def _each_batch(batches: list[tuple[int, list[Pair]]], total: int, desc: str, model, processor, opt: Options,
                compute, merge, keep) -> None:
    """For each (index, pairs) of ``batches``: ``keep(index, pairs, compute(pairs, batch))``, with a progress
    bar (pairs/s, ETA) over the ``total`` pairs of the pass, those done before included — under torchrun
    over rank 0's share alone. On a CUDA out-of-memory error a batch is computed in halves, down to single
    pairs, and the halves' results joined by ``merge``, so a batch keeps its one result (and its chunk
    number) however it was computed."""
    w = distributed.world()
    todo = sum(len(chunk) for _, chunk in batches)
    if w.size > 1:
        total, desc = todo, f"{desc} (rank 0's share of {w.size})"
    bar = tqdm(total=total, initial=total - todo, unit="pair", desc=desc, disable=not opt.progress or not w.main)

    device = _input_device(model, opt)

    def run(chunk):
        try:
            batch = _encode(model, processor, chunk, opt)
            return compute(chunk, {k: v.to(device) for k, v in batch.items()})
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(chunk) // 2
            bar.write(f"out of memory on a batch of {len(chunk)}: going on with {half} and {len(chunk) - half}")
            return merge(run(chunk[:half]), run(chunk[half:]))

    for index, chunk in batches:
        keep(index, chunk, run(chunk))
        bar.update(len(chunk))
    bar.close()


def _shares(todo: list[Pair], opt: Options) -> list[tuple[int, list[Pair]]]:
    """This rank's batches of the pairs still to do, numbered: the same batches (of similar length) as
    one process makes, every world-size-th to this rank — so each batch, and what is computed from it,
    is the same whatever the number of processes."""
    return distributed.share(list(enumerate(batches_by_length(todo, opt.batch_size))))


def _autocast(opt: Options, model):
    """Autocast where the batch runs: the options' device, or the GPUs a device map placed the model on."""
    if opt.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(_input_device(model, opt)).type, dtype=getattr(torch, opt.autocast))


def _warn_if_another_format_fits(model, processor, members: list[Pair], opt: Options) -> None:
    """The known members fit the format the model was trained in best: say so loudly when that is not the
    stated one (forward passes over at most 32 members)."""
    stated = prompt_format(model, processor, opt.prompt_format).spec
    fits = rank_formats(model, processor, members[:32], candidates(processor, [stated]), opt.batch_size,
                        _input_device(model, opt))
    if fits[0].spec != stated:
        print(f"WARNING: the known members fit another prompt format better than the stated {stated!r}; was the "
              f"model trained in it? Every score depends on it (gradaudit formats compares them):\n"
              f"{format_table(fits, stated)}", file=sys.stderr)


def run_reference(model_dir: str, manifest: str, run: str, **options) -> RunFolder:
    """Sums each selected weight's gradient over the manifest's pairs (the reference members) into the
    run folder; rerunning continues where it stopped. Holds the folder's writer lock throughout (another
    writer is refused). ``options``: the fields of :class:`Options`.

    Under torchrun each rank sums its share of the batches and R is their all-reduced sum, written by
    rank 0; an interrupted pass keeps each rank's partial sums and resumes with any number of ranks."""
    opt = joined(Options.of(**options))
    folder = RunFolder(run)
    with folder.writing("reference pass"):
        _reference_pass(model_dir, manifest, folder, opt)
    return folder


def _reference_pass(model_dir: str, manifest: str, folder: RunFolder, opt: Options) -> None:
    """The reference pass, under the writer lock."""
    w = distributed.world()
    model, processor, targets = _setup(model_dir, folder, opt)
    pairs, problems = _pairs(manifest, opt, processor, model)
    digests = _bind(folder, None, pairs, problems)  # another manifest than R was started from is refused
    with distributed.main_first():
        if w.main:
            folder.merge_reference_parts()  # the partial sums of an interrupted run of several ranks
    stored, ids, complete = folder.load_reference()
    if complete:
        with distributed.main_first():
            if w.main and not os.path.exists(folder.reference_norms_path):  # deleted to be computed anew
                folder.save_reference(stored, ids, [digests[i] for i in ids], complete=True)
        if w.main:
            print(f"{folder.path}: the reference pass is complete ({len(ids)} pairs)", file=sys.stderr)
        return
    if not ids and w.main:
        _warn_if_another_format_fits(model, processor, pairs, opt)
    done = set(ids)
    mine = _shares([p for p in pairs if p.id not in done], opt)
    distributed.barrier()  # every rank has read the folder before rank 0 rewrites R

    # This rank's sums, in float64 (so that the all-reduced sum of several ranks equals one process's sum
    # but for a rounding below float32's), stay on their weights' devices, apart from what R held (rank 0
    # adds that at the end); they are saved after every batch while small, else once a minute, and on
    # Ctrl-C. Sums and ids change together, in one assignment, so a save never mixes them.
    zeros = {t.name: torch.zeros(t.module.weight.shape, dtype=torch.float64, device=_home(model, t)) for t in targets}
    state = [zeros, [], []]  # sums, ids, (batch index, ids) of each batch
    small = sum(t.module.weight.numel() for t in targets) * 8 <= 256 * 2**20
    last_save = [time.monotonic()]

    def with_stored(sums):  # what R held before this pass, added
        return {k: v + stored[k].to(v) if k in stored else v for k, v in sums.items()}

    def save():
        sums, done_ids, _ = state
        if w.size == 1:
            folder.save_reference(with_stored(sums), ids + done_ids, [digests[i] for i in ids + done_ids],
                                  complete=False)
        elif done_ids:
            folder.save_reference_part(w.rank, sums, done_ids, [digests[i] for i in done_ids])
        last_save[0] = time.monotonic()

    def compute(chunk, batch):
        with _autocast(opt, model):
            part, _ = reference_sums(model, [(batch, batch_layout(model, batch))], targets)
        return part

    def keep(index, chunk, part):
        sums, done_ids, order = state
        state[:] = [{k: v + part[k].to(v) for k, v in sums.items()}, done_ids + [p.id for p in chunk],
                    order + [(index, [p.id for p in chunk])]]
        if small or time.monotonic() - last_save[0] > 60:
            save()

    def add(a, b):
        return {k: a[k] + b[k] for k in a}

    try:
        _each_batch(mine, len(pairs), "reference", model, processor, opt, compute, add, keep)
    except KeyboardInterrupt:
        save()
        raise
    sums = distributed.all_reduce_sum(state[0])
    batches = sorted(b for part in distributed.gather(state[2]) for b in part)  # one process's order
    with distributed.main_first():
        if w.main:
            order = ids + [pid for _, chunk_ids in batches for pid in chunk_ids]
            folder.save_reference(with_stored(sums), order, [digests[i] for i in order], complete=True)
            for rank in range(w.size):  # R holds them now (a part left by a crash here is stale: removed on resume)
                folder.remove_reference_part(rank)


def run_extract(model_dir: str, manifest: str, run: str, name: str, **options) -> RunFolder:
    """Per-sample statistics of the manifest's pairs against the run's R, stored as set ``name``, a
    chunk per batch; rerunning skips the pairs already stored. Holds the folder's writer lock throughout
    (another writer is refused). ``options``: the fields of :class:`Options`.

    Under torchrun each rank captures its share of the batches and writes their chunks, numbered as one
    process numbers them; a rerun, with any number of ranks, does only the pairs no chunk holds."""
    opt = joined(Options.of(**options))
    folder = RunFolder(run)
    with folder.writing(f"extract set {name}", create=False):  # R must be there already
        _extract_pass(model_dir, manifest, folder, name, opt)
    return folder


def _extract_pass(model_dir: str, manifest: str, folder: RunFolder, name: str, opt: Options) -> None:
    """The statistics pass of set ``name``, under the writer lock."""
    model, processor, targets = _setup(model_dir, folder, opt)
    refs, _, ref_sha = folder.reference()
    refs = {t.name: refs[t.name].to(_home(model, t)) for t in targets}  # beside its layer
    pairs, problems = _pairs(manifest, opt, processor, model)
    digests = _bind(folder, name, pairs, problems)  # another manifest than the set was started from is refused
    refuse_id_collisions(name, digests, "the pairs that built R", folder.reference_pairs())
    done = folder.done_ids(name, ref_sha)
    first = folder.next_chunk_index(name)
    mine = _shares([p for p in pairs if p.id not in done], opt)
    distributed.barrier()  # every rank has read the folder before any writes to it

    def compute(chunk, batch):
        with _autocast(opt, model):
            return batch_stats(model, batch, batch_layout(model, batch), targets, refs, backend=opt.backend).tensors()

    def keep(index, chunk, tensors):
        folder.save_chunk(name, chunk, tensors, ref_sha, index=first + index)

    _each_batch(mine, len(pairs), name, model, processor, opt, compute, join_chunks, keep)


def selection_table(model_dir: str, preset: str = "paper", pattern: str | None = None,
                    adapter: str | None = None) -> str:
    """What a selection picks: names, shapes, slices (rows + columns) per weight."""
    model, _ = load_model(model_dir, adapter=adapter)
    targets = select_targets(model, preset, pattern)
    width = max(len(t.name) for t in targets)
    lines = [f"{'weight'.ljust(width)}  {'domain':9}  {'shape':>12}  {'slices':>7}"]
    total = 0
    for t in targets:
        d_out, d_in = t.module.weight.shape
        total += d_out + d_in
        lines.append(f"{t.name.ljust(width)}  {t.domain:9}  {f'{d_out}×{d_in}':>12}  {d_out + d_in:>7}")
    lines.append(f"{len(targets)} weights, {total} slices (preset {preset}{', pattern ' + pattern if pattern else ''})")
    return "\n".join(lines)
