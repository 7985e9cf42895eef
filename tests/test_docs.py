"""The documentation keeps up with the code: every module is in ARCHITECTURE.md's module
map, and every relative link in the README and docs/ points at a file that exists."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("glacier_runtime", "training", "glacier_submit", "glacier_cli")


def _modules():
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py") and f != "__init__.py":
                    yield os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")


def test_every_module_is_in_the_architecture_map():
    text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8").read()
    mapped = set(re.findall(r"`([\w/]+\.py)`", text))
    missing = sorted(m for m in _modules() if m not in mapped)
    assert not missing, f"add these modules to docs/ARCHITECTURE.md's module map: {missing}"
    stale = sorted(m for m in mapped if "/" in m and m.split("/")[0] in PACKAGES
                   and not os.path.exists(os.path.join(ROOT, m)))
    assert not stale, f"docs/ARCHITECTURE.md names modules that do not exist: {stale}"


DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not os.path.exists(os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path))):
            bad.append(target)
    assert not bad, f"{doc} links to files that do not exist: {bad}"
