"""Post-processing presets: the rule lists shipped as package data (found from any working
directory) equal to their YAML files, a user's YAML file, 'none', unknown names refused."""
import os

import pytest
import yaml

from glacier_submit.postprocessing import all_presets, load_postprocess, preset_names

from tests.helpers import ROOT, pyproject


def test_presets_are_package_data(tmp_path, monkeypatch):
    from glacier_submit.postprocessing import load_postprocess, preset_names

    monkeypatch.chdir(tmp_path)  # not the checkout
    assert preset_names() == ["competition", "light", "none"]
    assert len(load_postprocess("light")) == 3 and load_postprocess("none") == []
    with pytest.raises(ValueError, match="competition"):
        load_postprocess("heavy")
    data = pyproject()["tool"]["setuptools"]["package-data"]
    assert "presets/*.yaml" in data["glacier_submit"]


@pytest.mark.parametrize("name", ["light", "competition", "none"])
def test_each_preset_is_its_yaml_file(name):
    with open(os.path.join(ROOT, "glacier_submit", "presets", f"{name}.yaml")) as fh:
        want = (yaml.safe_load(fh) or {}).get("rules", [])
    assert load_postprocess(name) == want
    assert all_presets()[name] == want


def test_a_yaml_path_and_no_post_processing(tmp_path):
    rules = [{"rule": "min_area", "class": 3, "min_area": 7}, {"rule": "fill_holes", "class": 1, "max_area": 20}]
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump({"rules": rules}))
    assert load_postprocess(str(p)) == rules
    (tmp_path / "empty.yaml").write_text("")
    assert load_postprocess(str(tmp_path / "empty.yaml")) == []
    assert load_postprocess(None) == [] and load_postprocess("") == [] and load_postprocess("none") == []
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"rules": [{"rule": "erode"}]}))
    with pytest.raises(ValueError, match="'rule' must be one of"):
        load_postprocess(str(tmp_path / "bad.yaml"))
    assert sorted(all_presets()) == preset_names()
