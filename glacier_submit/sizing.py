"""What a bundle weighs: model.pth serialised, each member's share of it, fp16 when fp32 is
over the budget, the members kept under ``--max-mb`` (glacier_submit/selection.py decides
which), and the last size check before anything is written."""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from glacier_runtime.predictor import Predictor
from glacier_submit.members import cast_payload, make_payload
from glacier_submit.selection import MB, render_table, select_members



class BudgetError(RuntimeError):
    """The bundle cannot meet its size budget; the message has the table and the fix."""


def serialise(payload: Dict[str, Any]) -> bytes:
    """model.pth bytes: tensors and plain types only, so it loads with weights_only=True."""
    from glacier_runtime.safeload import plain

    buf = io.BytesIO()
    torch.save(plain(payload, "model payload"), buf)
    return buf.getvalue()


def blob_budget(budget: int, source_bytes: int, single_file: bool) -> int:
    """Bytes model.pth may take: the upload (solution.py + model.pth) within ``budget``;
    --single-file embeds it base64 (4/3) in solution.py beside the runtime source."""
    room = budget - source_bytes
    return (room - 512) * 3 // 4 if single_file else room


def tensor_bytes(entry: Dict[str, Any], fp16: bool) -> int:
    n = sum(v.numel() * (2 if fp16 and v.is_floating_point() else v.element_size()) for v in entry["state_dict"].values())
    onnx = entry.get("onnx")
    return n + (onnx.numel() if isinstance(onnx, torch.Tensor) else len(onnx or b""))


def member_sizes(entries: List[Dict[str, Any]], inference: Dict[str, Any], fp16: bool) -> Tuple[Dict[str, int], int]:
    """Each member's serialised share of model.pth (in the stored precision) and the bytes
    of a payload without members; shares add up to the payload's size within bytes."""
    empty = make_payload(entries[:1], inference)
    empty["members"] = []
    base = len(serialise(empty))
    sizes = {}
    for e in entries:
        one = make_payload([e], inference)
        one = cast_payload(one, torch.float16) if fp16 else one
        sizes[e["name"]] = len(serialise(one)) - base
    return sizes, base


def choose_precision(entries: List[Dict[str, Any]], inference: Dict[str, Any], precision: str, room: int,
                     notes: List[str]) -> bool:
    """fp16 when asked, or (auto) when every member in fp32 would exceed the budget."""
    if precision != "auto":
        return precision == "fp16"
    raw = sum(tensor_bytes(e, False) for e in entries)
    total = raw if raw > room else len(serialise(make_payload(entries, inference)))
    if total > room:
        notes.append(f"fp32 weights of {len(entries)} members are {total / MB:.1f} MB > {room / MB:.1f} MB "
                     "left for model.pth: stored in fp16")
        return True
    return False


def choose_members(entries: List[Dict[str, Any]], inference: Dict[str, Any], fp16: bool, room: int,
                   max_members: Optional[int]) -> List[Dict[str, Any]]:
    """The selection table (see glacier_submit/selection.py); BudgetError if no member fits."""
    sizes, base = member_sizes(entries, inference, fp16)
    rows = [{"name": e["name"], "fold": e["meta"]["fold"], "seed": e["meta"]["seed"],
             "val_mcc": e["meta"]["val_mcc"], "bytes": sizes[e["name"]]} for e in entries]
    table = select_members(rows, room, base, max_members)
    if not any(r["kept"] for r in table):
        raise BudgetError(
            f"no member fits: the smallest needs {min(sizes.values()) / MB:.1f} MB "
            f"({'fp16' if fp16 else 'fp32'}) and {room / MB:.1f} MB are left for the weights.\n"
            f"{render_table(table)}\nRaise --max-mb if the platform allows it, or train a smaller encoder.")
    return table


def fp16_agreement(payload_a: Dict[str, Any], payload_b: Dict[str, Any], tile: np.ndarray) -> float:
    """Share of the check tile's pixels whose class is the same under both payloads (no TTA)."""
    over = {"tta": "none", "scales": [1.0]}
    a = Predictor.from_payload(payload_a, device="cpu", overrides=over).predict_ids(tile)
    b = Predictor.from_payload(payload_b, device="cpu", overrides=over).predict_ids(tile)
    return float((a == b).mean())


def check_upload(src_bytes: bytes, blob: bytes, single_file: bool, budget: int, max_mb: float) -> None:
    """The last check before anything is written: the upload fits ``--max-mb``."""
    total = len(src_bytes) + (0 if single_file else len(blob))
    if total > budget:
        what = "--single-file solution.py" if single_file else "solution.py + model.pth"
        raise BudgetError(f"{what} is {total / MB:.1f} MB > {max_mb:.0f} MB; raise --max-mb or use --max-members")
