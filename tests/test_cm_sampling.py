"""Samplers (CM Algorithm 1) against the exact consistency function of Gaussian data; per-sample seeding."""
import math

import pytest
import torch
from torch import nn

from fastcm.cm import ConsistencyModel, resolve_seeds, sample
from fastcm.models import build_unet

EPS = 0.002


class GaussianOracle(nn.Module):
    """The exact consistency function of data ~ N(0, s^2 I) under the VE PF-ODE: x(sigma) scales as
    sqrt(s^2 + sigma^2) along a trajectory, so f(x, sigma) = x sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2)."""

    sigma_min = EPS

    def __init__(self, s=0.25, shape=(1, 8, 8), num_classes=0):
        super().__init__()
        self.s, self.input_shape, self.num_classes = s, shape, num_classes
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((sigma, class_labels, self.training))
        return x * math.sqrt(self.s**2 + EPS**2) / math.sqrt(self.s**2 + sigma**2)


def test_one_step_matches_gaussian_closed_form():
    s = 0.25
    oracle = GaussianOracle(s)
    x = sample(oracle, 2048, seeds=0)
    assert x.shape == (2048, 1, 8, 8) and oracle.calls[0][0] == 80.0
    # x = f(80 z, 80) ~ N(0, 80^2 (s^2 + eps^2) / (s^2 + 80^2)); clamping at 4 std changes nothing measurable.
    expected = 80 * math.sqrt((s**2 + EPS**2) / (s**2 + 80**2))
    assert x.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(x.mean().item()) < 0.01


def test_two_step_matches_gaussian_closed_form():
    s, mid = 0.25, 0.821
    oracle = GaussianOracle(s)
    x = sample(oracle, 2048, sigmas=(80.0, mid), seeds=0)
    assert [c[0] for c in oracle.calls] == [80.0, mid]
    v1 = 80**2 * (s**2 + EPS**2) / (s**2 + 80**2)
    v2 = (v1 + mid**2 - EPS**2) * (s**2 + EPS**2) / (s**2 + mid**2)  # x0 + sqrt(mid^2 - eps^2) z, then f
    assert x.std().item() == pytest.approx(math.sqrt(v2), rel=0.01)


def test_output_clamped_and_multistep_order():
    oracle = GaussianOracle(s=5.0)  # wide data: many values beyond [-1, 1]
    x = sample(oracle, 16, sigmas=(80.0, 10.0, 1.0, 0.1), seeds=3)
    assert x.abs().max().item() <= 1.0 and (x.abs() == 1.0).any()
    assert [c[0] for c in oracle.calls] == [80.0, 10.0, 1.0, 0.1]


def test_samples_do_not_depend_on_batch_size():
    oracle = GaussianOracle()
    big = sample(oracle, 7, sigmas=(80.0, 0.821), seeds=100)
    small = sample(oracle, 3, sigmas=(80.0, 0.821), seeds=100)
    chunked = sample(oracle, 7, sigmas=(80.0, 0.821), seeds=100, batch_size=2)
    assert torch.equal(big[:3], small) and torch.equal(big, chunked)
    listed = sample(oracle, 3, sigmas=(80.0, 0.821), seeds=[102, 100, 101])
    assert torch.equal(listed, big[[2, 0, 1]])  # sample j depends on seeds[j] alone
    # The same with a real network (equal up to float rounding of batched convolutions).
    model = ConsistencyModel(build_unet("tiny", impl="torch"))
    nn.init.normal_(model.unet.conv_out.weight, std=0.5)
    a = sample(model, 5, seeds=7)
    b = sample(model, 2, seeds=7)
    torch.testing.assert_close(a[:2], b, rtol=1e-5, atol=1e-6)


def test_generator_gives_reproducible_seeds():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert resolve_seeds(4, None, g(1)) == resolve_seeds(4, None, g(1))
    assert resolve_seeds(4, None, g(1)) != resolve_seeds(4, None, g(2))
    base = resolve_seeds(1, None, g(1))[0]
    assert resolve_seeds(4, None, g(1)) == [base + j for j in range(4)]
    assert resolve_seeds(3, torch.tensor([5, 6, 9])) == [5, 6, 9]
    oracle = GaussianOracle()
    assert torch.equal(sample(oracle, 4, generator=g(3)), sample(oracle, 4, generator=g(3)))


def test_class_labels_drawn_per_sample_given_or_validated():
    oracle = GaussianOracle(num_classes=10)
    sample(oracle, 6, seeds=0)
    drawn6 = oracle.calls[-1][1]
    sample(oracle, 2, seeds=0)
    assert torch.equal(oracle.calls[-1][1], drawn6[:2]) and drawn6.dtype == torch.int64
    sample(oracle, 3, class_labels=4, seeds=0)
    assert oracle.calls[-1][1].tolist() == [4, 4, 4]
    sample(oracle, 3, class_labels=torch.tensor([1, 2, 3]), seeds=0, batch_size=2)
    assert oracle.calls[-1][1].tolist() == [3]
    for bad in (torch.tensor([1, 2]), torch.tensor([0, 1, 10]), torch.tensor([0.0, 1.0, 2.0])):
        with pytest.raises(ValueError, match="class_labels"):
            sample(oracle, 3, class_labels=bad)
    with pytest.raises(ValueError, match="unconditional"):
        sample(GaussianOracle(), 2, class_labels=1)


def test_sampling_runs_in_eval_mode_and_restores_training():
    oracle = GaussianOracle().train()
    sample(oracle, 2, seeds=0)
    assert oracle.calls[-1][2] is False and oracle.training


@pytest.mark.parametrize("kwargs, err", [
    (dict(n=0), ValueError), (dict(n=2, sigmas=(0.821, 80.0)), ValueError), (dict(n=2, sigmas=(80.0, 0.001)),
                                                                             ValueError),
    (dict(n=2, sigmas=()), ValueError), (dict(n=2, seeds=[1]), ValueError), (dict(n=2, seeds=-1), ValueError),
    (dict(n=2, batch_size=0), ValueError), (dict(n=2, sigmas=("a",)), TypeError),
    (dict(n=2, seeds=torch.tensor([1.0, 2.0])), TypeError)])
def test_sample_validation(kwargs, err):
    with pytest.raises(err):
        sample(GaussianOracle(), **kwargs)


def test_sample_needs_a_consistency_model():
    with pytest.raises(TypeError, match="ConsistencyModel"):
        sample(nn.Linear(2, 2), 2)
