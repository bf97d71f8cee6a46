"""Fault injection on the capture passes (docs/data-and-runs.md, "The run folder").

Each trial SIGKILLs a ``gradaudit reference`` or ``gradaudit extract`` process one to three times, each
time at a random moment after it holds the run folder's writer lock (uniform over the time an
uninterrupted run would take for the pairs still to do: its setup, then its share of the pass), then
runs the same command again to the end. As a kill at a random moment seldom lands inside a
write of the tiny files, further trials have the command kill itself just before its k-th rename of a
written file into the run folder (k at random), its temporary file written and not yet in place. The
final statistics must be bit-identical to an uninterrupted run's: every tensor and every id, in stored
order, no pair twice, no temporary file left. Then two writers on one folder: the second must be
refused at once and the first must finish with the same statistics. ``gradaudit reference`` is the
whole reference step: R from half the members, then the other half stored as the set reference_members.

The commands run in processes forked from this one, which has imported the package and the model's
modules once: each then starts in a second instead of importing torch and transformers anew (10-20 s
on a busy CPU). This process runs no torch operation before its last fork, as the child of a process
that has used OpenMP hangs in its first parallel region. The two-writers check is also made with two
``python -m gradaudit`` subprocesses. A tiny LLaVA (``gradaudit.toy.tiny.tiny_llava``) on the CPU.

    python benchmarks/fault_injection.py --trials 24 --rename-trials 8 --seed 0 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from gradaudit import cli
from gradaudit.store.integrity import TEMPORARY, read_metadata
from gradaudit.store.lock import LOCK_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["red", "blue", "green", "small", "large", "square", "circle", "dot", "left", "right", "top", "noise"]
KINDS = ("reference", "extract")
REFERENCE_FILES = ("fingerprint.json", "fingerprint.json.sha256", "reference.safetensors",
                   "reference_norms.safetensors", "reference_pairs.json", "reference_pairs.json.sha256")


class Child:
    """A function run in a forked child, its stdout and stderr in ``log``; ``poll``, ``kill``, ``wait``
    as a subprocess's."""

    def __init__(self, log: str, fn, *args):
        self.log, self.returncode = log, None
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = fn(*args) or 0
            except BaseException:  # noqa: BLE001 - reported in the log, as a process would
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()


def gradaudit(argv: list[str]) -> int:
    """The ``gradaudit`` command, in this process."""
    sys.argv = ["gradaudit", *argv]
    return cli.main(argv)


def renames_counted(run: str, kill_at: int | None = None):
    """Counts the command's renames of files into ``run`` (``os.replace``, the last step of every write);
    with ``kill_at``, the process SIGKILLs itself just before that rename."""
    real, count = os.replace, [0]

    def replace(src, dst):
        if os.path.abspath(dst).startswith(os.path.abspath(run) + os.sep):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    os.replace = replace
    return count


def gradaudit_killed_at_rename(argv: list[str], kill_at: int) -> int:
    renames_counted(argv[argv.index("--run") + 1], kill_at)
    return gradaudit(argv)


def gradaudit_counting_renames(argv: list[str], out: str) -> int:
    count = renames_counted(argv[argv.index("--run") + 1])
    code = gradaudit(argv)
    with open(out, "w") as f:
        json.dump(count[0], f)
    return code


def build(root: str, members: int, audited: int) -> None:
    """A tiny LLaVA folder, images and the two manifests under ``root``."""
    from gradaudit.toy.tiny import random_images, tiny_llava

    model, processor = tiny_llava(seed=0)
    model.save_pretrained(os.path.join(root, "model"))
    processor.save_pretrained(os.path.join(root, "model"))
    os.makedirs(os.path.join(root, "img"))
    for i, im in enumerate(random_images(members + audited, seed=7)):
        im.save(os.path.join(root, "img", f"{i}.png"))
    for kind, idx in (("reference", range(members)), ("extract", range(members, members + audited))):
        with open(os.path.join(root, f"{kind}.jsonl"), "w") as f:
            for i in idx:
                text = " ".join(WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 2 + i % 5))
                f.write(json.dumps({"id": f"p{i}", "image": f"img/{i}.png", "text": text}) + "\n")


def modules_loading_imports(model_dir: str, out: str) -> None:
    """Writes the names of transformers' modules that loading the model imports lazily (most of the time
    a command takes to start)."""
    from gradaudit.models import load_model

    before = set(sys.modules)
    load_model(model_dir)
    with open(out, "w") as f:
        json.dump(sorted(m for m in set(sys.modules) - before if m.startswith("transformers.")), f)


