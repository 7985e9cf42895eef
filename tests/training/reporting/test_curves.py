"""Training curves from the per-epoch CSV logs."""
import csv
import os

import numpy as np
import pytest

from training.reporting.curves import plot_curves, read_histories


def _log(folder, name, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_read_and_plot(tmp_path):
    rows = [{"epoch": e, "lr": 1e-3, "loss_total": 1.0 / (e + 1), "loss_focal": 0.5 / (e + 1), "loss_dice": "nan",
             "val_mcc": 0.5 + 0.1 * e, "val_mcc_lake": 0.1 * e} for e in range(3)]
    _log(tmp_path / "logs", "fold0_seed0", rows)
    _log(tmp_path / "logs", "fold1_seed0", rows[:2])
    h = read_histories(str(tmp_path))
    assert sorted(h) == ["fold0_seed0", "fold1_seed0"] and len(h["fold0_seed0"]) == 3
    assert "loss_dice" not in h["fold0_seed0"][0]          # NaN cells are dropped, not plotted as numbers
    assert h["fold0_seed0"][2]["val_mcc"] == pytest.approx(0.7)
    pytest.importorskip("matplotlib")
    out = plot_curves(h, str(tmp_path / "curves.png"))
    from PIL import Image

    im = np.asarray(Image.open(out))
    assert im.shape[1] > 1000 and im.std() > 0
    assert plot_curves({}, str(tmp_path / "none.png")) is None
