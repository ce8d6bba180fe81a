"""FD-loss fine-tune stage: reference statistics and the logged FD against numpy/scipy, FD going down, exact
resume including the feature queue, the optional iCT term, input validation."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from fastcm.cm import ConsistencyModel
from fastcm.data import ArrayDataset
from fastcm.models import build_unet
from fastcm.train import FDConfig, finetune_fd, reference_stats
from fastcm.train.checkpoint_file import CheckpointManager, load_checkpoint
from fastcm.train.fd import one_step_inputs



def _feature_net():
    """A tiny random conv net (any frozen feature network works): (B, 1, 8, 8) -> (B, 6)."""
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 6))


def _data(n=200):
    g = torch.Generator().manual_seed(0)  # blobs: smooth random images, labels 0..9
    x = torch.nn.functional.avg_pool2d(torch.randn(n, 1, 16, 16, generator=g), 2).clamp(-1, 1)
    return ArrayDataset(x, torch.arange(n) % 10)


def _model(seed=0):
    torch.manual_seed(seed)
    return ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch"))


def _scipy_fd(feats, mu_r, sigma_r):
    from scipy import linalg

    f = np.asarray(feats, np.float64)
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    covmean = linalg.sqrtm(sigma @ sigma_r).real
    return float(((mu - mu_r) ** 2).sum() + np.trace(sigma) + np.trace(sigma_r) - 2 * np.trace(covmean))


def _cfg(**kw):
    base = dict(total_steps=4, batch_size=20, lr=1e-3, ema_beta=0.5, log_every=1, sample_every=0, num_samples=10,
                save_every=0, s1=8)
    return FDConfig(**{**base, **kw})


def test_reference_stats_match_numpy():
    net, data = _feature_net(), _data(53)
    with torch.no_grad():
        feats = net(data.get_batch(torch.arange(53))[0]).double().numpy()
    for ds in (data, [data[i] for i in range(53)]):  # in-memory fast path and a plain list of (image, label)
        stats = reference_stats(net, ds, batch_size=16)
        assert stats.n == 53
        np.testing.assert_allclose(stats.mu.numpy(), feats.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(stats.sigma.numpy(), np.cov(feats, rowvar=False), rtol=0, atol=1e-12)


def test_one_step_inputs_do_not_depend_on_the_split():
    full = one_step_inputs(3, 7, 0, 8, (1, 8, 8), 10, True)
    halves = [one_step_inputs(3, 7, s, 4, (1, 8, 8), 10, True) for s in (0, 4)]
    assert torch.equal(full[0], torch.cat([h[0] for h in halves])) and full[1].tolist() == list(range(8))
    z, y = one_step_inputs(3, 7, 0, 8, (1, 8, 8), 10, False)
    assert torch.equal(z, full[0]) and y.min() >= 0 and y.max() < 10
    assert one_step_inputs(3, 7, 0, 2, (1, 8, 8), 0, True)[1] is None
    assert not torch.equal(one_step_inputs(3, 8, 0, 8, (1, 8, 8), 10, True)[0], full[0])


def test_logged_fd_matches_scipy_and_fd_goes_down():
    net, data = _feature_net(), _data()
    ref = reference_stats(net, data)
    mu_r, sigma_r = ref.mu.numpy(), ref.sigma.numpy()
    model = _model()
    init = ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch"))
    init.load_state_dict(model.state_dict())
    cfg = _cfg(total_steps=25, batch_size=40, fd_mode="batch", log_every=1)
    res = finetune_fd(cfg, model, net, ref, progress=False)
    # step 0's FD, recomputed independently from the same samples of the initial weights (scipy sqrtm)
    z, y = one_step_inputs(cfg.seed, 0, 0, 40, (1, 8, 8), 10, True)
    with torch.no_grad():
        feats = net(init(z * 80.0, torch.full((40,), 80.0), y)).numpy()
    assert res.records[0]["fd"] == pytest.approx(_scipy_fd(feats, mu_r, sigma_r), rel=1e-6)
    assert res.records[0]["loss"] == res.records[0]["fd"]
    # fresh samples (other seeds, 200 of them): the fine-tuned weights have a much lower FD than the initial ones
    z, y = one_step_inputs(99, 0, 0, 200, (1, 8, 8), 10, True)
    with torch.no_grad():
        before = _scipy_fd(net(init(z * 80.0, 80.0, y)).numpy(), mu_r, sigma_r)
        after = _scipy_fd(net(res.model.eval()(z * 80.0, 80.0, y)).numpy(), mu_r, sigma_r)
    assert after < 0.5 * before, (before, after)


class _Crash:
    def __init__(self, at):
        self.at = at

    def on_log(self, record):
        if record["step"] == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_is_exact_with_queue_and_ict_term(tmp_path):
    net, data = _feature_net(), _data()
    ref = reference_stats(net, data)
    cfg = _cfg(total_steps=5, save_every=2, keep_last=5, ict_weight=0.5, queue_size=50, hflip=True)
    a = finetune_fd(cfg, _model(), net, ref, dataset=data, out_dir=tmp_path / "a", progress=False)
    assert {"fd", "ict", "loss"} <= set(a.records[0])
    assert a.records[0]["loss"] == pytest.approx(a.records[0]["fd"] + 0.5 * a.records[0]["ict"], rel=1e-6)
    with pytest.raises(KeyboardInterrupt):
        finetune_fd(cfg, _model(), net, ref, dataset=data, out_dir=tmp_path / "b", progress=False,
                    callbacks=[_Crash(at=3)])
    b = finetune_fd(cfg, _model(seed=4), net, ref, dataset=data, out_dir=tmp_path / "b", resume=True,
                    progress=False)
    assert [json.loads(s)["step"] for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5]
    ta, ma = load_checkpoint(a.checkpoint)
    tb, mb = load_checkpoint(b.checkpoint)
    assert ta.keys() == tb.keys() and any(k.startswith("extra/fd_loss/queue") for k in ta)
    for k in ta:
        if not k.startswith("rng/"):
            assert torch.equal(ta[k], tb[k]), k
    assert ma["extra"]["fd_loss"]["count"] == 50 and mb["extra"] == ma["extra"]  # 5 x 20 features, queue of 50
    assert [s for s, _ in CheckpointManager(tmp_path / "b" / "checkpoints").checkpoints()] == [2, 4, 5]
    with pytest.raises(ValueError, match="reference statistics .* differ from ref_stats"):
        finetune_fd(cfg, _model(), net, (ref.mu + 1, ref.sigma), dataset=data, out_dir=tmp_path / "b", resume=True,
                    progress=False)
    with pytest.raises(ValueError, match="'fd' checkpoint; cannot resume the 'ict' stage"):
        from fastcm.train import ICTConfig, train_ict
        train_ict(ICTConfig(total_steps=5, batch_size=20), data, _model(), resume=b.checkpoint, progress=False)


def test_fd_stage_validation():
    net, data = _feature_net(), _data(40)
    ref = reference_stats(net, data)
    with pytest.raises(ValueError, match=r"\(B, 6\) features to match ref_stats, got \(2, 7\)"):
        finetune_fd(_cfg(), _model(), nn.Sequential(net, nn.Linear(6, 7)), ref, progress=False)
    with pytest.raises(ValueError, match="needs the training dataset"):
        finetune_fd(_cfg(ict_weight=1.0), _model(), net, ref, progress=False)
    with pytest.raises(TypeError, match="FeatureStats or a \\(mu, sigma\\) pair"):
        finetune_fd(_cfg(), _model(), net, ref.mu, progress=False)
    with pytest.raises(TypeError, match="FDConfig"):
        finetune_fd(_cfg().to_dict(), _model(), net, ref)
    with pytest.raises(ValueError, match="fd_mode"):
        _cfg(fd_mode="median")
    res = finetune_fd(_cfg(total_steps=1), _model(), net, (ref.mu.numpy(), ref.sigma.numpy()), progress=False)
    assert res.step == 1 and res.records[0]["fd"] > 0


def test_fd_dropout_is_seeded_by_config_seed_and_global_sample_index():
    """Item 3: with fd_dropout the masks are a function of (cfg.seed, step, global sample index) alone: torch's
    global RNG plays no part, the seed does, and a sample's mask does not depend on its position in a batch."""
    from fastcm.nn import dropout_keep_mask
    from fastcm.train.fd import dropout_seeds

    seeds = dropout_seeds(3, 7, 0, 6)
    full = dropout_keep_mask((6, 4, 5, 5), 0.3, seeds, layer_id=2)
    for j in range(6):  # sample j alone (a batch of one, the 0-d rule) has the mask it has inside the batch
        assert torch.equal(full[j], dropout_keep_mask((1, 4, 5, 5), 0.3, seeds[j], layer_id=2)[0])
    assert torch.equal(full[4:], dropout_keep_mask((2, 4, 5, 5), 0.3, dropout_seeds(3, 7, 4, 2), layer_id=2))
    assert 0.6 < full.float().mean() < 0.8
    with pytest.raises(ValueError, match="one per sample"):
        dropout_keep_mask((6, 4), 0.3, seeds[:3], layer_id=0)
    net, data = _feature_net(), _data(60)
    ref = reference_stats(net, data)
    cfg = _cfg(total_steps=2, fd_mode="batch", fd_dropout=True)

    def weights(cfg, global_seed):
        torch.manual_seed(global_seed)
        model = _model()
        torch.manual_seed(global_seed)  # the global RNG state during training differs between runs
        return finetune_fd(cfg, model, net, ref, progress=False).model.state_dict()

    a, b = weights(cfg, 1), weights(cfg, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = weights(cfg.replace(seed=1), 1)
    d = weights(cfg.replace(fd_dropout=False), 1)
    assert any(not torch.equal(a[k], c[k]) for k in a) and any(not torch.equal(a[k], d[k]) for k in a)
