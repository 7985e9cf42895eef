"""The exponential moving average of the weights: after n updates it equals the recursion
written out by hand with the warm-up decay d_t = min(d, (1 + t) / (10 + t)); integer buffers
follow the model."""
import math

import pytest
import torch

from training.engine.ema import EMA


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_ema_after_n_updates_equals_the_closed_form(decay):
    model = _model()
    w0 = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    ema = EMA(model, decay)
    seen = []
    for i in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.full_like(p, float(i)) + torch.arange(p.numel()).reshape(p.shape) * 0.1)
            model[1].running_mean.fill_(-float(i))
            model[1].num_batches_tracked.fill_(10 * i)
        seen.append({k: v.detach().clone().double() for k, v in model.state_dict().items()})
        ema.update(model)
    n = len(seen)
    for k, v in ema.state.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64 and v.item() == 40  # copied, not averaged
            continue
        want = w0[k]
        for t in range(n):  # d_t for update t (0-based): the warm-up rule
            d = min(decay, (1 + t) / (10 + t))
            want = d * want + (1 - d) * seen[t][k]
        assert torch.allclose(v.double(), want, atol=1e-6), k


def test_ema_state_is_a_copy():
    model = _model()
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.state.items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert all(torch.equal(ema.state[k], before[k]) for k in before)


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
@pytest.mark.parametrize("decay,n", [(0.999, 8), (0.999, 150), (0.9, 3), (0.9, 40)])
def test_ema_initial_share_follows_the_warmup_rule(decay, n):
    """A one-weight model that starts at 1 and is 0 after it: the EMA's value is the initial
    weights' share, which must equal prod over updates t < n of min(decay, (1+t)/(10+t))."""
    from training.engine.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay)
    with torch.no_grad():
        model.weight.fill_(0.0)
    for _ in range(n):
        ema.update(model)
    want = math.prod(min(decay, (1 + t) / (10 + t)) for t in range(n))
    assert ema.steps == n
    assert abs(float(ema.state["weight"]) - want) < 1e-6 and abs(ema.initial_share() - want) < 1e-12
    # without the warm-up, 0.999 over 150 steps would still hold 86 % of the start
    if decay == 0.999 and n == 150:
        assert want < 0.07 < 0.999 ** 150