def run_child(work: str, name: str, fn, *args) -> Child:
    return Child(os.path.join(work, f"{name}.log"), fn, *args)


def argv(kind: str, work: str, run: str, batch_size: int) -> list[str]:
    out = [kind, "--model", os.path.join(work, "model"), "--manifest", os.path.join(work, f"{kind}.jsonl"),
           "--run", run, "--batch-size", str(batch_size), "--no-progress", "--prompt-format", "chat-template"]
    return out + (["--set", "audited"] if kind == "extract" else [])


def wait_for_lock(proc, run: str) -> float | None:
    """Waits until ``proc`` holds the run folder's writer lock (it records its pid in the lock file);
    returns the seconds it took, or None if it exited first."""
    t0, path = time.monotonic(), os.path.join(run, LOCK_FILE)
    while proc.poll() is None:
        try:
            with open(path) as f:
                if json.loads(f.read() or "{}").get("pid") == proc.pid:
                    return time.monotonic() - t0
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    return None


def stored_pairs(run: str, kind: str) -> int:
    """How many pairs a killed pass had stored, from the files' verified metadata (no torch here). The
    reference step stores R's half of the members, then the other half as the set reference_members."""
    if kind == "extract":
        return _chunked_pairs(run, "audited")
    path = os.path.join(run, "reference.safetensors")
    in_r = len(json.loads(read_metadata(path, "reference sums")["ids"])) if os.path.exists(path) else 0
    return in_r + _chunked_pairs(run, "reference_members")


def _chunked_pairs(run: str, name: str) -> int:
    chunks = os.path.join(run, "stats", name)
    return sum(len(json.loads(read_metadata(os.path.join(chunks, c), "statistics chunk")["ids"]))
               for c in (os.listdir(chunks) if os.path.isdir(chunks) else []) if c.endswith(".safetensors"))


def temporaries(run: str) -> int:
    return sum(bool(TEMPORARY.search(f)) for _, _, files in os.walk(run) for f in files)


def fresh_run(work: str, name: str, kind: str) -> str:
    """A new run folder; for an extract it starts with the uninterrupted run's R, so that the pass
    under test is the extract alone."""
    run = os.path.join(work, name)
    os.makedirs(run)
    if kind == "extract":
        for f in REFERENCE_FILES:
            shutil.copy2(os.path.join(work, "whole", f), os.path.join(run, f))
    return run


def trial(i: int, kind: str, rng: np.random.Generator, work: str, timing: dict, total: int, batch_size: int) -> dict:
    """Kills the command 1-3 times, then runs it to the end; ``timing`` is the uninterrupted run's."""
    run = fresh_run(work, f"trial{i:02d}", kind)
    command = argv(kind, work, run, batch_size)
    kills = []
    for k in range(int(rng.integers(1, 4))):
        remaining = 1 - stored_pairs(run, kind) / total
        delay = float(rng.uniform(0, timing["setup_s"] + timing["pass_s"] * remaining))
        proc = run_child(work, f"trial{i:02d}-{k}", gradaudit, command)
        held = wait_for_lock(proc, run) is not None
        time.sleep(delay if held else 0)
        landed = proc.poll() is None
        if landed:
            proc.kill()
        proc.wait()
        kills.append({"delay_s": round(delay, 3), "landed": landed, "pairs_stored": stored_pairs(run, kind),
                      "temporaries": temporaries(run)})
    last = run_child(work, f"trial{i:02d}-resume", gradaudit, command)
    if last.wait() != 0:
        raise RuntimeError(f"the resume of trial {i} failed:\n{last.output()[-3000:]}")
    return {"trial": i, "command": kind, "run": run, "kills": kills, "temporaries_after_resume": temporaries(run)}


def uninterrupted(work: str, kind: str, batch_size: int) -> dict:
    """Runs the command once into run folder "whole"; returns the seconds from its holding the lock to its
    first stored pair (``setup_s``: loading the model, reading the manifest) and from there to its end
    (``pass_s``), and how many files it renamed into the folder (``renames``)."""
    run, counted = os.path.join(work, "whole"), os.path.join(work, f"renames-{kind}.json")
    proc = run_child(work, f"whole-{kind}", gradaudit_counting_renames, argv(kind, work, run, batch_size), counted)
    if wait_for_lock(proc, run) is None:
        raise RuntimeError(f"the uninterrupted {kind} ended before it held the lock:\n{proc.output()[-3000:]}")
    t0 = time.monotonic()
    while proc.poll() is None and stored_pairs(run, kind) == 0:
        time.sleep(0.005)
    t1 = time.monotonic()
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted {kind} failed:\n{proc.output()[-3000:]}")
    with open(counted) as f:
        renames = json.load(f)
    return {"setup_s": round(t1 - t0, 2), "pass_s": round(time.monotonic() - t1, 2), "renames": renames}


