"""``build --precision int8``: post-training static int8 quantisation of exported members.

Each member's fp32 ONNX graph is quantised with onnxruntime's ``quantize_static`` in the QDQ
format (int8 weights per output channel, uint8 activations, MinMax calibration), calibrated on
patches of that member's own training tiles, normalised with its own statistics. The build
then measures how often the int8 class maps equal the fp32 ones and refuses int8 below a
threshold (``--int8-min-agreement``, default 99.5 %).

Why ONNX and not torch's x86 quantisation: torch 2.0.1 runs FX x86 quantisation on the CPU
(checked in the Python 3.9 / torch 2.0.1 environment), but a quantised FX module is code, not
tensors: it cannot travel in a ``weights_only`` model.pth and be rebuilt by the bundle's pure-
torch runtime. An int8 ONNX graph is plain bytes that the runtime's unchanged ``OnnxRunner``
runs, so the bundle needs onnxruntime (the ``# pip install onnxruntime`` line) where it runs.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("glacier.quantize")

#: What the manifest says about the method (docs/BUNDLE.md).
METHOD = ("onnxruntime quantize_static, QDQ format, int8 weights per output channel, uint8 activations, "
          "MinMax calibration on patches of each member's own training tiles")
DEFAULT_MIN_AGREEMENT = 99.5  # percent of pixels whose int8 class equals the fp32 class


class Int8Error(ValueError):
    """int8 cannot be built or was refused; the message names the value and the fix."""


def _tile_index(data: str) -> Dict[str, Dict[str, str]]:
    from glacier_runtime.tiles import list_tiles

    tiles, _ = list_tiles(data)
    return {k: p for k, p in tiles.items() if len(p) == 5}


def calibration_keys(entry: Mapping[str, Any], index: Mapping[str, Any], max_tiles: int) -> List[str]:
    """The member's own training tiles found in the calibration folder (sorted, at most ``max_tiles``,
    spread evenly over the sorted list)."""
    own = sorted(k for k in entry["meta"]["train_tiles"] if k in index)
    if len(own) <= max_tiles:
        return own
    pick = np.linspace(0, len(own) - 1, max_tiles).round().astype(int)
    return [own[i] for i in sorted(set(pick.tolist()))]


def patches(image: np.ndarray, size: int, n: int, seed: int) -> Iterator[np.ndarray]:
    """``n`` deterministic ``size`` x ``size`` crops of a normalised (C, H, W) tile (the whole tile
    when it is smaller), each as a (1, C, h, w) float32 batch."""
    c, h, w = image.shape
    ph, pw = min(size, h), min(size, w)
    rng = np.random.default_rng(seed)
    for _ in range(n if (h > ph or w > pw) else 1):
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        yield np.ascontiguousarray(image[None, :, y:y + ph, x:x + pw], dtype=np.float32)


class _Reader:
    """onnxruntime CalibrationDataReader over a list of input batches."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]):
        self.name, self.batches, self.i = name, list(batches), 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def calibration_batches(entry: Mapping[str, Any], index: Mapping[str, Mapping[str, str]], keys: Sequence[str],
                        patch: int = 256, per_tile: int = 4) -> List[np.ndarray]:
    """Normalised patches of ``keys`` with the member's own statistics (what its graph sees)."""
    from glacier_runtime.normalize import normalize
    from glacier_runtime.tiles import read_tile

    out: List[np.ndarray] = []
    for i, k in enumerate(keys):
        img = normalize(read_tile(index[k]), entry["stats"])
        out += list(patches(img, patch, per_tile, seed=i))
    return out


def quantize_graph(fp32: bytes, batches: Sequence[np.ndarray], input_name: str = "image") -> bytes:
    """fp32 ONNX bytes -> int8 QDQ ONNX bytes, calibrated on ``batches``."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:  # pragma: no cover - the build environment has it (pyproject)
        raise Int8Error("--precision int8 needs onnxruntime (with onnxruntime.quantization) where the build "
                        "runs: pip install onnxruntime") from exc

    with tempfile.TemporaryDirectory(prefix="glacier-int8-") as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        with open(src, "wb") as fh:
            fh.write(fp32)
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(max(level, logging.ERROR))  # "consider pre-processing" warnings on the root logger
        try:
            quantize_static(src, dst, _Reader(input_name, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            quiet.setLevel(level)
        with open(dst, "rb") as fh:
            return fh.read()


def check_calib_data(calib_data: Optional[str]) -> str:
    """The calibration folder, or Int8Error naming ``--calib-data`` and what to give."""
    if not calib_data:
        raise Int8Error("--precision int8 needs calibration tiles: give --calib-data DIR, the training folder "
                        "the members were trained on (Band1..Band5 [+ label]); --tune-data DIR serves too")
    if not os.path.isdir(calib_data):
        raise Int8Error(f"--calib-data {calib_data}: no such folder; give the members' training folder")
    return calib_data


def check_calibration(entries: Sequence[Mapping[str, Any]], calib_data: Optional[str]) -> Dict[str, Dict[str, str]]:
    """Every member finds some of its own training tiles in the calibration folder (checked
    before any export); returns the folder's tile index."""
    index = _tile_index(check_calib_data(calib_data))
    for e in entries:
        if not calibration_keys(e, index, 1):
            raise Int8Error(f"--calib-data {calib_data} holds none of member {e['name']}'s training tiles "
                            f"({sorted(e['meta']['train_tiles'])[:5]} ...): give the folder it was trained on")
    return index


