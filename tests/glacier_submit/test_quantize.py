"""``build --precision int8``: static QDQ int8 ONNX members calibrated on their own training
tiles, the agreement with fp32 checked against an independent torch oracle, the refusal below
``--int8-min-agreement``, and the clear errors (no calibration data, torch backend, no
onnxruntime where the bundle runs)."""
import json
import os

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from glacier_submit.bundle import build  # noqa: E402
from glacier_submit.quantize import Int8Error  # noqa: E402
from glacier_runtime.predictor import Predictor, load_payload, member_from_entry  # noqa: E402
from glacier_runtime.tiles import list_tiles, read_tile  # noqa: E402
from tests.helpers import fingerprints, make_member  # noqa: E402


@pytest.fixture(scope="module")
def calib_members(synth_data, tmp_path_factory):
    """Two members whose training tiles are tiles of the synthetic training folder."""
    keys = sorted(list_tiles(os.path.join(synth_data, "train"))[0])
    d = tmp_path_factory.mktemp("int8w")
    sha = fingerprints(os.path.join(synth_data, "train"))
    return [make_member(str(d / "fold0_seed0.pt"), seed=0, fold=0, train_tiles=keys[:6], val_tiles=keys[6:], tile_sha256=sha),
            make_member(str(d / "fold1_seed0.pt"), seed=1, fold=1, train_tiles=keys[3:], val_tiles=keys[:3], tile_sha256=sha)]


@pytest.fixture(scope="module")
def int8_bundle(calib_members, synth_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("int8b") / "b")
    m = build(calib_members, out, precision="int8", calib_data=os.path.join(synth_data, "train"),
              int8_min_agreement=50.0, bias="none", check_size=(64, 64))
    return out, m


_MODELS = {}


def _smp(path):
    from training.engine.checkpoint import load_checkpoint
    from training.models import create_model

    if path not in _MODELS:
        ck = load_checkpoint(path)
        model = create_model(ck["spec"])
        model.load_state_dict(ck["state_dict"])
        _MODELS[path] = (model.eval(), ck["stats"])
    return _MODELS[path]


def _oracle_fp32(members, img):
    """Independent fp32 reference: each member's smp twin in torch, normalised by hand, softmax
    averaged, argmax; pixels 0 in every band -> background."""
    probs = 0
    for path in members:
        model, s = _smp(path)
        x = np.nan_to_num(img.astype(np.float32))
        for b in range(x.shape[0]):
            x[b] = (np.clip(x[b], s["lo"][b], s["hi"][b]) - s["mean"][b]) / s["std"][b]
        with torch.no_grad():
            probs = probs + torch.softmax(model(torch.from_numpy(x)[None]), 1)[0].numpy()
    ids = probs.argmax(0)
    ids[np.all(img == 0, axis=0)] = 0
    return ids


def _int8_graph_ids(payload, img):
    """The bundle's int8 graphs run straight in onnxruntime (not through the predictor)."""
    probs = 0
    for e in payload["members"]:
        s = e["stats"]
        x = np.nan_to_num(img.astype(np.float32))
        for b in range(x.shape[0]):
            x[b] = (np.clip(x[b], s["lo"][b], s["hi"][b]) - s["mean"][b]) / s["std"][b]
        key = id(e["onnx"])
        if key not in _MODELS:
            _MODELS[key] = ort.InferenceSession(e["onnx"].numpy().tobytes(), providers=["CPUExecutionProvider"])
        sess = _MODELS[key]
        logits = torch.from_numpy(sess.run(None, {"image": x[None]})[0])
        probs = probs + torch.softmax(logits, 1)[0].numpy()
    ids = probs.argmax(0)
    ids[np.all(img == 0, axis=0)] = 0
    return ids


