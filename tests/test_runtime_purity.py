"""glacier_runtime/ imports only what the platform has and is Python 3.9 syntax."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = os.path.join(ROOT, "glacier_runtime")
ALLOWED = {"numpy", "torch", "cv2", "tifffile", "PIL", "tqdm", "onnxruntime"}
STDLIB = set(sys.stdlib_module_names)


def _files():
    for folder, _, files in os.walk(RUNTIME):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(folder, f)


def forbidden_imports(src: str, name: str) -> list:
    """Absolute imports of ``src`` outside the standard library and the platform's packages."""
    bad = []
    for node in ast.walk(ast.parse(src, filename=name)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the runtime
                continue
            mods = [node.module]
        else:
            continue
        bad += [m for m in mods if m.split(".")[0] not in STDLIB | ALLOWED | {"__future__"}]
    return bad


def vermin_violations(folder: str) -> str:
    """'' when every file under ``folder`` runs on Python 3.9, else vermin's report."""
    exe = os.path.join(os.path.dirname(sys.executable), "vermin")
    r = subprocess.run([exe, "--no-tips", "--violations", "-t=3.9-", "--eval-annotations",
                        "--backport", "typing", folder], capture_output=True, text=True)
    return "" if r.returncode == 0 else r.stdout + r.stderr


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
