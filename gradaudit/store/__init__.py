"""Manifests in, run folder out (docs/data-and-runs.md). Imports nothing above the primitive's floor:
the run folder stores plain tensors, arrays, JSON and CSV, and owns every path inside it."""

from gradaudit.store.manifest import Pair, Problem, read_manifest, write_pairs
from gradaudit.store.runfolder import RunFolder, StoredSet

__all__ = ["Pair", "Problem", "RunFolder", "StoredSet", "read_manifest", "write_pairs"]