def quantize_entries(entries: List[Dict[str, Any]], calib_data: Optional[str], max_tiles: int = 8,
                     patch: int = 256, per_tile: int = 4) -> Tuple[Dict[str, List[str]], Dict[str, Any]]:
    """Replace each entry's fp32 ``onnx`` blob by its int8 graph, in place, and drop its fp32
    state dict (the int8 graph is the member). Returns (calibration tile ids per member, the
    fp32 blobs per member for the agreement check). Needs the members' training folder."""
    from glacier_submit.export import onnx_tensor

    index = check_calibration(entries, calib_data)
    used: Dict[str, List[str]] = {}
    fp32_blobs: Dict[str, Any] = {}
    for e in entries:
        keys = calibration_keys(e, index, max_tiles)
        blob = e["onnx"]
        fp32 = blob.numpy().tobytes() if hasattr(blob, "numpy") else bytes(blob)
        q = quantize_graph(fp32, calibration_batches(e, index, keys, patch, per_tile))
        fp32_blobs[e["name"]] = blob
        e["onnx"], e["precision"], e["state_dict"] = onnx_tensor(q), "int8", {}
        used[e["name"]] = keys
        log.info("int8: %s calibrated on %d tiles, %.1f MB -> %.1f MB", e["name"], len(keys),
                 len(fp32) / 2 ** 20, len(q) / 2 ** 20)
    return used, fp32_blobs


def agreement_tiles(entries: Sequence[Mapping[str, Any]], calib_data: str, check: np.ndarray,
                    max_tiles: int = 6) -> Tuple[List[str], List[np.ndarray]]:
    """Tiles the agreement is measured on: the members' validation tiles found in ``calib_data``
    (no member was calibrated on its own validation tiles), else its calibration tiles, plus the
    build's check tile."""
    from glacier_runtime.tiles import read_tile

    index = _tile_index(calib_data)
    val = sorted({k for e in entries for k in e["meta"]["val_tiles"] if k in index})
    if not val:
        val = sorted({k for e in entries for k in e["meta"]["train_tiles"] if k in index})
    if len(val) > max_tiles:
        val = [val[i] for i in sorted(set(np.linspace(0, len(val) - 1, max_tiles).round().astype(int).tolist()))]
    return val + ["check tile"], [read_tile(index[k]) for k in val] + [check]


def measure_agreement(payload: Mapping[str, Any], fp32_blobs: Mapping[str, Any],
                      images: Sequence[np.ndarray]) -> Dict[str, Any]:
    """Pixel agreement of int8 vs fp32 class maps: the ensemble (the bundle's members, merge and
    weights; no TTA, bias or post-processing) and each member alone, over ``images``."""
    from glacier_runtime.predictor import Predictor

    over = {"tta": "none", "scales": [1.0], "bias": None, "postprocess": []}
    fp32 = dict(payload, members=[dict(e, onnx=fp32_blobs[e["name"]], precision="fp32") for e in payload["members"]])

    def maps(p: Mapping[str, Any], members: Optional[List[int]]) -> List[np.ndarray]:
        pred = Predictor.from_payload(p, device="cpu", backend="onnx", overrides=over, members=members)
        return [pred.predict_ids(img) for img in images]

    def share(a: List[np.ndarray], b: List[np.ndarray]) -> float:
        return float(sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.size for x in a))

    result: Dict[str, Any] = {"ensemble": share(maps(fp32, None), maps(payload, None)), "members": {}}
    if len(payload["members"]) > 1:
        for i, e in enumerate(payload["members"]):
            result["members"][e["name"]] = share(maps(fp32, [i]), maps(payload, [i]))
    else:
        result["members"][payload["members"][0]["name"]] = result["ensemble"]
    return result


def check_agreement(result: Mapping[str, Any], min_agreement: float, tiles: Sequence[str]) -> None:
    """Refuse int8 when the ensemble agreement is below ``min_agreement`` percent."""
    got = 100.0 * result["ensemble"]
    if got < min_agreement:
        per = ", ".join(f"{k} {100 * v:.3f} %" for k, v in result["members"].items())
        raise Int8Error(
            f"int8 refused: its class maps equal fp32's on {got:.3f} % of the pixels of {len(tiles)} tiles "
            f"({', '.join(tiles)}; members alone: {per}), below --int8-min-agreement {min_agreement:g} %. "
            "Build in fp32 (drop --precision int8), calibrate on more of the training tiles (--calib-data), or "
            "accept the change with a lower --int8-min-agreement after checking MCC (benchmarks/int8.py).")


