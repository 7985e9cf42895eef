"""Checkpoints -> payload members (the plain-data format stored in model.pth)."""
from __future__ import annotations

import hashlib
import os
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from training.bands import COMPETITION_SENSOR
from training.engine.checkpoint import load_checkpoint

PAYLOAD_FORMAT = "glacier-bundle/1"
log = logging.getLogger("glacier.members")


def checkpoint_kind(ck: Dict[str, Any]) -> str:
    """``"member"`` or ``"pretrain"``: the ``kind`` key, else inferred for older files
    (``glacier-train pretrain`` wrote ``fold: -1``; a checkpoint without a fold is no member)."""
    kind = ck.get("kind")
    if kind in ("member", "pretrain"):
        return kind
    fold = ck.get("fold")
    return "pretrain" if not isinstance(fold, int) or fold < 0 else "member"


def state_sha(sd: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_members(paths: Sequence[str], notes: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Read member checkpoints into payload entries (fp32 state dicts).

    Pre-training checkpoints (see :func:`checkpoint_kind`) are skipped, never taken as
    members; each skip is logged and appended to ``notes``.
    """
    if not paths:
        raise ValueError("no member checkpoints given (e.g. --models weights/fold*_seed*.pt)")
    entries = []
    skipped = []
    for p in paths:
        ck = load_checkpoint(p)
        if checkpoint_kind(ck) == "pretrain":
            note = (f"skipped {p}: a pre-training checkpoint (kind pretrain), not an ensemble member; "
                    "keep it outside the members' folder (e.g. pretrained/hkh.pt)")
            log.warning(note)
            skipped.append(p)
            if notes is not None:
                notes.append(note)
            continue
        name = os.path.splitext(os.path.basename(p))[0]
        entries.append({
            "name": name,
            "spec": ck["spec"],
            "state_dict": {k: v.detach().cpu() for k, v in ck["state_dict"].items()},
            "stats": ck["stats"],
            "weight": float(ck.get("val_mcc") or 1.0),
            "onnx": None,
            "meta": {
                "fold": ck["fold"], "seed": ck["seed"], "val_mcc": ck.get("val_mcc"),
                "train_tiles": list(ck["train_tiles"]), "val_tiles": list(ck.get("val_tiles", [])),
                "tile_sha256": dict(ck.get("tile_sha256") or {}),
                "bands": list(ck["bands"]), "sensor": ck.get("sensor") or COMPETITION_SENSOR,
                "class_map": ck["class_map"], "source": os.path.abspath(p),
                "code_version": ck.get("code_version"), "sha": state_sha(ck["state_dict"]),
                "fold_grouping": dict(ck.get("fold_grouping") or {}),
            },
        })
    if not entries:
        raise ValueError(f"only pre-training checkpoints among {list(skipped)}: give the members written by "
                         "`glacier-train cv` (e.g. --models 'weights/fold*_seed*.pt')")
    first = entries[0]
    for e in entries[1:]:
        if (e["meta"]["bands"], e["meta"]["sensor"]) != (first["meta"]["bands"], first["meta"]["sensor"]):
            raise ValueError(f"members disagree on bands: {first['name']} {first['meta']['sensor']} "
                             f"{first['meta']['bands']} vs {e['name']} {e['meta']['sensor']} {e['meta']['bands']}")
        if e["spec"]["classes"] != first["spec"]["classes"]:
            raise ValueError(f"members disagree on the class count: {first['name']} vs {e['name']}")
    return entries


def make_payload(entries: List[Dict[str, Any]], inference: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "format": PAYLOAD_FORMAT,
        "members": entries,
        "inference": inference,
        "class_map": entries[0]["meta"]["class_map"],
        "bands": entries[0]["meta"]["bands"],
        "sensor": entries[0]["meta"].get("sensor") or COMPETITION_SENSOR,
    }


def payload_of(bundle: Optional[str] = None, members: Sequence[str] = ()) -> Dict[str, Any]:
    """What a predictor is built from: a bundle folder's ``model.pth``, or a payload made of
    member checkpoints with no stored inference settings (``predict`` and ``map`` share it)."""
    from glacier_runtime.predictor import load_payload

    if bundle:
        return load_payload(os.path.join(bundle, "model.pth"))
    return make_payload(load_members(list(members)), {})


def cast_payload(payload: Dict[str, Any], dtype: torch.dtype) -> Dict[str, Any]:
    """A copy whose floating-point weights are stored as ``dtype`` (fp16 halves the size)."""
    out = dict(payload)
    out["members"] = []
    for e in payload["members"]:
        e2 = dict(e)
        e2["state_dict"] = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in e["state_dict"].items()}
        out["members"].append(e2)
    return out
