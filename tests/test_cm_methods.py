"""The method registry (fastcm.cm.methods): iCT, sCT and MeanFlow behind one loss/sample API; a few optimisation
steps of each on digits reduce its loss (same draws before and after), samples have the right shape and range, and
a state_dict + metadata round trip rebuilds the right model and sampler."""
import pytest
import torch

from fastcm.cm import (METHOD_KEY, METHODS, ConsistencyModel, MeanFlowModel, TrigFlowModel, get_method,
                       method_from_metadata, method_of_model)
from fastcm.data import load_digits
from fastcm.models import build_unet

KWARGS = {"ict": {"total_steps": 100}, "sct": {"warmup_steps": 4}, "meanflow": {}}


def _setup(name):
    method = get_method(name, **KWARGS[name])
    torch.manual_seed(0)
    unet = build_unet("tiny", num_classes=10, impl="torch", **method.unet_overrides)
    return method, method.make_model(unet)


@pytest.fixture(scope="module")
def digits_batch():
    ds = load_digits("train")
    idx = torch.arange(16)
    x = torch.stack([torch.as_tensor(ds[i][0]) for i in idx]).float()
    y = torch.tensor([int(ds[i][1]) for i in idx])
    return x, y


def test_registry():
    assert tuple(METHODS) == ("ict", "sct", "meanflow")
    for name, cls in (("ict", ConsistencyModel), ("sct", TrigFlowModel), ("meanflow", MeanFlowModel)):
        method, model = _setup(name)
        assert isinstance(model, cls) and method.name == name
        assert method_of_model(model) == name
        assert method_from_metadata(method.metadata()) == name and method.metadata() == {METHOD_KEY: name}
    assert method_from_metadata({"step": 3}) == "ict"  # checkpoints written before the key existed
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("ect")
    with pytest.raises(ValueError, match="names method 'ect'"):
        method_from_metadata({"method": "ect"})
    with pytest.raises(TypeError, match="model must be a ConsistencyModel, TrigFlowModel or MeanFlowModel"):
        method_of_model(build_unet("tiny"))
    with pytest.raises(ValueError, match="steps must be 1 or 2 for iCT"):
        _setup("ict")[0].sample(_setup("ict")[1], 2, steps=3)


@pytest.mark.parametrize("name", tuple(METHODS))
def test_a_few_steps_reduce_the_loss(name, digits_batch):
    x, y = digits_batch
    method, model = _setup(name)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    conv_out = model.unet.conv_out.weight.detach().clone()  # zero-initialised: moves only if gradients reach F

    def loss_at(step, seed):
        return method.loss(model, x, y, step, torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = loss_at(0, 123).mean().item()
    for step in range(8):
        per_sample = loss_at(step, step)
        assert per_sample.shape == (16,) and bool(per_sample.isfinite().all())
        opt.zero_grad()
        per_sample.mean().backward()
        assert all(p.grad is None or bool(p.grad.isfinite().all()) for p in model.parameters())
        opt.step()
    with torch.no_grad():
        after = loss_at(0, 123).mean().item()
    print(f"\n{name}: loss {before:.4f} -> {after:.4f} after 8 Adam steps")
    assert after < before  # sCT: mostly the adaptive weight w_phi(t) settling (Eq. 8's value is e^w/D ||g||^2 - w)
    assert (model.unet.conv_out.weight - conv_out).abs().max() > 1e-4
    for steps in (1, 2):
        s = method.sample(model, 5, steps=steps, seeds=0)
        assert s.shape == (5, 1, 8, 8) and bool(s.isfinite().all()) and s.abs().max() <= 1
    assert model.training


@pytest.mark.parametrize("name", tuple(METHODS))
def test_checkpoint_round_trip_picks_the_method(name):
    method, model = _setup(name)
    for p in model.parameters():  # not the zero init, so the samples depend on the weights
        p.data.add_(0.05 * torch.randn_like(p))
    tensors, meta = model.state_dict(), {**method.metadata(), "step": 7}
    again = get_method(method_from_metadata(meta), **KWARGS[name])
    unet = build_unet("tiny", num_classes=10, impl="torch", **again.unet_overrides)
    rebuilt = again.make_model(unet)
    rebuilt.load_state_dict(tensors)
    labels = torch.arange(3)
    torch.testing.assert_close(again.sample(rebuilt, 3, steps=2, class_labels=labels, seeds=5),
                               method.sample(model, 3, steps=2, class_labels=labels, seeds=5), rtol=0, atol=0)
