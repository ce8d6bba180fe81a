"""Evaluation plumbing: the cached digits feature network (fastcm.fid.digits_net, also the CAS judge), the --out
safety rule and the report writers. Statistics, files and distances are fastcm.fid's (tests/test_fid_stats.py)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastcm.data import load_digits
from fastcm.fid import compute_stats, digits_net
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
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        digits_net.train_classifier(digits[0][:20], digits[1][:20], epochs=0)


def test_digits_features_batches_equal_one_pass():
    x = torch.rand(37, 1, 8, 8) * 2 - 1
    net = digits_net.SmallCNN()
    full = compute_stats(x, net.features, batch_size=1000)
    split = compute_stats(x, net.features, batch_size=5)
    assert full.n == split.n == 37 and full.dim == 64
    torch.testing.assert_close(split.mu, full.mu, rtol=1e-5, atol=1e-6)  # fp32 features, fp64 sums
    torch.testing.assert_close(split.sigma, full.sigma, rtol=1e-5, atol=1e-6)


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


def test_the_held_out_judge_is_another_network_trained_on_the_same_split(digits, tmp_path_factory):
    """The demo's held-out judge: another architecture and seed (no weight shapes in common with SmallCNN), the
    same train split, its own cache entry and feature-space name, so its statistics never mix with "digits"."""
    from fastcm.fid import FeatureStats, feature_extractor, fid
    from fastcm.fid.features import HELDOUT_SEED, digits_feature_network, feature_space_of

    x, y, xt, yt = digits
    tmp_path = tmp_path_factory.getbasetemp() / "fastcm-cache"  # shared with the demo tests: trained once a session
    held, info = digits_feature_network(str(tmp_path), heldout=True)
    small, small_info = digits_feature_network(str(tmp_path))
    assert isinstance(held, digits_net.HeldOutCNN) and info["settings"]["seed"] == HELDOUT_SEED != 0
    assert info["key"] != small_info["key"] and digits_net.accuracy(held, xt, yt) > 0.93
    weights = lambda net: {tuple(p.shape) for p in net.parameters() if p.dim() > 1}  # noqa: E731
    assert not weights(small) & weights(held)
    assert digits_feature_network(str(tmp_path), heldout=True)[1]["cached"]
    ext = feature_extractor("digits-heldout", cache=str(tmp_path))
    assert feature_space_of(ext) == "digits-heldout" and ext(xt[:3]).shape == (3, 48)
    a = FeatureStats.from_features(ext(xt).double(), name="digits-heldout")
    with pytest.raises(ValueError, match="'digits-heldout' statistics but b holds 'digits'"):
        fid(a, FeatureStats.from_features(torch.randn(100, 48, dtype=torch.float64), name="digits"))
