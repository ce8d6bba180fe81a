"""The `fastcm` command at tiny sizes: every subcommand's --help, errors that say what to fix, and each command's
files and numbers checked against independent references (numpy/scipy/scikit-learn)."""
import json
import textwrap
import warnings

import numpy as np
import pytest
import torch

from fastcm.cli import main
from fastcm.data import load_digits

COMMANDS = ("demo", "train", "sample", "edit", "stats", "fid", "cas", "bench")


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    # one feature-network cache for the whole test session (the net trains once), never the user's own cache
    monkeypatch.setenv("FASTCM_CACHE", str(tmp_path_factory.getbasetemp() / "fastcm-cache"))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fastcm {command}") and "--" in text


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


def test_argparse_rejects_bad_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fid", "a", "b", "--features", "clip"])
    assert e.value.code == 2 and "invalid choice: 'clip'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["fid", "missing.npz", "digits:test", "--features", "pixels"], "does not exist"),
    (["fid", "digits:test", "nowhere", "--features", "pixels"], "unknown dataset 'nowhere': expected one of digits"),
    (["fid", "digits", "digits:test", "--features", "inception"], "needs --weights PATH"),
    (["stats", "digits:test", "--out", "{tmp}/s.txt"], "must end in .npz"),
    (["cas", "--synthetic", "{tmp}/none.npz"], "does not exist"),
    (["cas", "--synthetic", "{tmp}/real.npz", "--real", "folder:{tmp}/x"], "is not a directory"),
    (["sample", "--checkpoint", "{tmp}/none.safetensors"], "does not exist"),
    (["train", "--data", "cifar10:{tmp}/nothing", "--out", "{tmp}/run"], "cifar"),
    (["train", "--data", "digits", "--preset", "cifar10-small", "--steps", "1", "--out", "{tmp}/r"],
     "pick a preset of that shape"),
    (["bench", "--benchmarks", "{tmp}"], "no benchmark suites"),
])
def test_errors_say_what_to_fix(argv, message, tmp_path, capsys):
    te = load_digits("test")
    np.savez(tmp_path / "real.npz", x=te.images.numpy(), y=te.labels.numpy())
    rc, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2
    assert err.startswith(f"fastcm {argv[0]}: error: ") and message.lower() in err.lower(), err
    assert "Traceback" not in err


def _scipy_fd(a, b):
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # corner pixels of digits never vary: singular, but sqrtm is still accurate here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(covmean))


def test_fid_and_stats_in_pixel_space_match_scipy(tmp_path, capsys):
    tr, te = load_digits("train"), load_digits("test")
    ref = _scipy_fd(tr.images.flatten(1).double().numpy(), te.images.flatten(1).double().numpy())
    rc, out, _ = run(capsys, "fid", "digits:train", "digits:test", "--features", "pixels", "--json")
    assert rc == 0 and json.loads(out)["fd"] == pytest.approx(ref, rel=1e-6)
    # the same through a statistics file and through an .npz of images
    rc, out, _ = run(capsys, "stats", "digits:train", "--features", "pixels", "--out", tmp_path / "train.npz")
    assert rc == 0 and "1347 images" in out
    np.savez(tmp_path / "test_images.npz", x=te.images.numpy())
    rc, out, _ = run(capsys, "fid", tmp_path / "train.npz", tmp_path / "test_images.npz", "--features", "pixels")
    assert rc == 0 and float(out.split(":")[-1]) == pytest.approx(ref, rel=1e-5)
    rc, _, err = run(capsys, "stats", "digits:train", "--features", "pixels", "--out", tmp_path / "train.npz")
    assert rc == 2 and "--overwrite" in err
    rc, _, err = run(capsys, "fid", tmp_path / "train.npz", "digits:test", "--features", "digits")
    assert rc == 2 and "holds 'pixels' statistics" in err


