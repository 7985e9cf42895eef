"""What a bundle costs on the clock: the time budget drops TTA and scales in the documented order,
then members; the check tile needs no synthetic generator."""
import os
import sys

import numpy as np
import torch

from glacier_runtime.predictor import Predictor, load_payload
from glacier_runtime.tiles import list_tiles, read_tile
from glacier_submit.bundle import build
from glacier_submit.timing import candidate_settings, check_tile

from tests.helpers import SMALL, write_test_folder


def _views_timer(per_view_s, tried):
    """A stand-in for timing.time_predictor: ``per_view_s`` per forward view, counted by the
    real Predictor for the settings asked (no tile is run)."""
    def timer(payload, tile, device="cpu", overrides=None, repeats=1):
        views = Predictor.from_payload(payload, overrides=overrides).n_forward_views
        tried.append((overrides["tta"], list(overrides["scales"]), views))
        return {"load_s": 0.0, "tile_s": per_view_s * views, "views": views}
    return timer


def test_time_budget_drops_tta_in_order(tiny_members, tmp_path, monkeypatch):
    """No setting fits: every cheaper setting is tried in the documented order, the cheapest kept,
    then the weakest member goes (one forward view left) and the note says even that is too slow."""
    import glacier_submit.timing as timing_mod

    assert [c[0] for c in candidate_settings("d4", [0.75, 1.0])] == ["d4", "d4", "flips", "none"]
    tried = []
    monkeypatch.setattr(timing_mod, "time_predictor", _views_timer(1.0, tried))
    m = build(tiny_members, str(tmp_path / "tb"), tta="d4", scales=[0.75, 1.0], time_budget=0.5, bias="none")
    assert [t[:2] for t in tried] == [("d4", [0.75, 1.0]), ("d4", [1.0]), ("flips", [1.0]), ("none", [1.0]),
                                      ("none", [1.0])]
    assert [t[2] for t in tried] == [32, 16, 6, 2, 1]
    assert m["tta"] == ["identity"] and m["scales"] == [1.0]
    assert sum(r["kept"] for r in m["selection"]["table"]) == 1
    assert any("reduced" in n for n in m["notes"]) and any("cheapest" in n for n in m["notes"])


def test_time_budget_stops_at_the_first_setting_that_fits(tiny_members, tmp_path, monkeypatch):
    """A patched timer (0.1 s per forward view) and a 1 s budget: d4 x 2 scales (32 views)
    and d4 (16) are too slow, flips (6 views for 2 members) fits, so 'none' is never tried."""
    import glacier_submit.timing as timing_mod

    tried = []
    monkeypatch.setattr(timing_mod, "time_predictor", _views_timer(0.1, tried))
    m = build(tiny_members, str(tmp_path / "tb"), tta="d4", scales=[0.75, 1.0], time_budget=1.0, bias="none")
    assert tried == [("d4", [0.75, 1.0], 32), ("d4", [1.0], 16), ("flips", [1.0], 6)]
    assert m["tta"] == ["identity", "hflip", "vflip"] and m["scales"] == [1.0]
    assert any("reduced to 'flips'" in n for n in m["notes"]) and not any("cheapest" in n for n in m["notes"])
    assert load_payload(str(tmp_path / "tb" / "model.pth"))["inference"]["tta"] == "flips"


def test_check_tile_needs_no_synthetic_generator(tiny_members, tmp_path, monkeypatch):
    from glacier_submit.timing import check_tile

    monkeypatch.setitem(sys.modules, "training.data.synth", None)  # importing it now fails
    stats = torch.load(tiny_members[0], weights_only=False)["stats"]
    a = check_tile(stats)
    b = check_tile(stats)
    assert a.shape == (5, 512, 512) and a.dtype == np.float32 and np.array_equal(a, b)
    lo, hi = np.array(stats["lo"]), np.array(stats["hi"])
    assert (a.min(axis=(1, 2)) >= lo - 1e-4).all() and (a.max(axis=(1, 2)) <= hi + 1e-4).all()
    # per band, the tile spreads over the normalised range the members trained on
    z = (a - np.array(stats["mean"])[:, None, None]) / np.array(stats["std"])[:, None, None]
    assert (z.std(axis=(1, 2)) > 0.3).all()
    m = build(tiny_members, str(tmp_path / "b"), check_size=SMALL)
    assert m["timing"]["check_tile"] == [5, 64, 64]


def test_candidate_settings_in_the_documented_drop_order():
    assert candidate_settings("d4", [0.75, 1.0]) == [("d4", [0.75, 1.0]), ("d4", [1.0]), ("flips", [1.0]), ("none", [1.0])]
    assert candidate_settings("d4", [1.0]) == [("d4", [1.0]), ("flips", [1.0]), ("none", [1.0])]
    assert candidate_settings("flips", [0.5, 1.0]) == [("flips", [0.5, 1.0]), ("flips", [1.0]), ("none", [1.0])]
    assert candidate_settings("none", [1.0]) == [("none", [1.0])]
    assert candidate_settings(["identity", "rot90"], [1.0]) == [(["identity", "rot90"], [1.0]), ("none", [1.0])]


def test_check_tile_from_data_is_its_first_complete_tile(tmp_path):
    root = write_test_folder(str(tmp_path / "d"), n=2, size=(24, 40))
    os.remove(os.path.join(root, "Band3", "img001.tif"))  # img001 lacks a band: img002 is the first complete one
    tiles, _ = list_tiles(root)
    got = check_tile({}, data=root)
    assert got.shape == (5, 24, 40) and np.array_equal(got, read_tile(tiles["img002"]))
