"""Post-processing presets: the rule lists shipped as package data (``glacier_submit/presets/``,
found from any install) or a user's YAML file."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional


def preset_names() -> List[str]:
    """Post-processing presets shipped inside the package (glacier_submit/presets/)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("glacier_submit").joinpath("presets").iterdir() if p.name.endswith(".yaml"))


def load_postprocess(preset: Optional[str]) -> List[Dict[str, Any]]:
    """A preset name (shipped as package data, found from any install) or a YAML path -> rule list."""
    from importlib.resources import files

    import yaml

    from glacier_runtime.postprocess import validate_rules

    if not preset or preset == "none":
        return []
    if os.path.isfile(preset):
        with open(preset) as fh:
            text = fh.read()
    else:
        res = files("glacier_submit").joinpath("presets").joinpath(f"{preset}.yaml")
        if not res.is_file():
            raise ValueError(f"post-processing preset {preset!r} not found; use one of {preset_names()} or a YAML path")
        text = res.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    return validate_rules(data.get("rules", []))


def all_presets() -> Dict[str, List[Dict[str, Any]]]:
    """Every shipped preset's rules by name ('none' included), for the tuner."""
    presets = {name: load_postprocess(name) for name in preset_names()}
    presets.setdefault("none", [])
    return presets
