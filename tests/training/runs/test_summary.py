"""Out-of-fold scoring of a CV run: the masked-pixel rule is applied once, when validation saves
the probabilities, and never again on the saved (already masked) arrays; the summary printed
at the end of the run."""
import numpy as np
from sklearn.metrics import matthews_corrcoef

from training.runs.summary import oof_score, render_summary


class _LabelsOnly:
    """A dataset that has labels but refuses to decode images: OOF scoring must not need them."""

    class_names = ("background", "glacier", "debris", "lake")

    def __init__(self, labels):
        self.labels = labels

    def label(self, key):
        return self.labels[key]

    def image(self, key):
        raise AssertionError(f"oof_score decoded the image of {key}: the saved probabilities are already masked")


def test_oof_score_uses_saved_probabilities_only(tmp_path):
    rng = np.random.default_rng(0)
    keys = ["00_00", "00_01", "01_00"]
    labels = {k: rng.integers(0, 4, (12, 10)).astype(np.uint8) for k in keys}
    folds = {"folds": [{"fold": 0, "val": keys[:2], "train": keys[2:]}, {"fold": 1, "val": keys[2:], "train": keys[:2]}]}
    saved = {}
    for f in folds["folds"]:
        for s in (0, 1):
            d = tmp_path / "oof" / f"fold{f['fold']}_seed{s}"
            d.mkdir(parents=True)
            for k in f["val"]:
                p = rng.random((4, 12, 10)).astype(np.float32)
                p /= p.sum(0, keepdims=True)
                np.save(d / f"{k}.npy", p.astype(np.float16))
                saved.setdefault(k, []).append(p.astype(np.float16).astype(np.float32))
    got = oof_score(str(tmp_path), folds, _LabelsOnly(labels), seeds=[0, 1])
    y = np.concatenate([labels[k].ravel() for k in keys])
    pred = np.concatenate([np.mean(saved[k], 0).argmax(0).ravel() for k in keys])
    assert abs(got - matthews_corrcoef(y, pred)) < 1e-9


def test_summary_lists_members_warnings_and_failures():
    summary = {"class_names": ["background", "glacier"],
               "members": [{"fold": 0, "seed": 1, "val_mcc": 0.5, "best_epoch": 3, "seconds": 12.4,
                            "per_class": [{"class": "background", "mcc": 0.7}],
                            "class_warnings": ["class glacier is not being learned"]}],
               "mean_val_mcc": 0.5, "std_val_mcc": 0.0, "oof_mcc": 0.45, "grade": {"grade": "pass"},
               "failed": [{"fold": 1, "seed": 0, "kind": "diverged", "message": "training diverged at epoch 2"}]}
    lines = render_summary(summary).splitlines()
    assert lines[0] == "fold seed  val MCC  epoch  time s  backgroun   glacier"  # class names cut to 9 characters
    assert lines[1] == "-" * len(lines[0])
    assert lines[2] == "   0    1   0.5000      3      12      0.700       nan"
    assert lines[3:] == ["mean val MCC 0.5000 +- 0.0000", "out-of-fold MCC over all training tiles 0.4500",
                         "grade against the targets: pass (details: training_log.txt)",
                         "classes reported not learned during training:", "  class glacier is not being learned",
                         "FAILED members (1): no member file written",
                         "  fold 1 seed 0 (diverged): training diverged at epoch 2"]
    quiet = dict(summary, oof_mcc=None, failed=[], grade=None, members=[dict(summary["members"][0], class_warnings=[])])
    assert render_summary(quiet).splitlines()[3:] == ["mean val MCC 0.5000 +- 0.0000"]


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_summary_says_whether_a_warned_class_recovered():
    from training.runs.summary import render_summary

    warning = "fold 0 seed 0 epoch 3: class debris is not being learned: validation recall 0.000"
    member = {"fold": 0, "seed": 0, "val_mcc": 0.8, "best_epoch": 19, "seconds": 1.0, "per_class": [],
              "class_warnings": [warning],
              "class_outcomes": [{"class": "debris", "warned_epoch": 3, "recovered": True, "final_recall": 0.81,
                                  "final_mcc": 0.758}]}
    text = render_summary({"class_names": ["background"], "members": [member], "mean_val_mcc": 0.8,
                           "std_val_mcc": 0.0, "oof_mcc": None})
    assert warning in text and "debris: recovered by the end (final validation recall 0.810, one-vs-rest MCC 0.758)" in text
