"""manifest.json's schema: from_dict/to_dict round trips of a built manifest and of one written
out here, manifests missing fields read with the defaults, the bias record without its None
fields, and the build's printed summary from a Manifest or its dict."""
import copy
import json
import os

import pytest

from glacier_submit.manifest import (BiasInfo, Manifest, MemberRecord, Runtime, Selection, Timing,
                                     render_manifest)
from glacier_submit.selection import MB_UNIT

MEMBER = {"name": "fold0_seed1", "fold": 0, "seed": 1, "arch": "Unet", "encoder": "resnet18", "val_mcc": 0.61,
          "weight": 0.61, "train_tiles": ["00_00", "00_01"], "val_tiles": ["01_00"], "sha": "ab12cd34ef56ab78",
          "source": "/runs/w/fold0_seed1.pt", "train_sha256": ["a" * 64, "b" * 64]}

BUILT = {
    "tool": "glacier-submit", "tool_version": "0.1.0", "built": "2026-12-01 10:00",
    "members": [MEMBER, dict(MEMBER, name="fold1_seed0", fold=1, seed=0, val_mcc=None, weight=1.0,
                             source="/runs/w/fold1_seed0.pt")],
    "selection": {"rule": "strongest first", "max_members": None, "folds": [0, 1], "folds_missing": [],
                  "table": [{"name": "fold0_seed1", "fold": 0, "seed": 1, "val_mcc": 0.61, "bytes": 2 * 2 ** 20,
                             "kept": True, "reason": "strongest of fold 0"},
                            {"name": "fold1_seed0", "fold": 1, "seed": 0, "val_mcc": None, "bytes": 2 * 2 ** 20,
                             "kept": True, "reason": "strongest of fold 1"}]},
    "tta": ["identity", "hflip", "vflip"], "scales": [1.0], "merge": "weighted", "weights": [0.61, 1.0],
    "bias": {"mode": "tuned on OOF (12 tiles)", "values": [0.0, 0.25, 0.0, 0.5], "oof_tiles": 12,
             "oof_mcc_before": 0.5, "oof_mcc_after": 0.55},
    "tuned_on_tiles": {"bias": ["01_00", "00_00"]}, "tuned_on_sha256": {"bias": ["c" * 64, "d" * 64]},
    "postprocess": [{"rule": "min_area", "class": 3, "min_area": 12}], "postprocess_preset": "light",
    "crf": None, "adapt": None, "tuning": None,
    "normalisation": {"fold0_seed1": {"mean": [0.1] * 5}}, "class_map": {"names": ["a", "b"], "values": [0, 255]},
    "bands": ["B2", "B3", "B4", "B6", "B10"],
    "runtime": {"backend": "torch", "precision": "fp16", "fp16_agreement": 0.999, "int8": None, "onnx_parity": {},
                "single_file": False, "built_with": {"python": "3.11", "torch": "2.4"}},
    "budget": {"max_mb": 300.0, "time_budget_s": None},
    "timing": {"device": "cpu", "machine": "test", "check_tile": [5, 512, 512], "load_s": 0.5, "tile_s": 1.25,
               "forward_views": 6, "test_tiles": 100, "estimated_total_s": 125.5},
    "files": {"solution.py": {"bytes": 2 ** 20, "sha256": "0" * 64}, "model.pth": {"bytes": 3 * 2 ** 20, "sha256": "1" * 64}},
    "notes": ["fp32 weights of 2 members are 8.0 MB > 4.0 MB left for model.pth: stored in fp16"],
}


def test_round_trip_of_a_manifest_written_out_here():
    d = copy.deepcopy(BUILT)
    m = Manifest.from_dict(d)
    assert isinstance(m.members[0], MemberRecord) and m.members[1].val_mcc is None
    assert isinstance(m.selection, Selection) and isinstance(m.runtime, Runtime) and isinstance(m.timing, Timing)
    assert m.bias == BiasInfo("tuned on OOF (12 tiles)", [0.0, 0.25, 0.0, 0.5], 12, 0.5, 0.55)
    assert m.to_dict() == BUILT
    assert json.loads(json.dumps(m.to_dict())) == BUILT
    assert m.class_values == [0, 255] and m.member_folders() == ["/runs/w"]


def test_round_trip_of_a_built_manifest(bundle):
    out, _ = bundle
    with open(os.path.join(out, "manifest.json")) as fh:
        d = json.load(fh)
    assert Manifest.from_dict(d).to_dict() == d
    assert Manifest.load(out).to_dict() == d


def test_missing_fields_take_their_defaults():
    assert Manifest.from_dict({}) == Manifest()
    m = Manifest.from_dict({"members": [{"name": "old"}], "bias": {"mode": "given"}, "timing": {"tile_s": 2.0},
                            "some_future_field": 1})
    assert m.members == [MemberRecord("old", None, None, None, None, None, None)]
    assert m.members[0].train_tiles == [] and m.bias == BiasInfo(mode="given")
    assert m.timing == Timing(tile_s=2.0) and m.runtime == Runtime() and m.tta == ["identity"]
    assert m.class_values == [] and m.member_folders() == []


def test_bias_drops_none_fields():
    assert BiasInfo().to_dict() == {"mode": "none"}
    assert BiasInfo(mode="given", values=[0.0, 0.1], oof_mcc_after=None).to_dict() == {"mode": "given", "values": [0.0, 0.1]}
    assert "bias" in Manifest().to_dict() and Manifest().to_dict()["bias"] == {"mode": "none"}


def test_render_manifest_from_a_dict():
    text = render_manifest(copy.deepcopy(BUILT))
    assert text == render_manifest(Manifest.from_dict(copy.deepcopy(BUILT)))
    lines = text.splitlines()
    assert lines[0] == "members: kept 2 of 2 (folds [0, 1], all represented)"
    assert f"{'fold0_seed1':<16} {0:>4} {1:>4} {'Unet/resnet18':<16} {0.61:>8.4f} {0.61:>7.3f}" in lines
    assert f"{'fold1_seed0':<16} {1:>4} {0:>4} {'Unet/resnet18':<16} {'nan':>8} {1.0:>7.3f}" in lines
    assert ("TTA 3 views (identity, hflip, vflip) x scales [1.0], merge weighted, post-processing light (1 rules)"
            in lines)
    assert "bias: tuned on OOF (12 tiles) [0.0, 0.25, 0.0, 0.5] (OOF MCC 0.5000 -> 0.5500)" in lines
    assert "backend torch, weights fp16 (fp16 vs fp32 class agreement 99.900 %)" in lines
    assert f"size 4.2 of 300 {MB_UNIT}" in lines  # 1 MiB + 3 MiB of files = 4.19e6 bytes
    assert "time on cpu (test): load 0.50 s, 1.25 s per 512x512 tile -> ~126 s for 100 tiles" in lines
    assert lines[-1] == "note: " + BUILT["notes"][0]


def test_load_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="glacier-submit build"):
        Manifest.load(str(tmp_path))


def test_render_manifest_of_an_incomplete_manifest():
    """An older or hand-made manifest missing fields still renders (a dash where a value is missing)."""
    from glacier_submit.manifest import render_manifest

    text = render_manifest({"members": [{"name": "m0"}], "timing": {"check_tile": []}})
    assert "m0" in text and "   -    - ?/?" in text and "per check tile" in text