def rename_trial(i: int, kind: str, rng: np.random.Generator, work: str, renames: int, batch_size: int) -> dict:
    """The command kills itself before its k-th rename into the run folder, then runs to the end."""
    run = fresh_run(work, f"rename{i:02d}", kind)
    command, k = argv(kind, work, run, batch_size), int(rng.integers(1, renames + 1))
    killed = run_child(work, f"rename{i:02d}-0", gradaudit_killed_at_rename, command, k).wait() == -signal.SIGKILL
    kill = {"rename": k, "landed": killed, "pairs_stored": stored_pairs(run, kind), "temporaries": temporaries(run)}
    last = run_child(work, f"rename{i:02d}-resume", gradaudit, command)
    if last.wait() != 0:
        raise RuntimeError(f"the resume of rename trial {i} failed:\n{last.output()[-3000:]}")
    return {"trial": i, "command": kind, "run": run, "kills": [kill], "temporaries_after_resume": temporaries(run)}


def two_writers(work: str, name: str, first: str, second: str, batch_size: int, spawn: bool) -> dict:
    """``first`` holds a fresh folder (R in place); ``second`` starts while it runs and must be refused.
    ``spawn``: both as ``python -m gradaudit`` subprocesses, else forked."""
    run = fresh_run(work, name, "extract")

    def start(kind, tag):
        if not spawn:
            return run_child(work, f"{name}-{tag}", gradaudit, argv(kind, work, run, batch_size))
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.Popen([sys.executable, "-m", "gradaudit", *argv(kind, work, run, batch_size)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    a = start(first, "first")
    if wait_for_lock(a, run) is None:
        raise RuntimeError(f"{name}: the first writer ended before it held the lock")
    t0 = time.monotonic()
    b = start(second, "second")
    b.wait()
    refused_in = time.monotonic() - t0
    first_still_running = a.poll() is None
    a.wait()
    said = b.communicate()[0] if spawn else b.output()
    line = next((x for x in said.splitlines() if "in use by another writer" in x), said.strip()[-200:])
    return {"name": name, "first": first, "second": second, "processes": "python -m gradaudit" if spawn else "forked",
            "run": run, "second_rc": b.returncode, "second_refused": b.returncode == 2 and "in use" in line,
            "second_said": line.replace(work, "$WORK"), "second_done_after_s": round(refused_in, 2),
            "first_still_running_then": first_still_running, "first_rc": a.returncode}


def snapshot(run: str, kind: str) -> dict:
    """What a pass stored, read back through the run folder (checksums checked)."""
    from gradaudit.store.runfolder import RunFolder

    folder = RunFolder(run)
    if kind == "reference":
        sums, ids, complete = folder.load_reference()
        assert complete, run
        members, stats = folder.load_stats("reference_members")
        return {"ids": ids + members, "tensors": sums | {f"norms/{k}": v for k, v in folder.reference_norms().items()}
                | {f"reference_members/{k}": v for k, v in stats.items()}}
    ids, stats = folder.load_stats("audited")
    return {"ids": ids, "tensors": stats}


def identical(got: dict, want: dict) -> bool:
    import torch

    return (got["ids"] == want["ids"] and len(set(got["ids"])) == len(got["ids"])
            and got["tensors"].keys() == want["tensors"].keys()
            and all(torch.equal(got["tensors"][k], want["tensors"][k]) for k in want["tensors"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24, help="kill-and-resume trials, alternately reference and extract")
    ap.add_argument("--rename-trials", type=int, default=8, help="trials killed just before a file's rename")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--members", type=int, default=12)
    ap.add_argument("--audited", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for fault_injection.md and .json")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    work = tempfile.mkdtemp(prefix="fault-injection-")
    t_start = time.time()
    try:
        if run_child(work, "build", build, work, args.members, args.audited).wait() != 0:
            raise RuntimeError("building the model and manifests failed")
        listed = os.path.join(work, "modules.json")
        run_child(work, "modules", modules_loading_imports, os.path.join(work, "model"), listed).wait()
        with open(listed) as f:
            for name in json.load(f):
                importlib.import_module(name)  # imports only: no torch operation in this process

        timing = {kind: uninterrupted(work, kind, args.batch_size) for kind in KINDS}
        sizes = {"reference": args.members, "extract": args.audited}
        trials = [trial(i, KINDS[i % 2], rng, work, timing[KINDS[i % 2]], sizes[KINDS[i % 2]], args.batch_size)
                  for i in range(args.trials)]
        renamed = [rename_trial(i, KINDS[i % 2], rng, work, timing[KINDS[i % 2]]["renames"], args.batch_size)
                   for i in range(args.rename_trials)]
        writers = [two_writers(work, "two-forked", "extract", "extract", args.batch_size, spawn=False),
                   two_writers(work, "two-forked-reference", "extract", "reference", args.batch_size, spawn=False),
                   two_writers(work, "two-cli", "extract", "extract", args.batch_size, spawn=True)]

        # every fork is done: torch may run here now
        want = {kind: snapshot(os.path.join(work, "whole"), kind) for kind in KINDS}
        for t in trials + renamed:
            t["identical"] = identical(snapshot(t.pop("run"), t["command"]), want[t["command"]])
        for w in writers:
            w["first_identical"] = w["first_rc"] == 0 and identical(snapshot(w.pop("run"), "extract"), want["extract"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"seed": args.seed, "members": args.members, "audited": args.audited, "batch_size": args.batch_size,
              "uninterrupted": timing, "trials": trials, "rename_trials": renamed, "two_writers": writers,
              "wall_s": round(time.time() - t_start, 1)}
    report(result, args.out)


def report(result: dict, out: str | None) -> None:
    timing = result["uninterrupted"]
    lines = ["# Fault injection on the capture passes (tiny LLaVA, CPU)", "",
             f"`python benchmarks/fault_injection.py --trials {len(result['trials'])} --rename-trials "
             f"{len(result['rename_trials'])} --seed {result['seed']} --out benchmarks/results` "
             f"({result['wall_s']:.0f} s): {result['members']} reference members, {result['audited']} audited "
             f"pairs, batch size {result['batch_size']}. A *random moment* trial kills `gradaudit reference` or "
             "`gradaudit extract` with SIGKILL 1-3 times, each time at a uniformly random moment after it holds the "
             "writer lock, over the time an uninterrupted run takes for the pairs still to do (uninterrupted: "
             f"reference {timing['reference']['setup_s']:.1f} s of setup and {timing['reference']['pass_s']:.1f} s "
             f"of pass, extract {timing['extract']['setup_s']:.1f} s and {timing['extract']['pass_s']:.1f} s, on a "
             "shared, busy CPU). A *before a rename* trial has the command SIGKILL itself just before its k-th "
             f"rename of a written file into the run folder (k uniform over the {timing['reference']['renames']} "
             f"renames of an uninterrupted reference pass, the {timing['extract']['renames']} of an extract): "
             "killed inside a write. Then the same command runs to the end, and every stored tensor and id is "
             "compared with the uninterrupted run's.", "",
             "| kill | command | trials | kills (landed / tried) | where the kills landed | temporary files the "
             "kills left | bit-identical after resume | temporary files left after the resume |",
             "|---|---|---|---|---|---|---|---|"]
    for how, trials in (("random moment", result["trials"]), ("before a rename", result["rename_trials"])):
        for kind, total in (("reference", result["members"]), ("extract", result["audited"])):
            ts = [t for t in trials if t["command"] == kind]
            landed = [k for t in ts for k in t["kills"] if k["landed"]]
            if how == "random moment":
                where = ", ".join(str(k["pairs_stored"]) for k in sorted(landed, key=lambda k: k["pairs_stored"]))
                where = f"{where} pairs stored (of {total})"
            else:
                where = "renames " + ", ".join(str(k["rename"]) for k in sorted(landed, key=lambda k: k["rename"]))
            lines.append(f"| {how} | {kind} | {len(ts)} | {len(landed)} / {sum(len(t['kills']) for t in ts)} | "
                         f"{where} | {sum(k['temporaries'] for k in landed)} | {sum(t['identical'] for t in ts)} of "
                         f"{len(ts)} | {sum(t['temporaries_after_resume'] for t in ts)} |")
    lines += ["", "Two writers on one folder, the second started while the first held the lock (its time includes "
              "the process's start: importing the package, for `python -m gradaudit`):", "",
              "| processes | first | second | second refused | after (s) | first finished, bit-identical | what the "
              "second said |", "|---|---|---|---|---|---|---|"]
    for w in result["two_writers"]:
        said = w["second_said"].split(" (`")[0]
        lines.append(f"| {w['processes']} | {w['first']} | {w['second']} | {'yes' if w['second_refused'] else 'NO'}"
                     f" (exit {w['second_rc']}) | {w['second_done_after_s']} | "
                     f"{'yes' if w['first_identical'] else 'NO'} | {said} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fault_injection.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out, "fault_injection.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
