"""Consistency parametrization (CM App. C): coefficients vs closed forms, boundary condition, what the net sees."""
import math

import pytest
import torch
from torch import nn

from fastcm.cm import ConsistencyModel, cm_coefficients
from fastcm.models import build_unet


class Recorder(nn.Module):
    """A stand-in U-Net that records its inputs and returns a fixed function of them."""

    input_shape, num_classes = (1, 4, 4), 0

    def forward(self, x, noise_labels, class_labels=None, dropout_seed=None):
        self.seen = (x.clone(), noise_labels.clone(), class_labels, dropout_seed)
        return torch.tanh(x) + noise_labels.view(-1, 1, 1, 1)


def _closed_form(sigma, sd=0.5, eps=0.002):
    return (sd**2 / ((sigma - eps) ** 2 + sd**2), sd * (sigma - eps) / math.sqrt(sigma**2 + sd**2),
            1 / math.sqrt(sigma**2 + sd**2), 0.25 * math.log(sigma))


@pytest.mark.parametrize("sigma", [0.002, 0.01, 0.5, 0.821, 3.0, 80.0])
def test_coefficients_match_closed_form(sigma):
    got = cm_coefficients(torch.tensor([sigma], dtype=torch.float64), 0.5, 0.002)
    for g, e in zip(got, _closed_form(sigma)):
        assert g.item() == pytest.approx(e, rel=1e-14, abs=1e-300)


def test_boundary_coefficients_are_exact():
    c_skip, c_out, _, _ = cm_coefficients(torch.tensor([0.002]), 0.5, 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_f_of_x_at_sigma_min_is_x_exactly(dtype):
    # Random non-zero output layer: F is far from 0, yet f(x, sigma_min) must be x bit for bit.
    net = build_unet("tiny", impl="torch", num_classes=3).to(dtype)
    nn.init.normal_(net.conv_out.weight, std=1.0)
    model = ConsistencyModel(net)
    x = torch.randn(5, 1, 8, 8, dtype=dtype) * 3
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(model(x, 0.002, labels), x)
    assert torch.equal(model(x, torch.full((5,), 0.002, dtype=dtype), labels), x)
    assert not torch.allclose(model(x, 0.01, labels), x, atol=1e-3)  # away from the boundary F matters


def test_network_sees_scaled_input_and_noise_label_only():
    model = ConsistencyModel(Recorder(), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    out = model(x, sigma, dropout_seed=torch.tensor(5))
    x_in, noise, _, seed = model.unet.seen
    coeffs = [torch.tensor([_closed_form(s)[j] for s in sigma.tolist()], dtype=torch.float64) for j in range(4)]
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in coeffs)
    torch.testing.assert_close(x_in, c_in * x, rtol=1e-14, atol=0)
    torch.testing.assert_close(noise, coeffs[3], rtol=1e-14, atol=0)
    torch.testing.assert_close(out, c_skip * x + c_out * (torch.tanh(c_in * x) + c_noise), rtol=1e-13, atol=1e-15)
    assert seed.item() == 5


def test_float_sigma_equals_tensor_sigma():
    model = ConsistencyModel(Recorder())
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(model(x, 0.821), model(x, torch.full((2,), 0.821)))


def test_exposes_unet_and_shapes():
    net = build_unet("digits", impl="torch")
    model = ConsistencyModel(net)
    assert model.unet is net and model.input_shape == (1, 8, 8) and model.num_classes == 10


@pytest.mark.parametrize("kwargs", [dict(sigma_data=0.0), dict(sigma_min=-1.0), dict(sigma_max=float("nan")),
                                    dict(sigma_min=1.0, sigma_max=0.5), dict(sigma_data=True)])
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        ConsistencyModel(Recorder(), **kwargs)
    with pytest.raises(TypeError):
        ConsistencyModel(lambda x: x)


def test_forward_validation():
    model = ConsistencyModel(Recorder())
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="sigma"):
        model(x, 0.001)  # below sigma_min: c_out would turn negative
    with pytest.raises(ValueError, match="sigma"):
        model(x, torch.ones(3))
    with pytest.raises(TypeError, match="sigma"):
        model(x, "1.0")
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 16), 1.0)
    with pytest.raises(TypeError, match="x"):
        model(torch.zeros(2, 1, 4, 4, dtype=torch.int64), 1.0)