def test_int8_bundle_manifest_and_graphs(int8_bundle, calib_members):
    out, m = int8_bundle
    man = json.load(open(os.path.join(out, "manifest.json")))
    r = man["runtime"]
    assert r["backend"] == "onnx" and r["precision"] == "int8"
    assert any("--precision int8: backend onnx" in n for n in man["notes"])
    info = r["int8"]
    assert info["min_agreement"] == 50.0 and 0.5 <= info["agreement"] <= 1.0
    for e in man["members"]:  # calibrated on its own training tiles only
        cal = info["calibration_tiles"][e["name"]]
        assert cal and set(cal) <= set(e["train_tiles"])
    assert info["agreement_tiles"][-1] == "check tile" and len(info["agreement_tiles"]) > 1
    src = open(os.path.join(out, "solution.py")).read().splitlines()[:15]
    assert any(line.startswith("# pip install onnxruntime") for line in src)
    payload = load_payload(os.path.join(out, "model.pth"))
    for e in payload["members"]:
        assert e["state_dict"] == {} and e["precision"] == "int8"
        g = onnx.load_from_string(e["onnx"].numpy().tobytes())
        ops = {n.op_type for n in g.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        int8_weights = [t for t in g.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        assert int8_weights and any(len(t.dims) == 4 and t.dims[0] > 1 for t in int8_weights)
    # the upload holds int8 graphs: well under the fp32 checkpoints' size
    fp32_bytes = sum(os.path.getsize(p) for p in calib_members)
    assert man["files"]["model.pth"]["bytes"] < 0.5 * fp32_bytes


def test_reported_agreement_matches_independent_oracle(int8_bundle, calib_members, synth_data):
    """The manifest's agreement equals int8-graphs-in-onnxruntime vs the torch fp32 oracle on
    the same tiles (the validation tiles; the check tile is excluded here, so within a margin)."""
    out, m = int8_bundle
    info = m["runtime"]["int8"]
    tiles, _ = list_tiles(os.path.join(synth_data, "train"))
    payload = load_payload(os.path.join(out, "model.pth"))
    same = total = 0
    for k in info["agreement_tiles"][:-1]:
        img = read_tile(tiles[k])
        a, b = _oracle_fp32(calib_members, img), _int8_graph_ids(payload, img)
        same, total = same + int((a == b).sum()), total + a.size
    check_px = 64 * 64  # the check tile's share of the manifest's figure
    lo = same / (total + check_px)
    hi = (same + check_px) / (total + check_px)
    assert lo - 1e-3 <= info["agreement"] <= hi + 1e-3


def test_int8_solution_runs_and_agrees_with_fp32(int8_bundle, calib_members, synth_data, tmp_path):
    """solution.py (platform sandbox, imagepath convention) on unseen tiles: the masks are the
    int8 graphs' class maps and agree with the fp32 oracle as often as the manifest says."""
    from glacier_submit.sandbox import run_bundle

    out, m = int8_bundle
    unseen = os.path.join(synth_data, "unseen")
    res = run_bundle(out, unseen, "imagepath", str(tmp_path / "masks"), timeout=300)
    assert res.ok, res.tail()
    payload = load_payload(os.path.join(out, "model.pth"))
    values = np.array([0, 85, 170, 255], np.uint8)
    tiles, _ = list_tiles(unseen)
    same = total = 0
    for tid, mask in res.masks.items():
        key = next(k for k in tiles if k.endswith(tid))
        img = read_tile(tiles[key])
        assert np.array_equal(mask, values[_int8_graph_ids(payload, img)]), tid
        ref = values[_oracle_fp32(calib_members, img)]
        same, total = same + int((mask == ref).sum()), total + mask.size
    # random-weight members leave many pixels near a class boundary: the agreement on unseen
    # tiles is what the build measured on its validation tiles, within a margin (not a fixed bar)
    assert len(res.masks) == 4 and abs(same / total - m["runtime"]["int8"]["agreement"]) < 0.1


def test_refused_below_threshold_names_value_and_fix(calib_members, synth_data, int8_bundle, tmp_path):
    _, m = int8_bundle
    assert m["runtime"]["int8"]["agreement"] < 1.0  # random-weight members: int8 changes some pixels
    out = str(tmp_path / "refused")
    with pytest.raises(Int8Error) as exc:
        build(calib_members[:1], out, precision="int8", calib_data=os.path.join(synth_data, "train"),
              int8_min_agreement=100.0, bias="none", check_size=(64, 64))
    msg = str(exc.value)
    assert "int8 refused" in msg and "--int8-min-agreement 100 %" in msg and "fp32" in msg
    assert "fold0_seed0" in msg and not os.path.exists(os.path.join(out, "solution.py"))


def test_missing_or_foreign_calibration_data(calib_members, tmp_path):
    with pytest.raises(Int8Error, match="--calib-data DIR"):
        build(calib_members, str(tmp_path / "a"), precision="int8", check_size=(64, 64))
    from tests.helpers import make_tile

    other = str(tmp_path / "other")
    make_tile(other, "09_09", h=32, w=32)
    with pytest.raises(Int8Error, match="holds none of member fold0_seed0's training tiles"):
        build(calib_members, str(tmp_path / "b"), precision="int8", calib_data=other, check_size=(64, 64))


def test_int8_with_torch_backend_refused(calib_members, synth_data, tmp_path):
    with pytest.raises(Int8Error, match="only on the ONNX backend"):
        build(calib_members, str(tmp_path / "t"), precision="int8", backend="torch",
              calib_data=os.path.join(synth_data, "train"))


def test_cli_names_calib_data(calib_members, tmp_path):
    from click.testing import CliRunner

    from glacier_submit.cli import cli

    r = CliRunner().invoke(cli, ["build", "--models", calib_members[0], "--out", str(tmp_path / "c"),
                                 "--precision", "int8"])
    assert r.exit_code != 0 and "--calib-data DIR" in r.output


def test_graph_only_member_without_onnxruntime_says_what_to_do(int8_bundle, monkeypatch):
    """Where onnxruntime is missing (the Python 3.9 platform image without the pip line), an
    int8 member cannot fall back to torch: the error says so and names the fix."""
    import glacier_runtime.predictor as pr

    out, _ = int8_bundle
    entry = load_payload(os.path.join(out, "model.pth"))["members"][0]
    monkeypatch.setattr(pr, "onnxruntime_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install onnxruntime.*--precision fp32"):
        member_from_entry(entry, "cpu", "auto")
    with pytest.raises(RuntimeError, match="onnx or auto backend"):
        member_from_entry(entry, "cpu", "torch")
    assert Predictor.from_payload({"members": [entry]}, device="cpu", backend="onnx").n_forward_views == 1


def _precision_timer(per_view_s, int8_factor, tried):
    """A stand-in for timing.time_predictor: ``per_view_s`` per forward view (counted by the real
    Predictor), times ``int8_factor`` when the payload's members are int8 graphs."""
    def timer(payload, tile, device="cpu", overrides=None, repeats=1):
        views = Predictor.from_payload(payload, overrides=overrides).n_forward_views
        is8 = all(e.get("precision") == "int8" for e in payload["members"])
        tried.append((overrides["tta"], views, "int8" if is8 else "fp32"))
        return {"load_s": 0.0, "tile_s": per_view_s * views * (int8_factor if is8 else 1.0), "views": views}
    return timer


def test_time_budget_uses_int8_only_when_allowed(calib_members, synth_data, tmp_path, monkeypatch):
    """flips x 2 members = 6 views at 0.1 s: 0.6 s > the 0.5 s budget in fp32, 0.18 s in int8.
    Without --allow-int8 the TTA is cut; with it the build switches to int8 and keeps flips."""
    import glacier_submit.timing as timing_mod

    calib = os.path.join(synth_data, "train")
    tried = []
    monkeypatch.setattr(timing_mod, "time_predictor", _precision_timer(0.1, 0.3, tried))
    m = build(calib_members, str(tmp_path / "no"), tta="flips", time_budget=0.5, bias="none", check_size=(64, 64))
    assert m["runtime"]["precision"] == "fp32" and m["tta"] == ["identity"]
    assert all(t[2] == "fp32" for t in tried)
    tried.clear()
    m = build(calib_members, str(tmp_path / "yes"), tta="flips", time_budget=0.5, bias="none", check_size=(64, 64),
              allow_int8=True, calib_data=calib, int8_min_agreement=50.0)
    assert m["runtime"]["precision"] == "int8" and m["runtime"]["backend"] == "onnx"
    assert m["tta"] == ["identity", "hflip", "vflip"] and len(m["members"]) == 2
    assert m["runtime"]["int8"]["fp32_tile_s"] == 0.6 and m["runtime"]["int8"]["int8_tile_s"] == 0.18
    assert any("--allow-int8: fp32 takes 0.60 s" in n and "built in int8" in n for n in m["notes"])
    assert tried[:2] == [("flips", 6, "fp32"), ("flips", 6, "int8")]
    src = open(tmp_path / "yes" / "solution.py").read().splitlines()[:15]
    assert any(line.startswith("# pip install onnxruntime") for line in src)
    assert all(e["state_dict"] == {} for e in load_payload(str(tmp_path / "yes" / "model.pth"))["members"])


@pytest.mark.slow
def test_time_budget_int8_below_agreement_keeps_fp32(calib_members, synth_data, tmp_path, monkeypatch):
    import glacier_submit.timing as timing_mod

    monkeypatch.setattr(timing_mod, "time_predictor", _precision_timer(0.1, 0.3, []))
    m = build(calib_members[:1], str(tmp_path / "r"), tta="flips", time_budget=0.2, bias="none", check_size=(64, 64),
              allow_int8=True, calib_data=os.path.join(synth_data, "train"), int8_min_agreement=100.0)
    assert m["runtime"]["precision"] == "fp32" and m["tta"] == ["identity"]
    assert any("int8 not used" in n and "int8 refused" in n for n in m["notes"])


def test_allow_int8_needs_a_time_budget(calib_members, synth_data, tmp_path):
    with pytest.raises(Int8Error, match="give --time-budget"):
        build(calib_members, str(tmp_path / "x"), allow_int8=True, calib_data=os.path.join(synth_data, "train"))
    with pytest.raises(Int8Error, match="--calib-data DIR"):
        build(calib_members, str(tmp_path / "x"), allow_int8=True, time_budget=1.0)
