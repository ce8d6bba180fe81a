"""iCT discretization against the paper's numbers and independent closed forms (Song & Dhariwal 2023: Karras grid, N(k) curriculum, lognormal pair probabilities)."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from fastcm.cm import ict_num_scales, ict_weights, karras_sigmas, lognormal_pair_probs, pseudo_huber_c


def test_karras_sigmas_ascending_and_match_formula():
    N, lo, hi, rho = 11, 0.002, 80.0, 7.0
    s = karras_sigmas(N, lo, hi, rho)
    assert s.dtype == torch.float64 and s.shape == (N,)
    # Independent closed form in numpy, i = 1..N (iCT numbering, ascending).
    i = np.arange(1, N + 1)
    expected = (lo ** (1 / rho) + (i - 1) / (N - 1) * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-13)
    assert s[0].item() == lo and s[-1].item() == hi
    assert bool((s[1:] > s[:-1]).all())


def test_karras_sigmas_reverse_of_cm_descending_grid():
    # The CM code numbers the same grid in descending order: t = (max^(1/rho) + idx/(N-1) (min^(1/rho) - ...))^rho.
    N = 18
    idx = np.arange(N)
    t = (80 ** (1 / 7) + idx / (N - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(karras_sigmas(N).flip(0).numpy(), t, rtol=1e-12)


@pytest.mark.parametrize("bad", [dict(N=1), dict(N=2.5), dict(N=5, sigma_min=0.0), dict(N=5, sigma_min=90.0),
                                 dict(N=5, rho=-1.0), dict(N=5, sigma_max=float("inf"))])
def test_karras_sigmas_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        karras_sigmas(**bad)


def test_num_scales_paper_sequence_K_400k():
    # iCT: s0 = 10, s1 = 1280, K = 400k -> K' = 50k and N = 11, 21, 41, ..., 1281, each for 50k iterations.
    K = 400_000
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    for stage, n in enumerate(expected):
        start = stage * 50_000
        assert ict_num_scales(start, K) == n
        assert ict_num_scales(start + 49_999, K) == n
    # Monotone and constant within stages on a dense scan (stride 97 is coprime to the stage length).
    ks = list(range(0, K, 97))
    values = [ict_num_scales(k, K) for k in ks]
    assert values == [expected[k // 50_000] for k in ks]
    assert ict_num_scales(K, K) == 1281 and ict_num_scales(10 * K, K) == 1281  # capped at s1 + 1


def test_num_scales_K_800k_and_cm_defaults():
    assert [ict_num_scales(100_000 * j, 800_000) for j in range(8)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_scales(99_999, 800_000) == 11
    # Non-power-of-two ratio: K' = floor(K / (log2 floor(150/2) + 1)) = floor(1000 / 7.2288) = 138.
    assert ict_num_scales(137, 1000, s0=2, s1=150) == 3 and ict_num_scales(138, 1000, s0=2, s1=150) == 5
    assert ict_num_scales(10**6, 1000, s0=2, s1=150) == 151


@pytest.mark.parametrize("bad", [dict(k=-1, total_steps=10), dict(k=0, total_steps=0), dict(k=0, total_steps=10,
                                 s0=20, s1=10), dict(k=1.5, total_steps=10)])
def test_num_scales_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        ict_num_scales(**bad)


@pytest.mark.parametrize("N", [11, 161, 1281])
def test_lognormal_pair_probs_match_erf_formula_and_scipy(N):
    P_mean, P_std = -1.1, 2.0
    s = karras_sigmas(N)
    p = lognormal_pair_probs(s, P_mean, P_std)
    assert p.shape == (N - 1,) and p.dtype == torch.float64
    assert abs(p.sum().item() - 1.0) < 1e-12 and bool((p > 0).all())
    # iCT's lognormal pair probabilities (erf differences over the Karras grid), with math.erf.
    erf = np.array([math.erf((math.log(v) - P_mean) / (math.sqrt(2) * P_std)) for v in s.tolist()])
    np.testing.assert_allclose(p.numpy(), np.diff(erf) / np.diff(erf).sum(), rtol=1e-9)
    # Independently: the lognormal's mass on [sigma_i, sigma_{i+1}] (scipy), renormalized to the grid.
    cdf = scipy.stats.lognorm(s=P_std, scale=math.exp(P_mean)).cdf(s.numpy())
    np.testing.assert_allclose(p.numpy(), np.diff(cdf) / (cdf[-1] - cdf[0]), rtol=1e-8)


def test_lognormal_puts_weight_on_small_and_mid_sigma():
    # Why iCT uses it: the mode of p sits near exp(P_mean) ~ 0.33, not at the large-sigma end.
    s = karras_sigmas(1281)
    p = lognormal_pair_probs(s)
    mid = 0.5 * (s[1:] + s[:-1])
    assert 0.05 < mid[p.argmax()].item() < 1.0
    assert p[mid > 10].sum().item() < 0.2


def test_lognormal_pair_probs_rejects_bad_grids():
    with pytest.raises(ValueError):
        lognormal_pair_probs(torch.tensor([1.0, 0.5, 2.0]))
    with pytest.raises(ValueError):
        lognormal_pair_probs(torch.tensor([1.0]))
    with pytest.raises(ValueError):
        lognormal_pair_probs(karras_sigmas(5), P_std=0.0)


def test_ict_weights_are_inverse_gaps():
    s = karras_sigmas(21)
    lam = ict_weights(s)
    np.testing.assert_allclose(lam.numpy(), 1.0 / np.diff(s.numpy()), rtol=1e-14)
    assert bool((lam[1:] < lam[:-1]).all())  # the weight falls as sigma grows
    with pytest.raises(ValueError):
        ict_weights(s.flip(0))


def test_pseudo_huber_c_paper_values():
    assert round(pseudo_huber_c((3, 32, 32)), 4) == 0.0299  # CIFAR-10, d = 3072
    assert round(pseudo_huber_c((3, 64, 64)), 4) == 0.0599  # ImageNet 64, d = 12288
    assert pseudo_huber_c((1, 8, 8)) == pytest.approx(0.00054 * 8)
    with pytest.raises(ValueError):
        pseudo_huber_c((3, 0, 32))
