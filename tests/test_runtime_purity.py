"""glacier_runtime/ imports only what the platform has and is Python 3.9 syntax."""
import ast
import os

import pytest

from tests.helpers import ROOT, forbidden_imports, vermin_violations

RUNTIME = os.path.join(ROOT, "glacier_runtime")


def _files():
    for folder, _, files in os.walk(RUNTIME):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(folder, f)


@pytest.mark.parametrize("path", sorted(_files()), ids=lambda p: os.path.relpath(p, ROOT))
def test_runtime_imports_platform_packages_only(path):
    assert not forbidden_imports(open(path).read(), path), path


def test_onnxruntime_only_on_onnx_path():
    src = open(os.path.join(RUNTIME, "backends.py")).read()
    tree = ast.parse(src)
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("onnxruntime" in ast.dump(n) for n in top_level)


def test_runtime_is_python39_syntax():
    for path in _files():
        ast.parse(open(path).read(), filename=path, feature_version=(3, 9))


def test_vermin_minimum_version():
    pytest.importorskip("vermin")
    assert not vermin_violations(RUNTIME)


def test_runtime_imports_nothing_of_the_repo():
    for path in _files():
        src = open(path).read()
        assert "import training" not in src and "from training" not in src and "glacier_submit" not in src, path
