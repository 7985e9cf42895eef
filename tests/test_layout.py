"""The house rules of docs/ARCHITECTURE.md, checked on the source: dependency direction,
no module named like a standard-library module, no two modules importing each other; and the
tests mirror the modules: every module has its test file, no test module imports another."""
import ast
import os
import sys

import pytest

from tests.helpers import ROOT

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


# ---- the tests mirror the modules ------------------------------------------------------------
#: modules without a test file of their own, each with the reason
NO_TEST_FILE = {
    "glacier_runtime/__init__.py": "no code (docstring and __version__)",
    "glacier_submit/__init__.py": "no code (docstring and __version__)",
    "glacier_submit/tuning/__init__.py": "no code",
    "glacier_submit/mapping/__init__.py": "no code (the package's map in its docstring)",
    "glacier_cli/__init__.py": "no code",
    "training/__init__.py": "no code",
    "training/data/__init__.py": "no code",
    "training/engine/__init__.py": "no code",
    "training/reporting/__init__.py": "no code",
    "training/runs/__init__.py": "no code",
}


def expected_test_file(module: str) -> str:
    """``pkg/sub/mod.py`` -> ``tests/pkg/sub/test_mod.py``; a package's ``__init__.py`` is tested
    as a module of its parent: ``pkg/sub/__init__.py`` -> ``tests/pkg/test_sub.py``."""
    folder, name = os.path.split(module)
    if name == "__init__.py":
        folder, name = os.path.split(folder)
        name += ".py"
    return os.path.join("tests", folder, "test_" + name).replace(os.sep, "/")


def test_every_module_has_its_test_file():
    modules = sorted(os.path.relpath(p, ROOT).replace(os.sep, "/") for p in MODULES.values())
    missing = sorted(f"{m} -> {expected_test_file(m)}" for m in modules
                     if m not in NO_TEST_FILE and not os.path.isfile(os.path.join(ROOT, expected_test_file(m))))
    assert not missing, "modules without their test file (write it, or add the module to NO_TEST_FILE with " \
                        f"the reason): {missing}"
    stale = sorted(set(NO_TEST_FILE) - set(modules))
    assert not stale, f"NO_TEST_FILE names modules that do not exist: {stale}"
    assert all(NO_TEST_FILE.values())
    have = [m for m in NO_TEST_FILE if os.path.isfile(os.path.join(ROOT, expected_test_file(m)))]
    assert not have, f"these modules have a test file now: take them out of NO_TEST_FILE: {have}"


def _test_files():
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(folder, f)


def _imports_of_a_test_module(name: str) -> bool:
    """``tests.conftest``, ``tests.test_*`` or ``tests.<package>.test_*``."""
    parts = name.split(".")
    return parts[0] == "tests" and len(parts) > 1 and (parts[-1] == "conftest" or parts[-1].startswith("test_"))


def test_no_test_imports_another_test_module():
    """Shared builders live in tests/helpers.py and fixtures in tests/conftest.py: no file under
    tests/ imports a test module or conftest."""
    bad = []
    for path in _test_files():
        for node in ast.walk(ast.parse(open(path).read(), filename=path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative: from . import test_x / from .conftest import y
                names = ["tests." + (node.module or a.name) for a in node.names]
            else:
                continue
            bad += [f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {n}" for n in names if _imports_of_a_test_module(n)]
    assert not bad, bad


def test_test_folders_are_packages():
    """Every folder of tests/ has an __init__.py, so that same-named test files do not clash."""
    missing = [os.path.relpath(folder, ROOT) for folder, dirs, files in os.walk(os.path.join(ROOT, "tests"))
               if "__pycache__" not in folder and "__init__.py" not in files]
    assert not missing, missing
