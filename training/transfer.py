"""Initialise a model from a pre-trained checkpoint: layers matched by name and shape."""
from __future__ import annotations

import logging
from typing import Dict

import torch

log = logging.getLogger("glacier.train")


def load_init_state(path: str, cfg) -> Dict[str, torch.Tensor]:
    """State dict entries of ``path`` that fit the configured model; lists what was skipped."""
    from training.models import create_model, model_spec

    ck = torch.load(path, map_location="cpu", weights_only=False)
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else ck
    n_classes = 2 if cfg.data.label_mode == "binary" else 4
    target = create_model(model_spec(cfg.model, len(cfg.data.bands), n_classes)).state_dict()
    keep, skipped = {}, []
    for k, v in sd.items():
        if k in target and target[k].shape == v.shape:
            keep[k] = v
        else:
            skipped.append(k)
    not_loaded = [k for k in target if k not in keep]
    log.warning("init-from %s: loaded %d tensors; %d not loaded (e.g. %s)", path, len(keep), len(not_loaded),
                not_loaded[:4])
    return keep
