"""Windows over a tile: starts that cover it, positive blend weights, reflect padding to the stride."""
import numpy as np

from glacier_runtime.window import blend_weight, pad_to_multiple, plan_windows, window_starts


def test_windows_cover_and_weights_positive():
    starts = window_starts(300, 128, 0.25)
    assert starts[0] == 0 and starts[-1] == 300 - 128
    cover = np.zeros(300)
    for s in starts:
        cover[s:s + 128] += 1
    assert cover.min() >= 1
    assert (blend_weight(64, 96) > 0).all()
    assert len(plan_windows(64, 64, 128, 0.25)) == 1


def test_pad_reflect_and_tiny_tiles():
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    p, hw = pad_to_multiple(x, 32)
    assert p.shape == (2, 32, 32) and hw == (3, 5) and np.array_equal(p[:, :3, :5], x)
    p, _ = pad_to_multiple(np.ones((1, 1, 1), np.float32), 32)
    assert p.shape == (1, 32, 32)
