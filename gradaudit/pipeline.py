"""The two capture passes over a manifest, into a run folder (resumable): the reference gradient R
over members, then per-sample statistics of any set against R."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from gradaudit.capture import batch_stats, reference_sums
from gradaudit.data import Pair, Problem, batches_by_length, problems_as_records, read_manifest
from gradaudit.models import encode_llava_pairs, fingerprint, llava_layout, llava_targets, load_model
from gradaudit.runfolder import RunFolder


def _setup(model_dir, adapter, run, preset, pattern, dtype, device):
    model, processor = load_model(model_dir, adapter=adapter, dtype=dtype, device=device)
    targets = llava_targets(model, preset, pattern)
    folder = RunFolder(run)
    folder.bind(fingerprint(model, targets))
    return model, processor, targets, folder


def _too_long(processor, model, pairs: list[Pair]) -> list[Problem]:
    """Pairs whose prompt, image tokens and text exceed the language model's context."""
    limit = model.config.get_text_config().max_position_embeddings
    first = encode_llava_pairs(processor, [pairs[0].load_image()], [pairs[0].prompt], [pairs[0].text])
    n_image = int((first["input_ids"] == model.config.image_token_index).sum())
    tok = processor.tokenizer
    problems = []
    for p in pairs:
        n = len(tok(f"USER: \n{p.prompt} ASSISTANT: {p.text}{tok.eos_token}")["input_ids"]) + n_image
        if n > limit:
            problems.append(Problem(p.line, p.id, f"{n} tokens with the image: over the context of {limit}"))
    return problems


def _pairs(manifest, on_error, processor, model):
    pairs, problems = read_manifest(manifest, on_error)
    long = _too_long(processor, model, pairs)
    if long and on_error == "stop":
        from gradaudit.data import ManifestError

        raise ManifestError(manifest, long)
    bad = {p.id for p in long}
    return [p for p in pairs if p.id not in bad], problems + long


def _batch(processor, pairs, device):
    batch = encode_llava_pairs(processor, [p.load_image() for p in pairs], [p.prompt for p in pairs],
                               [p.text for p in pairs])
    return {k: v.to(device) for k, v in batch.items()}


def run_reference(model_dir: str, manifest: str, run: str, *, adapter: str | None = None, preset: str = "paper",
                  pattern: str | None = None, batch_size: int = 8, on_error: str = "stop", dtype: str = "float32", device: str = "cpu",
                  progress: bool = True) -> RunFolder:
    """Sums each selected weight's gradient over the manifest's pairs (the reference members) into the
    run folder; rerunning continues where it stopped."""
    model, processor, targets, folder = _setup(model_dir, adapter, run, preset, pattern, dtype, device)
    pairs, problems = _pairs(manifest, on_error, processor, model)
    folder.record_skipped("reference", problems_as_records(problems))
    sums, ids, complete = folder.load_reference()
    if complete:
        print(f"{run}: the reference pass is complete ({len(ids)} pairs)", file=sys.stderr)
        return folder
    unknown = set(ids) - {p.id for p in pairs}
    if unknown:
        raise ValueError(f"{run} holds a partial reference over ids not in {manifest} (e.g. {sorted(unknown)[:3]})")
    todo = [p for p in pairs if p.id not in set(ids)]
    bar = tqdm(total=len(pairs), initial=len(ids), unit="pair", desc="reference", disable=not progress)
    for chunk in batches_by_length(todo, batch_size):
        batch = _batch(processor, chunk, device)
        part, _ = reference_sums(model, [(batch, llava_layout(batch))], targets)
        for name, value in part.items():
            sums[name] = sums[name] + value.cpu() if name in sums else value.cpu()
        ids += [p.id for p in chunk]
        folder.save_reference(sums, ids, complete=False)
        bar.update(len(chunk))
    bar.close()
    folder.save_reference(sums, ids, complete=True)
    return folder


def run_extract(model_dir: str, manifest: str, run: str, name: str, *, adapter: str | None = None, preset: str = "paper",
                pattern: str | None = None, batch_size: int = 8, on_error: str = "stop", dtype: str = "float32",
                device: str = "cpu", backend: str = "auto", progress: bool = True) -> RunFolder:
    """Per-sample statistics of the manifest's pairs against the run's R, stored as set ``name``, a
    chunk per batch; rerunning skips the pairs already stored."""
    model, processor, targets, folder = _setup(model_dir, adapter, run, preset, pattern, dtype, device)
    refs, _, ref_sha = folder.reference()
    refs = {k: v.to(device) for k, v in refs.items()}
    pairs, problems = _pairs(manifest, on_error, processor, model)
    folder.record_skipped(name, problems_as_records(problems))
    done = folder.done_ids(name, ref_sha)
    todo = [p for p in pairs if p.id not in done]
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), unit="pair", desc=name, disable=not progress)
    for chunk in batches_by_length(todo, batch_size):
        batch = _batch(processor, chunk, device)
        result = batch_stats(model, batch, llava_layout(batch), targets, refs, backend=backend)
        folder.save_chunk(name, [p.id for p in chunk], result, ref_sha)
        bar.update(len(chunk))
    bar.close()
    return folder


def selection_table(model_dir: str, preset: str = "paper", pattern: str | None = None,
                    adapter: str | None = None) -> str:
    """What a selection picks: names, shapes, slices (rows + columns) per weight."""
    model, _ = load_model(model_dir, adapter=adapter)
    targets = llava_targets(model, preset, pattern)
    width = max(len(t.name) for t in targets)
    lines = [f"{'weight'.ljust(width)}  {'domain':9}  {'shape':>12}  {'slices':>7}"]
    total = 0
    for t in targets:
        d_out, d_in = t.module.weight.shape
        total += d_out + d_in
        lines.append(f"{t.name.ljust(width)}  {t.domain:9}  {f'{d_out}×{d_in}':>12}  {d_out + d_in:>7}")
    lines.append(f"{len(targets)} weights, {total} slices (preset {preset}{', pattern ' + pattern if pattern else ''})")
    return "\n".join(lines)
