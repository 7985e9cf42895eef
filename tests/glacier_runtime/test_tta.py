"""Test-time augmentation: the D4 views and their inverses, and with a real convolutional net
(receptive field > 1) every view inverted, the D4 mean, scales and windowing through the predictor.

A pointwise net is equivariant under every view and blind to window borders by
construction, so it cannot catch a wrong inverse or a misplaced window. This tiny two-level
U-Net (3x3 convolutions, max-pool, upsample, skip) can. The oracles are numpy's own
rotations/flips and cv2's resize, not the runtime's view code."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from glacier_runtime.backends import TorchRunner
from glacier_runtime.normalize import identity_stats
from glacier_runtime.predictor import Member, Predictor
from glacier_runtime.tta import D4, group_views, resolve_views


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 23), w=st.integers(1, 23), name=st.sampled_from(list(D4)))
def test_view_inverse_roundtrip(h, w, name):
    x = torch.randn(2, 3, h, w)
    v = D4[name]
    y = v.forward(x)
    assert tuple(y.shape[-2:]) == v.out_shape(h, w)
    assert torch.equal(v.inverse(y), x)


def test_d4_views_are_distinct_and_group_by_shape():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    outs = {tuple(D4[n].forward(x).flatten().tolist()) for n in D4}
    assert len(outs) == 8
    assert len(group_views(resolve_views("d4"), 3, 4)) == 2
    assert len(group_views(resolve_views("d4"), 4, 4)) == 1
    with pytest.raises(ValueError, match="unknown TTA"):
        resolve_views(["spin"])


class TinyUNet(nn.Module):
    """Two levels: enough context that a pixel's output depends on ~9 px around it."""

    def __init__(self, cin: int = 5, k: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.enc1 = nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, k, 1))
        for p in self.parameters():  # large enough weights that context visibly moves the softmax
            p.data.mul_(3.0)

    def forward(self, x):
        a = self.enc1(x)
        return self.dec(torch.cat([a, self.up(self.enc2(a))], 1))


NET = TinyUNet().eval()


def _predictor(**inference) -> Predictor:
    member = Member(TorchRunner(NET, "cpu", fold_bn=False), identity_stats(5), n_classes=4)
    return Predictor([member], inference)


def _softmax_net(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(NET(torch.from_numpy(np.ascontiguousarray(x))[None]), 1)[0].numpy()


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(5, h, w)).astype(np.float32)


def _receptive_radius() -> int:
    """Measured, not assumed: how far a one-pixel change moves the output."""
    x = _image(64, 64, 1)
    base = _softmax_net(x)
    y = x.copy()
    y[:, 32, 32] += 10.0
    ys, xs = np.nonzero(np.abs(_softmax_net(y) - base).max(0) > 1e-7)
    return int(max(np.abs(ys - 32).max(), np.abs(xs - 32).max()))


# numpy's forward map of each named view (the geometric meaning of the name)
NP_VIEWS = {
    "identity": lambda a: a,
    "rot90": lambda a: np.rot90(a, 1, axes=(1, 2)),
    "rot180": lambda a: np.rot90(a, 2, axes=(1, 2)),
    "rot270": lambda a: np.rot90(a, 3, axes=(1, 2)),
    "hflip": lambda a: a[:, :, ::-1],
    "vflip": lambda a: a[:, ::-1, :],
    "hflip_rot90": lambda a: np.rot90(a[:, :, ::-1], 1, axes=(1, 2)),
    "hflip_rot270": lambda a: np.rot90(a[:, :, ::-1], 3, axes=(1, 2)),
}


def test_net_has_real_context():
    assert 4 <= _receptive_radius() <= 15


@pytest.mark.parametrize("name", list(D4))
def test_every_view_is_inverted(name):
    """P_g(x) = g^-1 f(g x), so g P_g(x) must equal f(g x), for a net that is not equivariant.
    64 x 96: a multiple of the stride, so no padding enters the comparison."""
    x = _image(64, 96)
    g = NP_VIEWS[name]
    got = _predictor(tta=[name]).predict_proba(x)
    assert got.shape == (4, 64, 96)
    assert np.abs(g(got) - _softmax_net(g(x))).max() < 1e-5
    if name != "identity":  # the net really is not equivariant: a wrong inverse would show
        assert np.abs(got - _softmax_net(x)).max() > 1e-2


def test_d4_mean_is_mean_of_inverted_views():
    x = _image(64, 64, 2)
    want = np.mean([_inverse_via_forward(n, x) for n in D4], 0)
    got = _predictor(tta="d4").predict_proba(x)
    assert np.abs(got - want).max() < 1e-5


def _inverse_via_forward(name: str, x: np.ndarray) -> np.ndarray:
    """g^-1 f(g x) with g^-1 found as the numpy view h such that h(g(.)) is the identity."""
    g = NP_VIEWS[name]
    probe = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    inv = next(h for h in NP_VIEWS.values() if h(g(probe)).shape == probe.shape and np.array_equal(h(g(probe)), probe))
    return inv(_softmax_net(np.ascontiguousarray(g(x))))


def test_scale_view_matches_cv2_resize():
    """Scale 0.5: the net runs on the bilinearly shrunk tile, its softmax is resized back."""
    x = _image(64, 96, 3)
    got = _predictor(scales=[0.5], stride=16).predict_proba(x)
    small = np.stack([cv2.resize(b, (48, 32), interpolation=cv2.INTER_LINEAR) for b in x])
    p = _softmax_net(small)
    want = np.stack([cv2.resize(c, (96, 64), interpolation=cv2.INTER_LINEAR) for c in p])
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - _softmax_net(x)).max() > 1e-2  # the scale really changed the prediction


@pytest.mark.parametrize("tta", ["none", ["identity", "rot90", "hflip_rot270"]])
def test_windowed_equals_whole_tile_away_from_window_edges(tta):
    """Windows of 64 every 32 px: a pixel whose distance to every covering window's edge is
    more than the receptive radius sees exactly what it sees in the whole tile."""
    r = _receptive_radius()
    h, w = 128, 160
    x = _image(h, w, 4)
    whole = _predictor(tta=tta, window=1024).predict_proba(x)
    windowed = _predictor(tta=tta, window=64, overlap=0.5).predict_proba(x)
    inner_y = (np.arange(h) % 32 >= r) & (np.arange(h) % 32 <= 31 - r)
    inner_x = (np.arange(w) % 32 >= r) & (np.arange(w) % 32 <= 31 - r)
    inner = inner_y[:, None] & inner_x[None, :]
    assert inner.mean() > 0.1
    diff = np.abs(whole - windowed).max(0)
    assert diff[inner].max() < 1e-5
    assert diff[~inner].max() > 1e-4  # window edges do differ: the test can see a misplaced window
    # the blend keeps the edge effects small everywhere
    assert (whole.argmax(0) == windowed.argmax(0)).mean() > 0.95
