"""FeatureStats (streaming fp64 moments, merge, files, 2-process all_reduce), the differentiable all-gather of the
FD loss under torch.distributed, and the fid() convenience function."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastcm.fid import FDLoss, FeatureStats, all_gather_with_grad, compute_stats, fid, frechet_distance

F64 = torch.float64


def _features(n, d=6, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) + offset


def _np_stats(x):
    x = x.numpy()
    return x.mean(0), np.cov(x, rowvar=False, ddof=1)


def _assert_stats(stats, x, rtol=1e-10):
    mu, sigma = _np_stats(x)
    np.testing.assert_allclose(stats.mu.numpy(), mu, rtol=rtol, atol=rtol * np.abs(mu).max())
    np.testing.assert_allclose(stats.sigma.numpy(), sigma, rtol=rtol, atol=rtol * np.abs(sigma).max())
    assert stats.n == x.shape[0]


def test_streaming_equals_np_cov_with_large_mean():
    # +1e4 offset: the E[x x^T] - mu mu^T form would lose ~8 digits to cancellation; shifted sums lose none.
    x = _features(300, seed=1, offset=1e4)
    stats = FeatureStats(6)
    for chunk in x.split([3, 50, 1, 46, 200]):
        stats.update(chunk.float() if chunk.shape[0] == 1 else chunk)  # any float dtype is accepted
    x[53] = x[53].float().double()  # the row that went in as fp32
    _assert_stats(stats, x)
    assert stats.mu.dtype == F64 and torch.equal(stats.sigma, stats.sigma.T)


def test_batch_split_does_not_matter():
    x = _features(120, seed=2)
    whole = FeatureStats(6).update(x)
    split = FeatureStats(6)
    for chunk in x.split(7):
        split.update(chunk)
    torch.testing.assert_close(split.mu, whole.mu, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(split.sigma, whole.sigma, rtol=1e-12, atol=1e-13)


def test_merge_equals_stats_of_concatenation():
    a, b = _features(50, seed=3), _features(70, seed=4, offset=5.0)
    merged = FeatureStats(6).update(a).merge(FeatureStats(6).update(b))
    _assert_stats(merged, torch.cat([a, b]))
    assert FeatureStats(6).merge(FeatureStats(6).update(a)).n == 50
    assert FeatureStats(6).update(a).merge(FeatureStats(6)).n == 50
    # Statistics rebuilt from (mu, sigma, n) merge exactly too.
    rebuilt = FeatureStats.from_moments(*_np_stats(a), n=50)
    _assert_stats(rebuilt.merge(FeatureStats(6).update(b)), torch.cat([a, b]))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    x = _features(40, seed=5)
    stats = FeatureStats(6).update(x)
    path = stats.save(tmp_path / f"stats{suffix}")
    loaded = FeatureStats.load(path)
    assert loaded.n == 40 and loaded.dim == 6
    torch.testing.assert_close(loaded.mu, stats.mu, rtol=0, atol=0)
    torch.testing.assert_close(loaded.sigma, stats.sigma, rtol=1e-15, atol=0)
    _assert_stats(loaded.update(_features(10, seed=6)), torch.cat([x, _features(10, seed=6)]))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        stats.save(path)
    stats.save(path, overwrite=True)


def test_pytorch_fid_npz_layout(tmp_path):
    x = _features(30, seed=7)
    path = FeatureStats(6).update(x).save(tmp_path / "ours.npz")
    with np.load(path) as f:  # what pytorch-fid's calculate_frechet_distance reads
        mu, sigma = _np_stats(x)
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-12)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-10)
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, mu=mu.astype(np.float32), sigma=sigma)  # pytorch-fid --save-stats: no sample count
    loaded = FeatureStats.load(theirs)
    assert loaded.n is None
    torch.testing.assert_close(loaded.mu, torch.from_numpy(mu.astype(np.float32)).double())
    with pytest.raises(ValueError, match="without a sample count"):
        loaded.update(x)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        FeatureStats(3).update(_features(4, 3)).save(tmp_path / "stats.pkl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"missing \['mu', 'sigma'\]"):
        FeatureStats.load(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        FeatureStats.load(tmp_path / "broken.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="mu must be"):
        FeatureStats.load(tmp_path / "shape.npz")


def test_input_errors():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="empty"):
        stats.mu
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.sigma
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        stats.update(torch.zeros(3, 5))
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf in 1 of 3 rows"):
        stats.update(bad)
    with pytest.raises(TypeError, match="floating"):
        stats.update(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        FeatureStats(0)
    with pytest.raises(ValueError, match="other has dim 3"):
        stats.merge(FeatureStats(3))


def test_fid_convenience(tmp_path):
    a, b = _features(80, seed=8), _features(90, seed=9, offset=0.5)
    expected = frechet_distance(*_np_stats(a), *_np_stats(b)).item()
    assert fid(a, b) == pytest.approx(expected, rel=1e-10)
    path = FeatureStats(6).update(b).save(tmp_path / "b.npz")
    assert fid(FeatureStats(6).update(a), path) == pytest.approx(expected, rel=1e-10)
    assert fid(_np_stats(a), path) == pytest.approx(expected, rel=1e-10)


def test_image_ranges_all_reach_the_extractor_in_minus_one_to_one():
    # Every extractor takes [-1, 1] images; uint8 (0..255) and image_range=(0, 1) floats are mapped there first.
    g = torch.Generator().manual_seed(10)
    images = torch.randint(0, 256, (20, 3, 4, 4), generator=g, dtype=torch.uint8)
    signed = images.float() / 127.5 - 1
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    with torch.no_grad():
        feats = net(signed).double()
    _assert_stats(compute_stats(images, net, batch_size=7), feats)
    _assert_stats(compute_stats(signed, net, batch_size=7), feats)
    _assert_stats(compute_stats((signed + 1) / 2, net, batch_size=7, image_range=(0, 1)), feats, rtol=1e-5)
    expected = frechet_distance(*_np_stats(feats), *_np_stats(feats[:10])).item()
    for x, kw in ((images, {}), (signed, {}), ((signed + 1) / 2, {"image_range": (0, 1)})):
        assert fid(x, feats[:10], features=net, **kw) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"float images must be in \[-1, 1\].*image_range=\(0, 1\)"):
        fid(signed * 2, feats, features=net)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        fid(signed, feats, features=net, image_range=(0, 1))
    with pytest.raises(ValueError, match="image_range must be one of"):
        fid(signed, feats, features=net, image_range=(0, 255))


def test_fid_takes_the_samplers_output_directly():
    from fastcm.cm import ConsistencyModel, sample
    from fastcm.fid import PixelFeatures, feature_extractor
    from fastcm.models import build_unet

    torch.manual_seed(0)
    model = ConsistencyModel(build_unet("tiny"))
    x = sample(model, 24, sigmas=(80.0, 0.821), seeds=0, batch_size=12)
    assert x.min() < 0  # the sampler's range is [-1, 1], not [0, 1]
    ref = FeatureStats.from_features(_features(30, d=64, seed=11))
    expected = frechet_distance(*_np_stats(x.flatten(1).double()), ref.mu, ref.sigma).item()
    assert fid(x, ref, features=PixelFeatures()) == pytest.approx(expected, rel=1e-9)
    assert fid(sample(model, 24, sigmas=(80.0, 0.821), seeds=0), "digits:test",
               features=feature_extractor("pixels")) > 0


def test_datasets_and_dataset_strings_as_sources(tmp_path):
    from fastcm.data import load_digits
    from fastcm.fid import PixelFeatures, dataset_stats

    test = load_digits("test")
    x = test.get_batch(torch.arange(len(test)))[0]
    pixels = PixelFeatures()
    assert abs(fid("digits:test", test, features=pixels)) < 1e-9  # identical statistics; round-off only
    expected = frechet_distance(*_np_stats(x.flatten(1).double()), *_np_stats(
        load_digits("train").get_batch(torch.arange(1347))[0].flatten(1).double())).item()
    assert fid(x, "digits:train", features=pixels) == pytest.approx(expected, rel=1e-9)
    assert fid(x, "digits", features=pixels) == pytest.approx(expected, rel=1e-9)  # the default split is train
    stats = dataset_stats("digits:test", "pixels")
    assert stats.n == 450 and stats.features == "pixels"
    path = stats.save(tmp_path / "test.safetensors")
    assert dataset_stats(path, "pixels").features == "pixels"
    with pytest.raises(ValueError, match="holds 'pixels' statistics but 'digits' features"):
        dataset_stats(path, "digits")
    with pytest.raises(ValueError, match="unknown dataset 'digits:val'"):
        fid("digits:val", x, features=pixels)


def test_collapsed_image_sets_give_the_squared_mean_distance():
    # Constant images: both covariances are 0, FD = ||mu1 - mu2||^2.
    from fastcm.fid import PixelFeatures

    a, b = torch.full((10, 1, 4, 4), -0.5), torch.full((12, 1, 4, 4), 0.25)
    assert fid(a, b, features=PixelFeatures()) == pytest.approx(16 * 0.75 ** 2, rel=1e-14)
    assert fid(a, a[:3], features=PixelFeatures()) == 0.0


def test_statistics_files_keep_the_feature_space_and_refuse_asymmetry(tmp_path):
    stats = FeatureStats.from_features(_features(20, seed=12), name="digits")
    for suffix in (".npz", ".safetensors"):
        loaded = FeatureStats.load(stats.save(tmp_path / f"s{suffix}"))
        assert loaded.features == "digits" and loaded.n == 20
    mu, sigma = _np_stats(_features(200, d=30, seed=13))
    bad = sigma.copy()
    bad[2, 11] += 2e-3 * np.linalg.norm(sigma)  # 2e-3 relative asymmetry: rejected, not symmetrised
    with pytest.raises(ValueError, match="sigma must be symmetric"):
        FeatureStats.from_moments(mu, bad)
    np.savez(tmp_path / "asym.npz", mu=mu, sigma=bad)
    with pytest.raises(ValueError, match="asym.npz: sigma must be symmetric"):
        FeatureStats.load(tmp_path / "asym.npz")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_feature_extractors(monkeypatch):
    from fastcm.fid import FEATURES, WEIGHTS_ENV, DigitsFeatures, feature_extractor
    from fastcm.fid.digits_net import SmallCNN

    assert FEATURES == ("digits", "pixels", "inception", "digits-heldout")
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(feature_extractor("pixels")(x), x.flatten(1))
    with pytest.raises(ValueError, match="features must be one of"):
        feature_extractor("clip")
    with pytest.raises(ValueError, match="weights are only for inception"):
        feature_extractor("pixels", weights="w.pth")
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="needs --weights PATH"):
        feature_extractor("inception")
    with pytest.raises(ValueError, match="1x8x8 images"):
        DigitsFeatures(SmallCNN())(torch.zeros(2, 3, 8, 8))


# -- torch.distributed: two gloo processes ------------------------------------------------------------------------

def _distributed_worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = torch.cat([_features(13, d=5, seed=20), _features(9, d=5, seed=21, offset=1e4)])
        local = full[:13] if rank == 0 else full[13:]  # uneven shares, very different means
        stats = FeatureStats(5).update(local).all_reduce()
        _assert_stats(stats, full)
        empty = FeatureStats(5).update(local) if rank == 0 else FeatureStats(5)  # a rank with no samples
        _assert_stats(empty.all_reduce(), full[:13])
        # FD loss on the gathered global batch: same value on every rank, each rank's gradient = its rows of the
        # single-process gradient.
        x = torch.cat([_features(7, d=5, seed=22), _features(4, d=5, seed=23)]) * 0.1
        mu_r, s_r = _features(50, d=5, seed=24).mean(0), torch.cov(_features(50, d=5, seed=24).T)
        rows = slice(0, 7) if rank == 0 else slice(7, 11)
        for mode in ("batch", "queue"):
            mine = x[rows].clone().requires_grad_()
            loss = FDLoss(mu_r, s_r, mode=mode, queue_dtype=F64)(mine)
            loss.backward()
            whole = x.clone().requires_grad_()
            single = FDLoss(mu_r, s_r, mode=mode, queue_dtype=F64, distributed=False)(whole)
            single.backward()
            torch.testing.assert_close(loss, single, rtol=1e-12, atol=0)
            torch.testing.assert_close(mine.grad, whole.grad[rows], rtol=1e-10, atol=1e-12)
        assert torch.equal(all_gather_with_grad(local), full)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo(tmp_path):
    init_file = tmp_path / "init"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_distributed_worker, args=(2, str(init_file)), nprocs=2, join=True)
