"""Validation with the bundle's predictor: the pooled and per-tile MCC of whole tiles against
sklearn on the argmax of the model's own softmax (masked pixels background), the saved
probabilities (fp16, masked pixels certain background), and the model's mode restored."""
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import matthews_corrcoef

from glacier_runtime.normalize import identity_stats
from training.engine.validation import validate

CFG = SimpleNamespace(train=SimpleNamespace(amp=False), validation=SimpleNamespace(tta="none", window=1024))


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    rng = np.random.default_rng(0)
    images = {k: rng.normal(size=(5, 32, 64)).astype(np.float32) for k in ("a", "b")}
    images["b"][:, :, :6] = 0.0  # a masked scene edge: zero in every band
    labels = {k: rng.integers(0, 4, (32, 64)).astype(np.uint8) for k in images}
    return model, images, labels


def _oracle(model, img):
    """softmax of the model on the tile as is (identity statistics, 32x64 needs no padding)."""
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(img)[None]), 1)[0].numpy()
    masked = (img == 0).all(0)
    ids = p.argmax(0)
    ids[masked] = 0
    return p, ids, masked


def test_mcc_per_tile_and_saved_probabilities_match_sklearn():
    model, images, labels = _setup()
    model.train()
    acc, per_tile, probs = validate(model, images, labels, identity_stats(5), torch.device("cpu"), CFG, 4, keep_probs=True)
    assert model.training  # the mode it came in with
    ys, ps = [], []
    for k, img in images.items():
        p, ids, masked = _oracle(model.eval(), img)
        assert abs(per_tile[k] - matthews_corrcoef(labels[k].ravel(), ids.ravel())) < 1e-9, k
        ys.append(labels[k].ravel())
        ps.append(ids.ravel())
        assert probs[k].dtype == np.float16 and probs[k].shape == (4, 32, 64)
        assert np.abs(probs[k][:, ~masked].astype(np.float32) - p[:, ~masked]).max() < 2e-3
        assert (probs[k][0, masked] == 1).all() and (probs[k][1:, masked] == 0).all()
    assert masked.any()
    assert abs(acc.mcc - matthews_corrcoef(np.concatenate(ys), np.concatenate(ps))) < 1e-9


def test_probabilities_kept_only_when_asked():
    model, images, labels = _setup()
    model.eval()
    acc, per_tile, probs = validate(model, images, labels, identity_stats(5), torch.device("cpu"), CFG, 4)
    assert probs == {} and sorted(per_tile) == ["a", "b"] and not model.training
