"""Initialise a model from a pre-trained checkpoint: layers matched by name and shape."""
from __future__ import annotations

import logging
from typing import Dict

import torch

from glacier_runtime.classes import class_map

log = logging.getLogger("glacier.train")


def load_init_state(path: str, cfg, report: list = None) -> Dict[str, torch.Tensor]:
    """State dict entries of ``path`` that fit the configured model, matched by name and
    shape. The checkpoint's bands must match the config's by physical role (an HKH model
    trained on L7 B1 B2 B3 B5 B6_high initialises an L8 B2 B3 B4 B6 B10 model); appends
    human-readable lines to ``report``."""
    from training.bands import map_bands
    from training.models import create_model, model_spec

    from training.engine.checkpoint import load_state

    ck = load_state(path, "--init-from checkpoint", "re-run pre-training to rewrite it")
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else ck
    if isinstance(ck, dict) and ck.get("sensor") and ck.get("bands"):
        # raises BandMappingError naming both bands if roles differ
        map_bands(cfg.data.sensor, cfg.data.bands, ck["sensor"], ck["bands"])
    n_classes = len(class_map(cfg.data.label_mode == "binary")["names"])
    target = create_model(model_spec(cfg.model, len(cfg.data.bands), n_classes)).state_dict()
    keep, skipped = {}, []
    for k, v in sd.items():
        if k in target and target[k].shape == v.shape:
            keep[k] = v
        else:
            skipped.append(k)
    not_loaded = [k for k in target if k not in keep]
    lines = [f"init-from {path}: loaded {len(keep)}/{len(target)} tensors by name and shape"]
    if not_loaded:
        lines.append(f"  not loaded (kept fresh): {len(not_loaded)}: " + ", ".join(not_loaded[:8])
                     + (" ..." if len(not_loaded) > 8 else ""))
    if skipped:
        lines.append(f"  in the checkpoint but unused: {len(skipped)}: " + ", ".join(skipped[:8]))
    for line in lines:
        log.warning(line)
    if report is not None:
        report.extend(lines)
    return keep
