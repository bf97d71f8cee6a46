"""The typed errors of the library (the ground floor: every room may import it; it imports nothing).

Each names the problem and what it concerns; none says which command to run — the command line
(``gradaudit.cli``) turns them into advice. All derive from ``ValueError`` as well, so callers that
caught ``ValueError`` before keep working.
"""

from __future__ import annotations


class GradAuditError(ValueError):
    """Base class of every error GradAudit raises on purpose."""


class ConfigError(GradAuditError):
    """An option, a configuration file or a name given to the library is wrong."""


class ManifestError(GradAuditError):
    """Bad lines in a manifest under the 'stop' policy; ``problems`` lists each (line, id, reason)."""

    def __init__(self, path: str, problems: list):
        self.path, self.problems = path, problems
        listed = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} bad line(s); nothing was computed:\n  {listed}{more}")


class ModelError(GradAuditError):
    """A model folder cannot be audited: not a model, an unsupported architecture, a bad adapter, or a
    selection of weights that is empty or does not reach the loss."""


class RunMismatch(GradAuditError):
    """Stored results were made with another model, selection, reference or manifest."""


class StageMissing(GradAuditError):
    """A step needs what an earlier step writes into the run folder. ``stage`` names it: "reference"
    (R is not complete), "extract" (a statistics set is missing; ``set_name`` says which) or "fit"."""

    def __init__(self, run: str, stage: str, what: str, set_name: str | None = None):
        self.run, self.stage, self.set_name = run, stage, set_name
        super().__init__(f"{run}: {what}")


class LabelsMissing(GradAuditError):
    """A set must carry a 0/1 label on every pair, both classes present, to be evaluated."""


class OptionError(ConfigError):
    """One option has a value of the wrong type or outside its choices. ``option`` names it as the
    library's keyword and the audit file's key spell it ("batch_size", "device"), so that the command
    line can point at its own flag."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(message)


class ManifestsError(ManifestError):
    """Bad lines in several manifests, all found before any work (an audit reads every manifest first).
    ``errors`` holds one :class:`ManifestError` per file; ``path`` and ``problems`` are the first one's."""

    def __init__(self, errors: list):
        self.errors = errors
        self.path, self.problems = errors[0].path, errors[0].problems
        GradAuditError.__init__(self, "\n".join(str(e) for e in errors))


class FormatMissing(ConfigError):
    """No prompt format was stated for a model whose processor does not fix one."""


class RunBusy(GradAuditError):
    """Another process holds the run folder's writer lock; ``holder`` is what it recorded of itself
    (``pid``, ``command``, ``argv``, ``since``; empty if it had not written that yet)."""

    def __init__(self, run: str, holder: dict):
        self.run, self.holder = run, holder
        who = (f"pid {holder.get('pid')}, {holder.get('command')} (`{' '.join(holder.get('argv', []))}`), since "
               f"{holder.get('since')}" if holder else "a writer that has not recorded itself yet")
        super().__init__(f"{run} is in use by another writer: {who}; nothing was changed")


class CorruptFile(GradAuditError):
    """A stored file is truncated, altered, foreign or carries no checksum (written before files had
    one). ``stage`` names the step that writes it: "fingerprint", "reference", "extract" (``set_name``
    says which set), "fit" or "results" (of set ``set_name``)."""

    def __init__(self, path: str, why: str, stage: str, set_name: str | None = None):
        self.path, self.why, self.stage, self.set_name = path, why, stage, set_name
        super().__init__(f"{path}: {why}")


class NonFiniteStats(GradAuditError):
    """Stored statistics hold NaN or infinite values; ``path`` is the file, ``ids`` the pairs concerned
    (empty for R, a sum over pairs); ``stage`` the step that wrote it, "reference" or "extract" (of set
    ``set_name``)."""

    def __init__(self, path: str, ids: list[str], stage: str, set_name: str | None = None):
        self.path, self.ids, self.stage, self.set_name = path, ids, stage, set_name
        listed = ", ".join(repr(i) for i in ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        which = f" for pair(s) {listed}" if ids else ""
        super().__init__(f"{path}: non-finite values (NaN or infinity){which}")


class ManifestChanged(RunMismatch):
    """A pass met other pairs than the ones its results were started from: pairs added, left out, or with
    another image, prompt, text or label. ``set_name`` is the statistics set concerned (None: R, the
    reference pass); ``differ`` lists the ids that differ."""

    def __init__(self, run: str, set_name: str | None, differ: list[str]):
        self.run, self.set_name, self.differ = run, set_name, differ
        whose = f"set {set_name!r} was extracted" if set_name is not None else "R was built"
        super().__init__(f"{run}: {whose} from another manifest ({len(differ)} pair(s) differ, e.g. id {differ[0]!r})")


class IdCollision(RunMismatch):
    """Pairs of two sets share an id but not their content (image, prompt or text): they are different
    pairs, and matching them by id would give one the other's results (R's leave-one-out, a reference
    pair's out-of-fold score). ``other`` names the other pairs; ``ids`` lists the ids."""

    def __init__(self, set_name: str, other: str, ids: list[str]):
        self.set_name, self.other, self.ids = set_name, other, ids
        listed = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(f"set {set_name!r} shares ids with {other}, but their image, prompt or text differ: {listed}")
