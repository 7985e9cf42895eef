"""The rendered solution.py: Python 3.9 (vermin) and only the platform's packages, the runtime
embedded verbatim."""
import ast
import os

import pytest


def _embedded_sources(src: str) -> dict:
    """The runtime modules inside solution.py's ``_SOURCES`` string literals."""
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["_SOURCES"]:
            return ast.literal_eval(node.value)
    raise AssertionError("solution.py has no _SOURCES table")


def test_solution_py_is_py39_and_platform_only(bundle, tmp_path):
    """The template and the runtime embedded in its string literals: Python 3.9 (vermin)
    and only the platform's packages (the runtime's import allow-list)."""
    pytest.importorskip("vermin")
    from glacier_submit.render import runtime_sources
    from tests.helpers import forbidden_imports, vermin_violations

    out, _ = bundle
    src = open(os.path.join(out, "solution.py")).read()
    tree = ast.parse(src, feature_version=(3, 9))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names <= {"importlib", "os", "sys", "base64"}
    assert "def maskgeration(imagepath, out_dir=None, model_path=None)" in src and "def main()" in src
    assert all("pip install" not in line for line in src.splitlines()[:15])
    embedded = _embedded_sources(src)
    assert embedded == runtime_sources() and "entry" in embedded and "predictor" in embedded
    pkg = tmp_path / "_glacier_runtime"
    for rel, text in embedded.items():
        path = pkg.joinpath(*rel.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        assert not forbidden_imports(text, rel), rel
        assert "training" not in {m.split(".")[0] for m in forbidden_imports(text, rel)}
    (tmp_path / "solution.py").write_text(src)
    assert not vermin_violations(str(tmp_path))
