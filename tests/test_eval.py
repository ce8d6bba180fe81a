"""Evaluation plumbing: the cached digits feature network, Gaussian statistics and statistics files, FD against
scipy, the --out safety rule and the report writers."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastcm.data import load_digits
from fastcm.eval import digits_net
from fastcm.eval.features import (compute_features, feature_extractor, frechet, gaussian_stats, load_stats,
                                  save_stats, stats_of)
from fastcm.eval.report import (check_new_file, markdown_table, plot_training_curves, prepare_out_dir,
                                save_samples_npz, write_json)


@pytest.fixture(scope="module")
def digits():
    tr, te = load_digits("train"), load_digits("test")
    return (*tr.get_batch(torch.arange(len(tr))), *te.get_batch(torch.arange(len(te))))


def test_feature_network_is_cached_and_keyed_by_settings_and_data(digits, tmp_path):
    x, y = digits[0][:300], digits[1][:300]
    net, info = digits_net.feature_network(x, y, cache=str(tmp_path), epochs=2)
    assert not info["cached"] and info["settings"]["epochs"] == 2
    again, info2 = digits_net.feature_network(x, y, cache=str(tmp_path), epochs=2)
    assert info2["cached"] and info2["path"] == info["path"]
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in again.parameters())
    # other settings or other training data → another cache entry (so a net is never reused for other data)
    _, other = digits_net.feature_network(x, y, cache=str(tmp_path), epochs=3)
    _, data = digits_net.feature_network(x[:299], y[:299], cache=str(tmp_path), epochs=2)
    assert len({info["key"], other["key"], data["key"]}) == 3
    meta = json.loads(open(info["path"].replace(".safetensors", ".json")).read())
    assert meta["train_size"] == 300 and meta["settings"]["epochs"] == 2


def test_damaged_cache_entry_is_retrained_with_a_warning(digits, tmp_path):
    x, y = digits[0][:200], digits[1][:200]
    _, info = digits_net.feature_network(x, y, cache=str(tmp_path), epochs=1)
    with open(info["path"], "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="retraining"):
        _, info2 = digits_net.feature_network(x, y, cache=str(tmp_path), epochs=1)
    assert not info2["cached"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert digits_net.feature_network(x, y, cache=str(tmp_path), epochs=1)[1]["cached"]


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCM_CACHE", str(tmp_path / "a"))
    assert digits_net.cache_dir() == tmp_path / "a"
    assert digits_net.cache_dir(str(tmp_path / "b")) == tmp_path / "b"
    monkeypatch.delenv("FASTCM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digits_net.cache_dir() == tmp_path / "xdg" / "fastcm"


def test_feature_network_input_checks(digits):
    with pytest.raises(TypeError, match="unknown training setting"):
        digits_net.feature_network(digits[0], digits[1], epochz=3)
    with pytest.raises(ValueError, match="y_train must have shape"):
        digits_net.feature_network(digits[0], digits[1][:10])
    with pytest.raises(ValueError, match="features must be one of"):
        feature_extractor("clip")
    with pytest.raises(ValueError, match="needs --weights"):
        feature_extractor("inception")


def test_gaussian_stats_match_numpy_even_with_a_large_offset():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) + 1e4  # exposes E[xx^T] - mu mu^T cancellation
    mu, sigma = gaussian_stats(torch.from_numpy(f))
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_stats(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(torch.full((3, 2), float("nan")))


def _scipy_fd(mu1, s1, mu2, s2):
    from scipy import linalg

    with warnings.catch_warnings():  # corner pixels of digits never vary: singular, but sqrtm is still accurate here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_matches_scipy_and_the_2x2_closed_form(digits):
    xtr, _, xte, _ = digits
    a, b = gaussian_stats(xtr.flatten(1)), gaussian_stats(xte.flatten(1))
    ref = _scipy_fd(*a, *b)
    assert frechet(a, b) == pytest.approx(ref, rel=1e-6)
    s1, s2 = np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([[1.0, -0.5], [-0.5, 2.0]])
    assert frechet((np.zeros(2), s1), (np.zeros(2), s2)) == pytest.approx(0.8122104140147179, abs=1e-10)


def test_stats_files_round_trip_and_are_checked(tmp_path, digits):
    mu, sigma = gaussian_stats(digits[2].flatten(1))
    path = save_stats(tmp_path / "s.npz", mu, sigma, features="pixels", n=450)
    mu2, sigma2, feats = load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and feats == "pixels"
    with np.load(path) as f:  # pytorch-fid style: plain mu/sigma arrays
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64)
    # stats_of reads a statistics file as is and computes the same numbers from the images
    assert np.array_equal(stats_of(str(path), "pixels")[0], mu)
    mu3, sigma3, n = stats_of("digits:test", "pixels")
    assert n == 450 and np.allclose(mu3, mu) and np.allclose(sigma3, sigma)
    with pytest.raises(ValueError, match="holds 'pixels' statistics"):
        stats_of(str(path), "digits")
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expected arrays 'mu' and 'sigma'"):
        load_stats(tmp_path / "x.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_stats(tmp_path / "bad.npz")


def test_compute_features_batches_equal_one_pass():
    x = torch.rand(37, 1, 8, 8) * 2 - 1
    net = digits_net.SmallCNN()
    full = compute_features(x, net.features, batch_size=1000)
    assert torch.allclose(compute_features(x, net.features, batch_size=5), full, atol=1e-6)
    assert full.dtype == torch.float64 and full.shape == (37, 64)


def test_out_dir_is_never_silently_reused(tmp_path):
    out = tmp_path / "run"
    assert prepare_out_dir(str(out)) == out and out.is_dir()  # a new (or empty) directory is fine
    (out / "report.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_out_dir(str(out))
    assert prepare_out_dir(str(out), overwrite=True) == out
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_out_dir(str(tmp_path / "file"), overwrite=True)
    a = prepare_out_dir(None, root=str(tmp_path / "runs"), prefix="demo")
    (a / "x").write_text("1")
    b = prepare_out_dir(None, root=str(tmp_path / "runs"), prefix="demo")
    assert a != b and a.parent == b.parent == tmp_path / "runs" and a.name.startswith("demo-")
    with pytest.raises(FileExistsError, match="exists"):
        check_new_file(a / "x", suffix=None)
    with pytest.raises(ValueError, match="must end in .npz"):
        check_new_file(tmp_path / "s.txt", suffix=".npz")


def test_report_writers(tmp_path):
    write_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": float("nan"), "c": np.arange(3), "d": (1, True)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1.5, "b": None, "c": [0, 1, 2], "d": [1, True]}
    with pytest.raises(TypeError, match="cannot write a object"):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    table = markdown_table(["a", "b"], [[1, 0.123456], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x | — |"]
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    save_samples_npz(tmp_path / "s.npz", x, torch.arange(6))
    with np.load(tmp_path / "s.npz") as f:
        assert f["x"].dtype == np.float32 and f["y"].dtype == np.int64 and np.allclose(f["x"], x.numpy())
    ict = [{"step": s, "loss": 1.0 / s, "N": 11 if s < 50 else 21} for s in range(10, 101, 10)]
    fd = [{"step": s, "fd": 30.0 - s} for s in (5, 10, 15)]
    path = plot_training_curves(tmp_path / "curves.png", ict, fd)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 200
