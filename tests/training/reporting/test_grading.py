"""Grades against the targets table: boundaries, missing values, convergence, bad targets files."""
import numpy as np
import pytest

from training.metrics import confusion, per_class_scores
from training.reporting.grading import TargetsError, class_facts, grade, load_targets, render_grade, smooth_convergence


def _cv(mean, best, lake_recall, min_recall):
    return {"mean_fold_mcc": mean, "best_fold_mcc": best, "lake_recall": lake_recall, "min_class_recall": min_recall}


@pytest.mark.parametrize("facts,expected", [
    (_cv(0.79, 0.90, 0.9, 0.9), "below pass"),        # mean misses pass: nothing above counts
    (_cv(0.80, 0.82, 0.51, 0.9), "pass"),             # pass boundaries are inclusive / strict as written
    (_cv(0.80, 0.82, 0.50, 0.9), "below pass"),       # lake recall must be > 0.50
    (_cv(0.83, 0.86, 0.61, 0.5), "good"),             # excellent needs min recall > 0.70
    (_cv(0.85, 0.88, 0.61, 0.71), "excellent"),
    (_cv(0.86, 0.84, 0.9, 0.9), "pass"),              # best fold below good's 0.85 caps the grade
])
def test_cv_grades(facts, expected):
    assert grade("cv", facts)["grade"] == expected


def test_missing_value_is_na_and_does_not_block():
    g = grade("cv", _cv(0.83, 0.86, float("nan"), 0.9))
    lake = [c for c in g["criteria"] if c["name"] == "lake_recall"]
    assert all(c["met"] is None for c in lake)
    assert g["grade"] == "good"  # mean 0.83 < excellent's 0.85; the missing lake value blocks nothing
    assert "n/a" in render_grade(g)


def test_class_facts_ignore_absent_classes_and_lake_na():
    rows = per_class_scores(confusion(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 2]), 4),
                            ["background", "glacier", "debris", "lake"])
    f = class_facts(rows)
    assert np.isnan(f["lake_recall"]) and np.isnan(f["lake_iou"])
    assert f["min_class_recall"] == pytest.approx(0.5)
    assert f["mean_iou"] == pytest.approx(np.mean([0.5, 2 / 3, 1.0]))


def test_smooth_convergence():
    assert smooth_convergence([1.0, 0.8, 0.85, 0.6]) is True       # rise 0.05 <= 0.1
    assert smooth_convergence([1.0, 0.5, 0.7]) is False            # rise 0.2 > 0.1
    assert smooth_convergence([1.0, float("nan")]) is False
    assert smooth_convergence([1.0]) is None


def test_targets_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("cv:\n  pass:\n    mean_fold_mcc: about 0.8\n")
    with pytest.raises(TargetsError, match=r"t\.yaml.*cv\.pass\.mean_fold_mcc"):
        load_targets(str(bad))
    bad.write_text("cv:\n  great:\n    x: '> 1'\n")
    with pytest.raises(TargetsError, match="not a level"):
        load_targets(str(bad))
    assert set(load_targets()) == {"pretrain", "cv", "evaluate"}
