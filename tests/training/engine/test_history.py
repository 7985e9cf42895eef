"""The per-epoch CSV log, read back with the csv module: one column per scalar key in order of
first appearance, list and dict values skipped, missing cells empty, nothing for no history."""
import csv
import os

from training.engine.history import write_csv


def test_write_csv_read_back(tmp_path):
    path = str(tmp_path / "logs" / "fold0_seed0.csv")
    history = [{"epoch": 0, "lr": 0.002, "loss_total": 1.25, "per_class": [{"class": "lake", "mcc": 0.1}],
                "timing": {"train_s": 3.0}, "val_mcc": 0.5},
               {"epoch": 1, "lr": 0.0015, "loss_total": 0.75, "val_mcc": 0.625, "bad_steps": 2}]
    write_csv(path, history)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["epoch", "lr", "loss_total", "val_mcc", "bad_steps"]
    assert rows == [{"epoch": "0", "lr": "0.002", "loss_total": "1.25", "val_mcc": "0.5", "bad_steps": ""},
                    {"epoch": "1", "lr": "0.0015", "loss_total": "0.75", "val_mcc": "0.625", "bad_steps": "2"}]
    assert os.listdir(tmp_path / "logs") == ["fold0_seed0.csv"]  # written atomically: no temporary file left


def test_rewritten_each_epoch_and_nothing_for_no_history(tmp_path):
    path = str(tmp_path / "h.csv")
    write_csv(path, [])
    assert not os.path.exists(path)
    write_csv(path, [{"epoch": 0}])
    write_csv(path, [{"epoch": 0}, {"epoch": 1}])
    with open(path, newline="") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["0", "1"]
