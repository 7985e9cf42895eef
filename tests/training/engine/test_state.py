"""Restoring a cut run's state onto the run's device: optimizer moments, EMA weights, gradient scaler."""
import pytest
import torch
from tests.helpers import kaggle_trainer


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
def test_restore_state_scaler_and_ema_device_unit():
    from training.engine.ema import EMA
    from training.engine.schedule import grad_scaler
    from training.engine.state import restore_state

    model = torch.nn.Conv2d(2, 3, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 2, 4, 4)).sum().backward()
    opt.step()
    ema = EMA(model, 0.5)
    ck = {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state,
          "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7,
                     "_growth_tracker": 3}}
    target = torch.nn.Conv2d(2, 3, 1).to("meta")
    t_opt = torch.optim.AdamW(target.parameters())
    t_ema = EMA(target, 0.5)
    t_ema.state = {k: torch.zeros(1) for k in t_ema.state}  # CPU placeholders must be replaced
    scaler = grad_scaler(False)
    restore_state(ck, torch.device("meta"), target, t_opt, scaler, t_ema)
    assert all(v.device.type == "meta" for v in t_ema.state.values())
    assert all(v.device.type == "meta" for st in t_opt.state.values() for k, v in st.items() if k != "step")


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_resume_keeps_the_ema_step_count(synth_data, tmp_path):
    from training.engine.state import restore_state

    class InterruptAfter:
        def on_epoch_end(self, trainer, epoch, row):
            raise KeyboardInterrupt

    t = kaggle_trainer(synth_data, tmp_path, **{"train.ema": 0.999, "train.checkpoint_every_s": 0})
    t.callbacks = [InterruptAfter()]
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ck = torch.load(t.last_path, weights_only=True)
    assert ck["ema_steps"] == t.ema.steps == 2  # 8 patches / batch 4 = 2 optimiser steps
    r = kaggle_trainer(synth_data, tmp_path, **{"train.ema": 0.999, "train.checkpoint_every_s": 0})
    r.setup_data()
    r.setup_model()
    restore_state(ck, r.device, r.model, r.opt, r.scaler, r.ema, r.plateau)
    assert r.ema.steps == 2
