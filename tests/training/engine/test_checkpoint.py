"""Checkpoints are written with plain types only, so they load with weights_only=True."""
import os

import numpy as np
import pytest
import torch


def test_checkpoints_written_are_plain(tmp_path):
    """numpy values in a checkpoint are converted at save time, so it loads with weights_only=True."""
    from training.engine.checkpoint import load_state, save_atomic

    p = str(tmp_path / "x.pt")
    save_atomic({"history": [{"val_mcc": np.float64(0.7)}], "shares": np.array([0.5, 0.5])}, p)
    ck = load_state(p)
    assert ck["history"][0]["val_mcc"] == 0.7 and torch.equal(ck["shares"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(TypeError):
        save_atomic({"x": object()}, str(tmp_path / "y.pt"))
    assert not os.path.exists(tmp_path / "y.pt")
