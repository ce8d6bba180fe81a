"""The methods' hyper-parameter ranges (fastcm.cm.hyperparameters): one table, enforced by get_method and by the
training configs, with one-line errors naming the field; sCT / MeanFlow refuse a U-Net built without the method's
unet_overrides before a run directory is written."""
import pytest
import torch

from fastcm.cm import METHODS, TrigFlowModel, get_method, meanflow_adaptive_loss
from fastcm.cm.hyperparameters import RANGES, check_hyperparameters
from fastcm.data import ArrayDataset
from fastcm.models import build_unet
from fastcm.train import FDConfig, ICTConfig, train_method

# the reproductions: each trains on nothing or overflows when accepted
BAD_CONFIGS = [({"mf_p": 1e308}, r"mf_p must be a number in \[0, 2\]"),
               ({"sct_P_mean": 1e308}, r"sct_P_mean must be a number in \[-10, 10\]"),
               ({"rho": 1e-300}, r"rho must be a number in \[1, 100\]"),
               ({"tangent_c": 0}, r"tangent_c must be a number in \(0, 100\]"),
               ({"huber_c": 1e300}, r"huber_c must be a number in \(0, 100\]"),
               ({"mf_P_std": float("inf")}, "mf_P_std"), ({"P_mean": True}, "P_mean"),
               ({"mf_ratio": 1.5}, "mf_ratio")]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("bad,match", BAD_CONFIGS)
def test_config_refuses_out_of_range_values_whatever_the_method(method, bad, match):
    """Every method's fields are checked when the config is built (tangent_c=0 no longer waits for SCTLoss)."""
    with pytest.raises(ValueError, match=match) as info:
        ICTConfig(method=method, **bad)
    assert "\n" not in str(info.value)


def test_fd_config_checks_its_ict_term_fields():
    with pytest.raises(ValueError, match="rho must be a number in"):
        FDConfig(rho=1e-300)
    with pytest.raises(ValueError, match="P_mean must be a number in"):
        FDConfig(P_mean=1e308)


@pytest.mark.parametrize("name,kw,field", [("meanflow", {"p": 1e308}, "p"), ("sct", {"P_mean": 1e308}, "P_mean"),
                                           ("ict", {"total_steps": 10, "rho": 1e-300}, "rho"),
                                           ("sct", {"tangent_c": 0.0}, "tangent_c"),
                                           ("meanflow", {"c": 1e300}, "c")])
def test_get_method_enforces_the_same_table(name, kw, field):
    with pytest.raises(ValueError, match=rf"^{field} must be a number in .*\({name}; see fastcm.cm.hyperparameters"):
        get_method(name, **kw)


def test_defaults_and_published_values_pass():
    for method in METHODS:
        cfg = ICTConfig(method=method)
        get_method(method, **cfg.method_hyperparameters())
    FDConfig()
    for method, kw in (("meanflow", {"mf_p": 0.0}), ("meanflow", {"mf_p": 0.5}), ("meanflow", {"mf_p": 1.0}),
                       ("sct", {"sct_P_mean": -0.8, "sct_P_std": 1.6}), ("meanflow", {"mf_P_mean": -0.6}),
                       ("ict", {"rho": 1.0}), ("ict", {"huber_c": 0.03})):
        cfg = ICTConfig(method=method, **kw)
        get_method(method, **cfg.method_hyperparameters())
    check_hyperparameters("ict", {"c": None})  # None = iCT's default c


def test_the_bounds_are_where_training_breaks():
    """Why the table bounds p: past it the adaptive weight 1 / (L + c)^p makes the loss 0 (the mf_p = 1e308
    reproduction); inside it the loss follows the closed form L / (L + c)^p."""
    assert RANGES["meanflow"]["p"][1] == 2.0
    u, tgt = torch.full((2, 1, 4, 4), 0.5), torch.zeros(2, 1, 4, 4)
    L = 16 * 0.25
    assert torch.equal(meanflow_adaptive_loss(u, tgt, p=1e308), torch.zeros(2))
    torch.testing.assert_close(meanflow_adaptive_loss(u, tgt, p=2.0), torch.full((2,), L / (L + 1e-3) ** 2))


def _data():
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.rand(16, 1, 8, 8, generator=g) * 2 - 1)


@pytest.mark.parametrize("wrap", [False, True])
def test_sct_refuses_a_unet_that_embeds_1000_t(tmp_path, wrap):
    """A positional-embedding U-Net built without time_scale=1 embeds 1000 t; sCT (c_noise = t, sCM Sec. 4.1) refuses
    it, bare or already wrapped, before the run directory exists."""
    cfg = ICTConfig(method="sct", total_steps=1, batch_size=4, sample_every=0, save_every=0, num_samples=4)
    unet = build_unet("tiny", embedding="positional", impl="torch")
    assert unet.time_scale == 1000.0
    model = TrigFlowModel(unet) if wrap else unet
    with pytest.raises(ValueError, match=r"method 'sct' needs a U-Net built with time_scale=1\.0 .* got "
                                         r"time_scale=1000\.0"):
        train_method(cfg, _data(), model, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_sct_trains_on_a_unet_with_the_override(tmp_path):
    cfg = ICTConfig(method="sct", total_steps=1, batch_size=4, sample_every=0, save_every=0, num_samples=4)
    unet = build_unet("tiny", embedding="positional", impl="torch", **METHODS["sct"].unet_overrides)
    result = train_method(cfg, _data(), unet, progress=False)
    assert result.step == 1
