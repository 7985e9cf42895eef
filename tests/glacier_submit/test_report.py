"""The evaluation report: written without matplotlib (figures skipped, said so); report and
evaluate do not import each other."""
import ast
import os
import sys

from glacier_submit.evaluate import evaluate

from tests.helpers import ROOT


def test_report_without_matplotlib(setup, tmp_path, monkeypatch):
    bundle, data, _, _ = setup
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = evaluate(bundle, os.path.join(data, "unseen"), str(tmp_path / "r"))
    assert "mcc" in r and r["figures"] == []
    md = open(tmp_path / "r" / "report.md").read()
    assert "figures skipped: matplotlib is not installed" in md
    assert os.path.exists(tmp_path / "r" / "report.html") and os.path.exists(tmp_path / "r" / "report.json")
    assert not os.path.exists(tmp_path / "r" / "figures")


def test_evaluate_and_report_do_not_import_each_other():
    def imports(mod):
        tree = ast.parse(open(os.path.join(ROOT, "glacier_submit", mod + ".py")).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert "glacier_submit.evaluate" not in imports("report")
    assert "glacier_submit.report" in imports("evaluate")