def test_fid_reads_image_folders(tmp_path, capsys):
    from PIL import Image

    te = load_digits("test")
    pixels = ((te.images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()  # what a PNG can hold
    for i, (img, label) in enumerate(zip(pixels, te.labels.tolist())):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(tmp_path / "imgs" / str(label) / f"{i}.png")
    a = (pixels.reshape(len(pixels), -1).astype(np.float64) / 127.5 - 1.0)
    ref = _scipy_fd(a, te.images.flatten(1).double().numpy())
    rc, out, err = run(capsys, "fid", f"folder:{tmp_path / 'imgs'}", "digits:test", "--features", "pixels", "--json")
    assert rc == 0, err
    assert json.loads(out)["fd"] == pytest.approx(ref, rel=1e-4, abs=1e-9) and json.loads(out)["n_a"] == 450


def test_fid_digits_features_of_identical_sets_is_zero_and_of_noise_is_large(tmp_path, capsys):
    rc, out, _ = run(capsys, "fid", "digits:test", "digits:test", "--json")
    assert rc == 0 and abs(json.loads(out)["fd"]) < 1e-6
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "noise.npz", x=(torch.rand(450, 1, 8, 8, generator=g) * 2 - 1).numpy())
    rc, out, _ = run(capsys, "fid", tmp_path / "noise.npz", "digits:test", "--json")
    rc2, out2, _ = run(capsys, "fid", "digits:train", "digits:test", "--json")
    assert json.loads(out)["fd"] > 10 * json.loads(out2)["fd"] > 0


def test_cas_command_reports_three_arms(tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    tr, te = load_digits("train"), load_digits("test")
    x, y = tr.images[:500], tr.labels[:500]
    np.savez(tmp_path / "syn.npz", x=x.numpy(), y=y.numpy())
    rc, out, _ = run(capsys, "cas", "--synthetic", tmp_path / "syn.npz", "--judge", "logreg", "--seeds", "0",
                     "--json", tmp_path / "cas.json")
    assert rc == 0 and "real + synthetic beats real alone" in out
    res = json.loads((tmp_path / "cas.json").read_text())
    clf = LogisticRegression(max_iter=5000).fit(x.flatten(1).double().numpy(), y.numpy())
    assert res["synthetic"]["mean"] == pytest.approx(clf.score(te.images.flatten(1).double().numpy(),
                                                               te.labels.numpy()))
    assert res["synthetic"]["train_size"] == 500 and res["real+synthetic"]["train_size"] == 1847
    np.savez(tmp_path / "nolabels.npz", x=x.numpy())
    rc, _, err = run(capsys, "cas", "--synthetic", tmp_path / "nolabels.npz")
    assert rc == 2 and "needs an array y" in err


def test_train_sample_edit_round_trip(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--preset", "digits", "--steps", 2, "--batch-size", 8, "--out", run_dir,
                       "--no-progress")
    assert rc == 0, err
    ckpt = next((run_dir / "checkpoints").glob("*.safetensors"))
    assert str(ckpt) in out and (run_dir / "metrics.jsonl").is_file()
    rc, out, err = run(capsys, "sample", "--checkpoint", ckpt, "--per-class", 2, "--steps", 2, "--out",
                       tmp_path / "s")
    assert rc == 0, err
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["x"].shape == (20, 1, 8, 8) and f["x"].dtype == np.float32
        assert np.abs(f["x"]).max() <= 1 and f["y"].tolist() == sorted(list(range(10)) * 2)
    assert (tmp_path / "s" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    rc, out, err = run(capsys, "edit", "--checkpoint", ckpt, "--task", "inpaint", "-n", 4, "--out", tmp_path / "e")
    assert rc == 0, err
    with np.load(tmp_path / "e" / "edited.npz") as f:
        top = slice(0, 4)
        assert np.array_equal(f["x"][:, :, top], f["original"][:, :, top])  # the kept half is exact
        assert f["x"].shape == f["original"].shape == (4, 1, 8, 8)
    rc, _, err = run(capsys, "edit", "--checkpoint", ckpt, "--task", "colorize", "--out", tmp_path / "c")
    assert rc == 2 and "3-channel" in err
    rc, _, err = run(capsys, "sample", "--checkpoint", ckpt, "--out", tmp_path / "s")
    assert rc == 2 and "not empty" in err
    # stage 2 from the stage-1 checkpoint, in the digits-classifier feature space
    rc, out, err = run(capsys, "train", "--stage", "fd", "--init", ckpt, "--steps", 2, "--batch-size", 20,
                       "--out", tmp_path / "fd", "--no-progress")
    assert rc == 0, err
    assert "digits feature space" in out and next((tmp_path / "fd" / "checkpoints").glob("*.safetensors"))
    records = [json.loads(line) for line in (tmp_path / "fd" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["fd"] > 0
    rc, _, err = run(capsys, "train", "--stage", "fd", "--out", tmp_path / "fd2")
    assert rc == 2 and "--init CHECKPOINT" in err


def test_bench_runs_pytest_benchmark_and_the_report(tmp_path, capfd):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_tiny.py").write_text(textwrap.dedent("""
        import os
        def test_sum(benchmark):
            assert os.environ.get("BENCH_SMOKE") == "1"
            benchmark(sum, range(10))
    """))
    (bench / "report.py").write_text(textwrap.dedent("""
        import json, sys
        run = json.load(open(sys.argv[1]))
        print("REPORT", len(run["benchmarks"]), sys.argv[2:])
    """))
    rc = main(["bench", "--benchmarks", str(bench), "--smoke", "--json", str(tmp_path / "run.json")])
    assert rc == 0
    assert json.loads((tmp_path / "run.json").read_text())["benchmarks"][0]["name"] == "test_sum"
    assert "REPORT 1 ['--smoke']" in capfd.readouterr().out



def test_fid_inception_features_wiring(tmp_path, capsys, monkeypatch):
    """--features inception hands --weights to fastcm.fid.inception_v3 and feeds it the images in [-1, 1] (grey ones
    as they are: the network repeats them over 3 channels). A cheap stand-in network replaces the 2048-d Inception-v3
    here: a real forward pass at 299x299 costs seconds per image on a busy 2-core CPU, and fastcm.fid's own tests
    cover the network."""
    import fastcm.fid.inception

    seen = {}

    class StandIn(torch.nn.Module):
        def forward(self, x):
            assert x.shape[1] in (1, 3) and x.min() >= -1 and x.max() <= 1 and x.min() < 0
            x = x.expand(-1, 3, -1, -1)
            seen.setdefault("calls", 0)
            seen["calls"] += 1
            return torch.cat([x.mean((2, 3)), x.amax((2, 3)), x[:, :, :2, :2].flatten(1)], 1)

    def fake_inception_v3(weights=None, device=None):
        seen["weights"] = weights
        return StandIn()

    monkeypatch.setattr(fastcm.fid.inception, "inception_v3", fake_inception_v3)
    g = torch.Generator().manual_seed(1)
    grey, rgb = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.rand(30, 3, 8, 8, generator=g) * 2 - 1
    np.savez(tmp_path / "a.npz", x=grey.numpy())
    np.savez(tmp_path / "b.npz", x=rgb.numpy())
    rc, out, err = run(capsys, "fid", tmp_path / "a.npz", tmp_path / "b.npz", "--features", "inception",
                       "--weights", tmp_path / "w.pth", "--json")
    assert rc == 0, err
    assert seen["weights"] == str(tmp_path / "w.pth") and seen["calls"] == 2
    f = StandIn()
    fa, fb = f(grey).double().numpy(), f(rgb).double().numpy()
    assert json.loads(out)["fd"] == pytest.approx(_scipy_fd(fa, fb), rel=1e-6)


def test_train_is_a_function_of_seed(tmp_path, capsys):
    """Initial weights and training noise both come from --seed: equal seeds give bit-identical checkpoints, and
    the global RNG state of the calling process plays no part."""
    from safetensors.torch import load_file

    def train(seed, name):
        torch.manual_seed(1234 + len(name))  # a different global RNG state before every run
        rc, _, err = run(capsys, "train", "--preset", "digits", "--steps", 1, "--batch-size", 4, "--seed", seed,
                         "--out", tmp_path / name, "--no-progress")
        assert rc == 0, err
        state = load_file(next((tmp_path / name / "checkpoints").glob("*.safetensors")))
        return {k: v for k, v in state.items() if not k.startswith("rng/")}  # the process RNG, saved for resume

    a, b, c = train(3, "a"), train(3, "bb"), train(4, "c")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("method", ("sct", "meanflow"))
def test_train_method_sample_and_fd_stage(method, tmp_path, capsys):
    from fastcm.train import read_checkpoint_meta

    run_dir = tmp_path / "run"
    extra = ["--tangent-warmup", 1] if method == "sct" else []
    rc, out, err = run(capsys, "train", "--method", method, *extra, "--preset", "tiny", "--steps", 2,
                       "--batch-size", 8, "--out", run_dir, "--no-progress")
    assert rc == 0, err
    assert f"trained 2 steps ({method} stage)" in out
    ckpt = next((run_dir / "checkpoints").glob("*.safetensors"))
    meta = read_checkpoint_meta(ckpt)
    assert meta["method"] == method and meta["config"]["method"] == method
    assert meta["config"]["tangent_warmup"] == (1 if method == "sct" else 1000)
    rc, out, err = run(capsys, "sample", "--checkpoint", ckpt, "-n", 6, "--steps", 2, "--out", tmp_path / "s")
    assert rc == 0 and f"{method} sampler" in out, err
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["x"].shape == (6, 1, 8, 8) and np.abs(f["x"]).max() <= 1
    rc, _, err = run(capsys, "sample", "--checkpoint", ckpt, "--sigmas", 80, "--out", tmp_path / "s2")
    assert rc == 2 and "--sigmas are iCT noise levels" in err
    rc, _, err = run(capsys, "edit", "--checkpoint", ckpt, "--task", "inpaint", "--out", tmp_path / "e")
    assert rc == 2 and f"is a {method} model" in err and not (tmp_path / "e").exists()
    rc, out, err = run(capsys, "train", "--stage", "fd", "--init", ckpt, "--steps", 1, "--batch-size", 20,
                       "--out", tmp_path / "fd", "--no-progress")
    assert rc == 0, err
    assert read_checkpoint_meta(next((tmp_path / "fd" / "checkpoints").glob("*.safetensors")))["method"] == method


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "meanflow", "--tangent-warmup", "5"], "--tangent-warmup is sCT's"),
    (["train", "--stage", "fd", "--method", "sct"], "--method and --tangent-warmup belong to --stage ict"),
    (["demo", "--compare", "--method", "sct"], "--compare trains every method"),
])
def test_method_option_errors(argv, message, tmp_path, capsys):
    rc, _, err = run(capsys, *argv, "--out", tmp_path / "x")
    assert rc == 2 and message in err, err
