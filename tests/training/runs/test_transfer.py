"""--init-from: a crafted checkpoint is refused and never unpickled."""
import os

import pytest

from tests.helpers import ROOT, craft


def test_init_from_refused(tmp_path):
    from training.engine.checkpoint import CheckpointError
    from training.config import load_config
    from training.runs.transfer import load_init_state

    marker = str(tmp_path / "PWNED")
    evil = craft(str(tmp_path / "hkh.pt"), marker, {"state_dict": {}, "sensor": "L7"})
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), {"model.decoder_channels": [16, 16, 16, 8, 8]})
    with pytest.raises(CheckpointError, match="--init-from checkpoint"):
        load_init_state(evil, cfg)
    assert not os.path.exists(marker)
