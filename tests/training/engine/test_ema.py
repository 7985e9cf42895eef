"""The exponential moving average of the weights: after n updates with decay d it equals the
closed form d^n w0 + (1 - d) sum_i d^(n-i) w_i; integer buffers follow the model."""
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
        want = decay ** n * w0[k] + (1 - decay) * sum(decay ** (n - i) * seen[i - 1][k] for i in range(1, n + 1))
        assert torch.allclose(v.double(), want, atol=1e-6), k


def test_ema_state_is_a_copy():
    model = _model()
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.state.items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert all(torch.equal(ema.state[k], before[k]) for k in before)
