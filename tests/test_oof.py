"""Out-of-fold scoring: the masked-pixel rule is applied once, when validation saves the
probabilities, and never again on the saved (already masked) arrays."""

import numpy as np
from sklearn.metrics import matthews_corrcoef

from glacier_runtime.normalize import masked_pixels
from glacier_runtime.predictor import Predictor
from training.runs.summary import oof_score


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


def test_saved_probabilities_carry_the_masked_rule():
    """What validation saves decides as the runtime does: argmax of the saved array equals
    Predictor.decide (bias 0, no post-processing), masked pixels included."""
    rng = np.random.default_rng(1)
    image = rng.random((5, 16, 16)).astype(np.float32) + 0.1
    image[:, :4] = 0.0  # a masked scene edge
    probs = rng.random((4, 16, 16)).astype(np.float32)
    probs[1, :4] += 5.0  # the model says glacier on the masked edge
    probs /= probs.sum(0, keepdims=True)

    class _Stub:
        n_classes = 4
        runner = None

    pred = Predictor([_Stub()])
    masked = pred.masked(image)
    assert masked is not None and np.array_equal(masked, masked_pixels(image))
    saved = pred.masked_to_background(probs, masked).astype(np.float16)
    assert np.array_equal(saved.astype(np.float32).argmax(0), pred.decide(probs, masked))
    assert (saved.argmax(0)[:4] == 0).all() and np.allclose(saved[:, 4:], probs[:, 4:], atol=1e-3)
    assert pred.masked_to_background(probs, None) is probs
