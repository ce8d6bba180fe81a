"""`fastcm train --eval-every`, `fastcm sample/fid --checkpoint RUN/best`: the best checkpoint of a CLI run, its FID
reproduced by `fastcm fid --checkpoint` from the same seeds, and one-line errors for the options' mistakes."""
import json

import pytest

from fastcm.cli import main
from fastcm.cli.generate import resolve_checkpoint


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step CLI run of the tiny preset with an evaluation every 2 steps in pixel space."""
    tmp = tmp_path_factory.mktemp("cli-eval")
    assert main(["stats", "digits:test", "--features", "pixels", "--out", str(tmp / "ref.npz")]) == 0
    argv = ["train", "--data", "digits", "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--seed", "2",
            "--eval-every", "2", "--eval-stats", str(tmp / "ref.npz"), "--eval-samples", "20", "--out",
            str(tmp / "run"), "--no-progress"]
    assert main(argv) == 0
    return tmp


def test_train_keeps_the_best_and_fid_reproduces_it(trained, capsys):
    run_dir, ref = trained / "run", trained / "ref.npz"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_seconds" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    best = json.loads((run_dir / "config.json").read_text())["best"]
    assert best["path"] == "checkpoints/best.safetensors" and best["value"] == min(r["fid_1step"] for r in evals)
    assert json.loads((run_dir / "config.json").read_text())["config"]["eval_stats"] == str(ref)
    # the same seeds and batches as the run's evaluation: the logged value, from the best file, to rounding
    rc, out, err = run(capsys, "fid", ref, "--checkpoint", run_dir / "best", "--seed", 2, "-n", 20, "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["features"] == "pixels" and got["checkpoint"].endswith("checkpoints/best.safetensors")
    assert got["1_step"] == pytest.approx(best["value"], rel=1e-9)
    two = next(r["fid_2step"] for r in evals if r["step"] == best["step"])
    assert got["2_step"] == pytest.approx(two, rel=1e-9)
    rc, out, err = run(capsys, "sample", "--checkpoint", run_dir / "best", "-n", 4, "--out", trained / "s")
    assert rc == 0 and (trained / "s" / "samples.npz").is_file(), err
    assert resolve_checkpoint(str(run_dir)) == run_dir / "checkpoints" / "ckpt_00000004.safetensors"  # newest
    assert resolve_checkpoint(str(run_dir / "checkpoints")) == resolve_checkpoint(str(run_dir))


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "2", "--eval-every", "2"], "--eval-every needs --eval-stats FILE"),
    (["train", "--steps", "2", "--eval-samples", "5"], "--eval-samples take effect with --eval-every"),
    (["train", "--steps", "2", "--eval-every", "1", "--eval-stats", "{tmp}/nowhere.npz"], "does not exist"),
    (["train", "--steps", "2", "--eval-every", "1", "--eval-stats", "{ref}", "--eval-steps", "1,x"],
     "--eval-steps must be sampler step counts"),
    (["train", "--steps", "2", "--feature-weights", "w.pth"], "--feature-weights is the Inception weight file"),
    (["sample", "--checkpoint", "{tmp}/best"], "best.safetensors does not exist (a run keeps a best"),
    (["sample", "--checkpoint", "{tmp}"], "a directory without checkpoints"),
    (["fid", "{ref}", "{ref}", "--checkpoint", "{run}/best"], "take B's place"),
    (["fid", "{ref}"], "fid needs two sources"),
    (["fid", "{ref}", "--checkpoint", "{run}/best", "--features", "digits"], "holds pixels statistics"),
])
def test_eval_option_mistakes_are_one_line(trained, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, ref=trained / "ref.npz", run=trained / "run") for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "out"), "--no-progress"]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_fd_stage_starts_from_the_best_and_evaluates(trained, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("FASTCM_CACHE", str(tmp_path_factory.getbasetemp() / "fastcm-cache"))  # the shared digits CNN
    out = trained / "fd"
    rc, stdout, err = run(capsys, "train", "--stage", "fd", "--init", trained / "run" / "best", "--data", "digits",
                          "--steps", 2, "--batch-size", 20, "--eval-every", 1, "--eval-stats", trained / "ref.npz",
                          "--eval-samples", 20, "--eval-steps", 2, "--out", out, "--no-progress")
    assert rc == 0, err
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_seconds" in r]
    assert [r["step"] for r in evals] == [0, 1, 2] and all("fid_2step" in r and "fid_1step" not in r for r in evals)
    assert "best: fid_2step" in stdout and (out / "checkpoints" / "best.safetensors").is_file()
