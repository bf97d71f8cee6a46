"""The house's floors: no module imports from a floor above its own, and the audit never loads torch."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gradaudit"

# docs/layout.md: a unit imports only from units on lower floors (and from inside itself).
FLOORS = {
    # the package root loads nothing eagerly (its public names come from gradaudit.ops on first use)
    "gradaudit": 0, "gradaudit.errors": 0, "gradaudit.schema": 0, "gradaudit.distributed": 0, "gradaudit.kernels": 0, "gradaudit._C": 0,
    "gradaudit.ops": 1,
    "gradaudit.store": 2, "gradaudit.grads": 2,
    "gradaudit.models": 3, "gradaudit.integrations": 3,
    "gradaudit.capture": 4,
    "gradaudit.audit": 5,
    "gradaudit.report": 6,
    "gradaudit.workflow": 7,
    "gradaudit.cli": 8, "gradaudit.__main__": 9,
    "gradaudit.toy": 10,
}


def _unit(module: str) -> str:
    """The floor unit a dotted module name belongs to: its longest prefix in FLOORS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return ".".join(parts[:n])
    raise KeyError(f"{module} belongs to no floor: add its unit to FLOORS and to docs/layout.md")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path


def _imports(name: str, path: pathlib.Path):
    """Every gradaudit module that ``path`` imports, at any depth of its code (function-level too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t == "gradaudit" or t.startswith("gradaudit."):
                try:
                    yield node.lineno, _unit(t)
                except KeyError:  # a name imported from a module, not a module itself
                    continue


def test_every_module_has_a_floor():
    for name, _ in _modules():
        _unit(name)


def test_no_import_runs_up_a_floor():
    upward = set()
    for name, path in _modules():
        unit = _unit(name)
        for line, target in _imports(name, path):
            if target != unit and FLOORS[target] >= FLOORS[unit]:
                upward.add(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}, floor {FLOORS[unit]}) imports "
                              f"{target} (floor {FLOORS[target]})")
    assert not upward, "imports that run up (or across) a floor:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check above can fail: a store module that imported the audit would be caught."""
    bad = tmp_path / "runfolder.py"
    bad.write_text("def f():\n    from gradaudit.audit.method import SliceSet\n")
    assert {t for _, t in _imports("gradaudit.store.runfolder", bad)} == {"gradaudit.audit"}
    assert FLOORS["gradaudit.audit"] > FLOORS["gradaudit.store"]


@pytest.mark.parametrize("modules", ["gradaudit.audit.per_pair, gradaudit.audit.claims, gradaudit.audit.baselines"])
def test_the_audit_never_loads_torch(modules):
    code = (f"import sys; import {modules}; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors'));"
            "print(loaded); sys.exit(1 if loaded else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"the audit loaded {run.stdout.strip()} {run.stderr[-2000:]}"
