"""The house rules of docs/ARCHITECTURE.md, checked on the source: dependency direction,
no module named like a standard-library module, no two modules importing each other."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("glacier_runtime", "training", "glacier_submit", "glacier_cli")
#: what each package may import of this repository (docs/ARCHITECTURE.md, "Layers")
ALLOWED = {
    "glacier_runtime": {"glacier_runtime"},
    "glacier_cli": {"glacier_cli"},
    "training": {"glacier_runtime", "glacier_cli", "training"},
    "glacier_submit": {"glacier_runtime", "glacier_cli", "training", "glacier_submit"},
}
#: no two modules may import each other (evaluate <-> report, loop <-> trainer and bundle <-> tune were broken)
KNOWN_CYCLES: set = set()


def _modules():
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), os.path.join(folder, f)


def _imports(name, path):
    """Absolute names of this repository's modules that ``path`` imports (anywhere in it)."""
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), filename=path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


MODULES = dict(_modules())


def test_no_module_named_like_the_standard_library():
    clash = sorted(n for n in MODULES if n.rsplit(".", 1)[-1] in sys.stdlib_module_names)
    assert not clash, f"rename {clash}: scripts run from their folder would shadow the standard module"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_dependency_direction(name):
    top = name.split(".")[0]
    bad = sorted(m for m in _imports(name, MODULES[name]) if m.split(".")[0] not in ALLOWED[top])
    assert not bad, f"{name} imports {bad}: {top} may import only {sorted(ALLOWED[top])}"


def test_no_two_modules_import_each_other():
    deps = {n: {m for m in _imports(n, p) if m in MODULES and m != n} for n, p in MODULES.items()}
    pairs = {frozenset((a, b)) for a in deps for b in deps[a] if a in deps.get(b, ())}
    assert pairs <= KNOWN_CYCLES, sorted(tuple(sorted(p)) for p in pairs - KNOWN_CYCLES)
