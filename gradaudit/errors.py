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


class RunBusy(GradAuditError):
    """Another process holds the run folder's writer lock; ``holder`` is what it recorded of itself
    (``pid``, ``command``, ``argv``, ``since``; empty if it had not written that yet)."""

    def __init__(self, run: str, holder: dict):
        self.run, self.holder = run, holder
        who = (f"pid {holder.get('pid')}, {holder.get('command')} (`{' '.join(holder.get('argv', []))}`), since "
               f"{holder.get('since')}" if holder else "a writer that has not recorded itself yet")
        super().__init__(f"{run} is in use by another writer: {who}; nothing was changed")
