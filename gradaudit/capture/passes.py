"""The two capture passes over a manifest into a run folder (resumable): the reference gradient R over
members, then per-sample statistics of any set against R; and the table of what a selection picks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gradaudit.capture.engine import batch_stats, reference_sums
from gradaudit.errors import ConfigError, ManifestError
from gradaudit.models import batch_layout, encode_pairs, fingerprint, load_model, select_targets
from gradaudit.store.integrity import refuse_id_collisions
from gradaudit.store.manifest import Pair, Problem, batches_by_length, problems_as_records, read_manifest
from gradaudit.store.runfolder import RunFolder


@dataclass(frozen=True)
class Options:
    """How a capture runs. ``mode`` "train" keeps dropout on (then no leave-one-out later: the
    statistics pass does not see the gradients that built R); ``autocast`` "bfloat16" runs the forward
    under autocast. Both are part of the run's fingerprint."""

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
    progress: bool = True

    @classmethod
    def of(cls, **options) -> Options:
        """Options from keyword values, an unknown name refused with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown capture option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def __post_init__(self):
        if self.mode not in ("eval", "train"):
            raise ConfigError(f"mode must be 'eval' or 'train'; got {self.mode!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast must be None, 'bfloat16' or 'float16'; got {self.autocast!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1; got {self.batch_size}")


def _setup(model_dir, folder: RunFolder, opt: Options):
    """The model, its processor and selected weights; binds the run folder to their fingerprint."""
    model, processor = load_model(model_dir, adapter=opt.adapter, dtype=opt.dtype, device=opt.device)
    model.train(opt.mode == "train")
    targets = select_targets(model, opt.preset, opt.pattern)
    folder.bind(fingerprint(model, targets) | {"mode": opt.mode, "autocast": opt.autocast,  # compared
                                               "model": os.path.abspath(model_dir),  # recorded only
                                               "model_type": model.config.model_type, "adapter": opt.adapter})
    return model, processor, targets


def _too_long(processor, model, pairs: list[Pair]) -> list[Problem]:
    """Pairs whose image tokens, template, prompt and text exceed the language model's context. The
    template's and image's share is measured once on the first pair."""
    limit = model.config.get_text_config().max_position_embeddings
    tok = processor.tokenizer

    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    first = pairs[0]
    encoded = encode_pairs(model, processor, [first.load_image()], [first.prompt], [first.text])
    overhead = encoded["input_ids"].shape[1] - n_tokens(first.prompt) - n_tokens(first.text)
    problems = []
    for p in pairs:
        n = overhead + n_tokens(p.prompt) + n_tokens(p.text)
        if n > limit:
            problems.append(Problem(p.line, p.id, f"{n} tokens with the image: over the context of {limit}"))
    return problems


def _pairs(manifest, on_error, processor, model):
    pairs, problems = read_manifest(manifest, on_error)
    long = _too_long(processor, model, pairs)
    if long and on_error == "stop":
        raise ManifestError(manifest, long)
    bad = {p.id for p in long}
    return [p for p in pairs if p.id not in bad], problems + long


def _each_batch(todo: list[Pair], total: int, desc: str, model, processor, opt: Options, work) -> None:
    """Runs ``work(pairs, batch)`` over batches of similar length with a progress bar (pairs/s, ETA).
    On a CUDA out-of-memory error the batch is halved and retried, down to single pairs."""
    bar = tqdm(total=total, initial=total - len(todo), unit="pair", desc=desc, disable=not opt.progress)

    def run(chunk):
        try:
            batch = encode_pairs(model, processor, [p.load_image() for p in chunk], [p.prompt for p in chunk],
                                 [p.text for p in chunk])
            work(chunk, {k: v.to(opt.device) for k, v in batch.items()})
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(chunk) // 2
            bar.write(f"out of memory on a batch of {len(chunk)}: going on with {half} and {len(chunk) - half}")
            run(chunk[:half])
            run(chunk[half:])
            return
        bar.update(len(chunk))

    for chunk in batches_by_length(todo, opt.batch_size):
        run(chunk)
    bar.close()


def _autocast(opt: Options):
    if opt.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(opt.device).type, dtype=getattr(torch, opt.autocast))


def run_reference(model_dir: str, manifest: str, run: str, **options) -> RunFolder:
    """Sums each selected weight's gradient over the manifest's pairs (the reference members) into the
    run folder; rerunning continues where it stopped. Holds the folder's writer lock throughout (another
    writer is refused). ``options``: the fields of :class:`Options`."""
    opt = Options.of(**options)
    folder = RunFolder(run)
    with folder.writing("reference pass"):
        _reference_pass(model_dir, manifest, folder, opt)
    return folder


def _reference_pass(model_dir: str, manifest: str, folder: RunFolder, opt: Options) -> None:
    """The reference pass, under the writer lock."""
    run = folder.path
    model, processor, targets = _setup(model_dir, folder, opt)
    pairs, problems = _pairs(manifest, opt.on_error, processor, model)
    folder.record_skipped("reference", problems_as_records(problems))
    digests = folder.bind_pairs(None, pairs)  # another manifest than R was started from is refused
    sums, ids, complete = folder.load_reference()
    if complete:
        if not os.path.exists(folder.reference_norms_path):  # deleted to be computed anew
            folder.save_reference(sums, ids, [digests[i] for i in ids], complete=True)
        print(f"{run}: the reference pass is complete ({len(ids)} pairs)", file=sys.stderr)
        return

    # R's sums stay on the device; they are saved after every batch while small, else once a minute,
    # and on Ctrl-C. Sums and ids change together, in one assignment, so a save never mixes them.
    state = [{k: v.to(opt.device) for k, v in sums.items()}, list(ids)]
    small = sum(t.module.weight.numel() for t in targets) * 4 <= 256 * 2**20
    last_save = [time.monotonic()]

    def save(complete=False):
        folder.save_reference(state[0], state[1], [digests[i] for i in state[1]], complete)
        last_save[0] = time.monotonic()

    def work(chunk, batch):
        with _autocast(opt):
            part, _ = reference_sums(model, [(batch, batch_layout(model, batch))], targets)
        total = {name: state[0][name] + value if name in state[0] else value for name, value in part.items()}
        state[:] = [total, state[1] + [p.id for p in chunk]]
        if small or time.monotonic() - last_save[0] > 60:
            save()

    done = set(ids)
    try:
        _each_batch([p for p in pairs if p.id not in done], len(pairs), "reference", model, processor, opt, work)
    except KeyboardInterrupt:
        save()
        raise
    save(complete=True)


def run_extract(model_dir: str, manifest: str, run: str, name: str, **options) -> RunFolder:
    """Per-sample statistics of the manifest's pairs against the run's R, stored as set ``name``, a
    chunk per batch; rerunning skips the pairs already stored. Holds the folder's writer lock throughout
    (another writer is refused). ``options``: the fields of :class:`Options`."""
    opt = Options.of(**options)
    folder = RunFolder(run)
    with folder.writing(f"extract set {name}", create=False):  # R must be there already
        _extract_pass(model_dir, manifest, folder, name, opt)
    return folder


def _extract_pass(model_dir: str, manifest: str, folder: RunFolder, name: str, opt: Options) -> None:
    """The statistics pass of set ``name``, under the writer lock."""
    model, processor, targets = _setup(model_dir, folder, opt)
    refs, _, ref_sha = folder.reference()
    refs = {k: v.to(opt.device) for k, v in refs.items()}
    pairs, problems = _pairs(manifest, opt.on_error, processor, model)
    folder.record_skipped(name, problems_as_records(problems))
    digests = folder.bind_pairs(name, pairs)  # another manifest than the set was started from is refused
    refuse_id_collisions(name, digests, "the pairs that built R", folder.reference_pairs())
    done = folder.done_ids(name, ref_sha)

    def work(chunk, batch):
        with _autocast(opt):
            result = batch_stats(model, batch, batch_layout(model, batch), targets, refs, backend=opt.backend)
        folder.save_chunk(name, chunk, result.tensors(), ref_sha)

    _each_batch([p for p in pairs if p.id not in done], len(pairs), name, model, processor, opt, work)


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