def onnxruntime_version() -> Optional[str]:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:  # pragma: no cover
        return None


# ---- the build's int8 policy: when int8 is asked for, allowed, chosen or refused ----------------
def int8_backend(backend: str, calib: Optional[str], notes: List[str]) -> str:
    """int8 runs as an ONNX graph in onnxruntime: ``auto`` becomes ``onnx`` (noted), ``torch`` is
    refused; calibration data must be given. Checked before any export."""
    if backend == "torch":
        raise Int8Error("--precision int8 runs only on the ONNX backend (int8 graphs run in onnxruntime; the "
                        "pure-torch runtime is fp32/fp16): use --backend onnx or auto, or drop --precision int8")
    check_calib_data(calib)
    if backend == "auto":
        notes.append("--precision int8: backend onnx (int8 graphs run in onnxruntime; solution.py asks for it "
                     "with '# pip install onnxruntime')")
    return "onnx"


def check_allow_int8(precision: str, backend: str, time_budget: Optional[float], calib: Optional[str]) -> None:
    """``--allow-int8`` is a permission for ``--time-budget``; refuse combinations it cannot serve."""
    if time_budget is None:
        raise Int8Error("--allow-int8 lets --time-budget switch to int8; give --time-budget SECONDS, or build int8 "
                        "outright with --precision int8")
    if precision == "fp16":
        raise Int8Error("--allow-int8 goes with --precision auto or fp32 (got fp16)")
    if backend == "torch":
        raise Int8Error("--allow-int8 needs the ONNX backend (int8 graphs run in onnxruntime): use --backend auto "
                        "or onnx")
    check_calib_data(calib)


def int8_agreement(payload: Dict[str, Any], fp32_blobs: Dict[str, Any], calib_used: Dict[str, List[str]],
                   calib: str, tile: np.ndarray, min_agreement: float) -> Dict[str, Any]:
    """Measure int8 vs fp32 class-map agreement of the kept members; refuse below the threshold."""
    names, images = agreement_tiles(payload["members"], calib, tile)
    res = measure_agreement(payload, fp32_blobs, images)
    check_agreement(res, min_agreement, names)
    kept = {e["name"] for e in payload["members"]}
    return {"method": METHOD, "onnxruntime": onnxruntime_version(), "calib_data": os.path.abspath(calib),
            "calibration_tiles": {k: v for k, v in calib_used.items() if k in kept},
            "agreement": res["ensemble"], "member_agreement": res["members"], "agreement_tiles": names,
            "agreement_setting": "no TTA, bias or post-processing", "min_agreement": min_agreement}


def consider_int8(payload: Dict[str, Any], tile: np.ndarray, device: str, time_budget: float, calib: str,
                  min_agreement: float, parity_report: Dict[str, Any], notes: List[str]):
    """``--allow-int8``: when the requested setting exceeds ``time_budget`` in fp32, quantise the
    kept members and use int8 if it passes the agreement check and is faster. Returns
    (int8 payload, int8 manifest info) or None (fp32 kept; the note says why)."""
    from glacier_submit import timing
    from glacier_submit.export import attach_onnx

    over = {"tta": payload["inference"]["tta"], "scales": payload["inference"]["scales"]}
    t32 = timing.time_predictor(payload, tile, device, over)["tile_s"]
    if t32 <= time_budget:
        notes.append(f"--allow-int8: fp32 fits the time budget ({t32:.2f} s <= {time_budget:.2f} s per tile): "
                     "kept fp32")
        return None
    members = [dict(e) for e in payload["members"]]
    for e in members:
        if e.get("onnx") is None:
            attach_onnx(e, parity_report)
    used, blobs = quantize_entries(members, calib)
    p8 = dict(payload, members=members)
    head = f"--allow-int8: fp32 takes {t32:.2f} s per tile > the {time_budget:.2f} s budget"
    try:
        info = int8_agreement(p8, blobs, used, calib, tile, min_agreement)
    except Int8Error as exc:
        notes.append(f"{head}; int8 not used ({exc})")
        return None
    t8 = timing.time_predictor(p8, tile, device, over)["tile_s"]
    if t8 >= t32:
        notes.append(f"{head}; int8 not used: it takes {t8:.2f} s, no faster on this device")
        return None
    info.update(fp32_tile_s=round(t32, 3), int8_tile_s=round(t8, 3), chosen_by="--time-budget with --allow-int8")
    notes.append(f"{head}; int8 takes {t8:.2f} s with {100 * info['agreement']:.3f} % pixel agreement "
                 f"(>= {min_agreement:g} %): built in int8, backend onnx (needs onnxruntime where it runs)")
    return p8, info
