"""Evaluation EMA: the closed form of repeated lerps, buffers, copy_to, state_dict, wrappers, validation."""
import pytest
import torch

from fastcm.cm import ConsistencyModel, sample
from fastcm.models import build_unet
from fastcm.train import EMA


def _model():
    return ConsistencyModel(build_unet("tiny", impl="torch"))


def test_update_matches_closed_form():
    model = _model().double()
    ema = EMA(model, beta=0.9)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = []
    for k in range(3):  # move the weights, then update: ema_k = beta ema_{k-1} + (1 - beta) theta_k
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        targets.append({n: p.detach().clone() for n, p in model.named_parameters()})
        ema.update(model)
    for name, p in ema.module.named_parameters():
        t1, t2, t3 = (t[name] for t in targets)
        expected = 0.9**3 * theta0[name] + 0.1 * (0.9**2 * t1 + 0.9 * t2 + t3)
        torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)
        assert not p.requires_grad


def test_buffers_copied_not_averaged_and_copy_to():
    model = _model()
    ema = EMA(model, beta=0.99993)
    with torch.no_grad():
        model.unet.freqs.mul_(2)
    ema.update(model)
    assert torch.equal(ema.module.unet.freqs, model.unet.freqs)
    other = _model()
    ema.copy_to(other)
    for a, b in zip(ema.module.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_round_trip_and_sampling_from_shadow():
    model = _model()
    ema = EMA(model, beta=0.5)
    with torch.no_grad():
        model.unet.conv_out.weight.normal_()
    ema.update(model)
    fresh = EMA(_model(), beta=0.5)
    fresh.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), fresh.state_dict().values()))
    assert all(isinstance(v, torch.Tensor) for v in ema.state_dict().values())  # safetensors-friendly
    x = sample(fresh.module, 2, seeds=0)
    torch.testing.assert_close(x, sample(ema.module, 2, seeds=0))
    bad = {k: v.clone() for k, v in ema.state_dict().items()}
    next(iter(bad.values())).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        fresh.load_state_dict(bad)


def test_compiled_wrapper_is_unwrapped_and_mismatches_rejected():
    model = _model()
    ema = EMA(torch.compile(model), beta=0.0)  # compile is lazy: nothing is traced here
    with torch.no_grad():
        model.unet.conv_in.bias.fill_(3.0)
    ema.update(torch.compile(model))
    assert torch.equal(ema.module.unet.conv_in.bias, model.unet.conv_in.bias)  # beta = 0 copies
    with pytest.raises(ValueError, match="do not match"):
        ema.update(ConsistencyModel(build_unet("tiny", impl="torch", num_classes=3)))
    with pytest.raises(ValueError, match="shape"):
        ema.update(ConsistencyModel(build_unet("tiny", impl="torch", model_channels=8)))
    for beta in (1.0, -0.1, True):
        with pytest.raises(ValueError):
            EMA(model, beta=beta)
