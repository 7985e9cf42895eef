"""ONNX export of members (opset 17, dynamic batch/height/width) with a parity check."""
from __future__ import annotations

import io
import logging
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

log = logging.getLogger("glacier.export")


class ExportError(RuntimeError):
    pass


def torch_model_for(entry: Dict[str, Any]) -> torch.nn.Module:
    """The member as a torch module: the runtime's pure-torch twin, else smp."""
    from glacier_runtime.models import UnsupportedArchitecture, build_model

    try:
        model = build_model(entry["spec"])
    except UnsupportedArchitecture:
        from training.models import create_model

        model = create_model(entry["spec"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in entry["state_dict"].items()})
    return model.eval()


def export_onnx(model: torch.nn.Module, in_channels: int, opset: int = 17, fp16: bool = False) -> bytes:
    """Serialise ``model`` to ONNX bytes; unsupported layers raise ExportError naming them."""
    model = model.eval()
    x = torch.randn(1, in_channels, 64, 64)
    buf = io.BytesIO()
    try:
        kwargs = dict(input_names=["image"], output_names=["logits"], opset_version=opset,
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                    "logits": {0: "batch", 2: "height", 3: "width"}})
        try:
            torch.onnx.export(model, (x,), buf, dynamo=False, **kwargs)
        except TypeError:  # torch without the dynamo switch
            torch.onnx.export(model, (x,), buf, **kwargs)
    except Exception as exc:
        raise ExportError(
            f"ONNX export failed: {exc}. A layer of this architecture has no ONNX opset-{opset} form; "
            "use a supported architecture (Unet with resnet18/34/50) or --backend torch.") from exc
    data = buf.getvalue()
    if fp16:
        data = to_fp16(data)
    return data


def to_fp16(model_bytes: bytes) -> bytes:
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # pragma: no cover
        raise ExportError("fp16 ONNX needs onnxruntime's transformers tools") from exc
    m = onnx.load_from_string(model_bytes)
    m16 = convert_float_to_float16(m, keep_io_types=True)
    return m16.SerializeToString()


def parity(model: torch.nn.Module, onnx_bytes: bytes, in_channels: int, size=(96, 128), seed: int = 0) -> Dict[str, float]:
    """Max |logit difference| and class agreement between torch and ONNX Runtime (CPU)."""
    from glacier_runtime.backends import OnnxRunner

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_channels, *size, generator=g)
    with torch.no_grad():
        ref = model.eval()(x)
    out = OnnxRunner(onnx_bytes, "cpu")(x)
    return {"max_abs_diff": float((ref - out).abs().max()),
            "class_agreement": float((ref.argmax(1) == out.argmax(1)).float().mean())}


def export_member(entry: Dict[str, Any], fp16: bool = False, tolerance: float = 1e-4) -> Dict[str, Any]:
    """Export one payload entry; returns {"onnx": bytes, "parity": {...}}."""
    model = torch_model_for(entry)
    cin = int(entry["spec"]["in_channels"])
    data = export_onnx(model, cin, fp16=False)
    check = parity(model, data, cin)
    if check["max_abs_diff"] > tolerance:
        raise ExportError(f"{entry.get('name')}: ONNX output differs from torch by {check['max_abs_diff']:.2e} "
                          f"(> {tolerance:.0e})")
    result = {"onnx": data, "parity": check}
    if fp16:
        d16 = to_fp16(data)
        result["onnx"] = d16
        result["parity_fp16"] = parity(model, d16, cin)
    return result


def onnx_tensor(data: bytes) -> torch.Tensor:
    """ONNX bytes stored as a uint8 tensor (loads with torch.load(weights_only=True))."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def attach_onnx(entry: Dict[str, Any], parity_report: Dict[str, Any]) -> None:
    """Export the member to ONNX (parity-checked against torch) into ``entry["onnx"]``."""
    res = export_member(entry)
    entry["onnx"] = onnx_tensor(res["onnx"])
    parity_report[entry["name"]] = res["parity"]


def prepare_backend(entries: List[Dict[str, Any]], backend: str) -> Tuple[str, Dict[str, Any]]:
    """Resolve ``auto`` (pure torch when every member has a runtime twin); for ONNX, export
    every member (parity-checked) into its entry."""
    from training.models import runtime_supports

    supported = all(runtime_supports(e["spec"]) for e in entries)
    if backend == "auto":
        backend = "torch" if supported else "onnx"
    if backend == "torch" and not supported:
        bad = [e["name"] for e in entries if not runtime_supports(e["spec"])]
        raise ValueError(f"members {bad} have no pure-torch runtime twin; build with --backend onnx")
    parity_report: Dict[str, Any] = {}
    if backend == "onnx":
        for e in entries:
            attach_onnx(e, parity_report)
            if not runtime_supports(e["spec"]):
                e["state_dict"] = {}
    return backend, parity_report
