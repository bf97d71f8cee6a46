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
