"""`fastcm demo` at reduced size: the files and report fields exist and are well formed, and the reported metrics
equal independent recomputations from the saved .npz files (scipy sqrtm FD, scikit-learn logistic regression).

The quality goals themselves (one-step CAS >= 0.92, FD fine-tune lowering the feature FD by >= 20 %) need the full
default run (`make demo`, ~10 minutes); its measured numbers are in the README.
"""
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastcm.cli import main
from fastcm.data import load_digits

PER_CLASS = 10
STAGES = ("one_step", "two_step", "fd_finetuned")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cache = tmp_path_factory.getbasetemp() / "fastcm-cache"  # shared with the other test files of the session
    argv = ["demo", "--out", out, "--steps", 12, "--batch-size", 16, "--fd-steps", 3, "--fd-batch-size", 20,
            "--per-class", PER_CLASS, "--cas-seeds", 2, "--cas-epochs", 2, "--cache", cache, "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    return out, json.loads((out / "report.json").read_text()), cache


def test_files_are_written(demo):
    out, report, _ = demo
    for name in ("report.json", "report.md", "training_curves.png"):
        assert (out / name).is_file(), name
    for stage in STAGES:
        with np.load(out / f"samples_{stage}.npz", allow_pickle=False) as f:
            x, y = f["x"], f["y"]
        assert x.shape == (10 * PER_CLASS, 1, 8, 8) and x.dtype == np.float32
        assert y.shape == (10 * PER_CLASS,) and y.dtype == np.int64
        assert np.abs(x).max() <= 1.0 and np.array_equal(y, np.repeat(np.arange(10), PER_CLASS))
        with Image.open(out / f"samples_{stage}.png") as im:  # one row per class: 10 rows of 8x8 cells at scale 4
            assert im.format == "PNG" and im.size[1] == 10 * 33 + 1
    assert (out / report["checkpoints"]["ict"]).is_file()
    assert (out / report["checkpoints"]["fd_finetuned"]).is_file()


def test_report_fields(demo):
    out, report, _ = demo
    assert report["seed"] == 0 and report["config"]["ict_steps"] == 12
    assert report["data"]["train_size"] == 1347 and report["data"]["test_size"] == 450
    for key in ("real_train_split", *STAGES):
        m = report["metrics"][key]
        assert 0 <= m["cas"] <= 1 and m["fd_features"] >= 0 and m["fd_pixels"] >= 0 and len(m["cas_per_class"]) == 10
    assert report["feature_network"]["test_accuracy"] > 0.95
    q = report["quality"]
    one, fd = report["metrics"]["one_step"], report["metrics"]["fd_finetuned"]
    # the FD stage is judged in the held-out judge's feature space, never in the space it optimised
    assert q["fd_reduction"]["metric"] == "fd_heldout" and all("fd_heldout" in report["metrics"][k] for k in STAGES)
    assert q["fd_reduction"]["value"] == pytest.approx((one["fd_heldout"] - fd["fd_heldout"]) / one["fd_heldout"])
    assert report["fd_stage"]["optimised"] == "digits" and report["fd_stage"]["judged_by"] == "digits-heldout"
    assert q["fd_optimised_space"]["relative_change"] == pytest.approx(
        (fd["fd_features"] - one["fd_features"]) / one["fd_features"])
    assert report["heldout_network"]["settings"]["seed"] != report["feature_network"]["settings"].get("seed", 0)
    assert q["one_step_cas"]["passed"] == (one["cas"] >= 0.92)
    assert q["all_passed"] == all(q[k]["passed"] for k in ("one_step_cas", "fd_reduction", "cas_kept"))
    assert ("fell" in q["pixel_fd"]["statement"]) == (fd["fd_pixels"] < one["fd_pixels"] * 0.98)
    p = report["cas_protocol"]
    assert p["seeds"] == [0, 1] and p["real+synthetic"]["train_size"] == 1347 + 10 * PER_CLASS
    assert set(report["timings_s"]) >= {"stage 1: iCT training", "stage 2: FD-loss fine-tune", "total"}
    assert [r["step"] for r in report["curves"]["ict"]][-1] == 12
    # FID while training against the test split: stage 1 at step 0 and its last step, stage 2 at every log step
    evals = {k: [r for r in v if "eval_seconds" in r] for k, v in report["curves"].items()}
    assert [r["step"] for r in evals["ict"]] == [0, 12] and [r["step"] for r in evals["fd"]] == [0, 1, 2, 3]
    assert all(r["fid_1step"] > 0 and r["fid_2step"] > 0 and r["eval_samples"] == 450 for v in evals.values()
               for r in v)
    assert report["best"]["fd"]["value"] == min(r["fid_1step"] for r in evals["fd"])
    assert (out / report["checkpoints"]["best_fd"]).is_file() and (out / report["checkpoints"]["best_ict"]).is_file()
    assert "## FID while training" in (out / "report.md").read_text()


def _fd(a, b):
    from scipy import linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # pixel covariances are singular (corner pixels never vary)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("stage", STAGES)
def test_metrics_match_independent_recomputation(demo, stage):
    from sklearn.linear_model import LogisticRegression

    from fastcm.fid import digits_feature_network

    out, report, cache = demo
    m = report["metrics"][stage]
    with np.load(out / f"samples_{stage}.npz") as f:
        x, y = f["x"].astype(np.float64), f["y"]
    te = load_digits("test")
    xt, yt = te.images.double().numpy(), te.labels.numpy()
    assert m["fd_pixels"] == pytest.approx(_fd(x.reshape(len(x), -1), xt.reshape(len(xt), -1)), rel=1e-5, abs=1e-8)
    net, _ = digits_feature_network(str(cache))
    with torch.no_grad():
        fx, ft = (net.features(torch.from_numpy(a).float()).double().numpy() for a in (x, xt))
    assert m["fd_features"] == pytest.approx(_fd(fx, ft), rel=1e-5, abs=1e-8)
    held, _ = digits_feature_network(str(cache), heldout=True)
    with torch.no_grad():
        hx, ht = (held.features(torch.from_numpy(a).float()).double().numpy() for a in (x, xt))
    assert m["fd_heldout"] == pytest.approx(_fd(hx, ht), rel=1e-5, abs=1e-8)
    clf = LogisticRegression(max_iter=5000).fit(x.reshape(len(x), -1), y)
    assert m["cas"] == pytest.approx(clf.score(xt.reshape(len(xt), -1), yt), abs=1e-12)


def test_markdown_and_refusal_to_overwrite(demo, capsys):
    out, report, _ = demo
    md = (out / "report.md").read_text()
    assert "| iCT, one step |" in md and "FD fine-tune, one step" in md and "FD held-out" in md
    assert "optimised space" in md and "by construction" in md
    assert report["quality"]["pixel_fd"]["statement"] in md and "Timings" in md
    rc = main(["demo", "--out", str(out), "--steps", "1"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_thread_guard_falls_back_to_one_thread_when_throughput_collapses():
    from fastcm.train.threads import ThreadGuard, choose_threads

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        events = []
        guard = ThreadGuard("iCT", events, verbose=False)
        for step, rate in ((10, 100.0), (20, 600.0), (30, 250.0), (40, 590.0), (50, 200.0)):
            guard({"step": step, "img_per_s": rate})
        assert torch.get_num_threads() == 2 and not events  # one slow interval at a time is noise
        guard({"step": 60, "img_per_s": 150.0})
        assert torch.get_num_threads() == 1 and "step 60" in events[0] and "600" in events[0]
        assert choose_threads(3) == (3, "--threads")
    finally:
        torch.set_num_threads(previous)


def test_a_run_is_a_function_of_its_seed(tmp_path, tmp_path_factory):
    from fastcm.demo import DemoConfig, run_demo

    cfg = DemoConfig(ict_steps=6, batch_size=16, fd_steps=0, per_class=5, cas_seeds=0, progress=False, threads=1)
    cache = str(tmp_path_factory.getbasetemp() / "fastcm-cache")
    reports = []
    for i, caller_seed in enumerate((1, 2)):  # the caller's global RNG state must not matter
        torch.manual_seed(caller_seed)
        reports.append(run_demo(cfg, out=str(tmp_path / str(i)), cache=cache, verbose=False))
    assert reports[0]["metrics"] == reports[1]["metrics"]
    curve = lambda rep: [(r.get("loss"), r.get("fid_1step")) for r in rep["curves"]["ict"]]  # noqa: E731
    assert curve(reports[0]) == curve(reports[1]) and any(f for _, f in curve(reports[0]))


@pytest.mark.parametrize("method", ("sct", "meanflow"))
def test_demo_with_another_method(method, tmp_path, tmp_path_factory):
    """`fastcm demo --method`: stage 1 trains that method; sampling, evaluation and the FD stage use its samplers."""
    from fastcm.cm import method_of_model
    from fastcm.train import load_model, read_checkpoint_meta

    out = tmp_path / "run"
    argv = ["demo", "--method", method, "--out", out, "--steps", 4, "--batch-size", 16, "--fd-steps", 2,
            "--fd-batch-size", 20, "--per-class", 3, "--cas-seeds", 0, "--no-progress",
            "--cache", tmp_path_factory.getbasetemp() / "fastcm-cache"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["config"]["method"] == method
    ckpt = out / report["checkpoints"][method]
    assert read_checkpoint_meta(ckpt)["method"] == method and method_of_model(load_model(ckpt)) == method
    assert read_checkpoint_meta(out / report["checkpoints"]["fd_finetuned"])["method"] == method
    assert [r["step"] for r in report["curves"][method]][-1] == 4
    label = {"sct": "sCT", "meanflow": "MeanFlow"}[method]
    assert f"| {label}, one step |" in (out / "report.md").read_text()
    assert f"stage 1: {label} training" in report["timings_s"]
    for stage in STAGES:
        m = report["metrics"][stage]
        assert 0 <= m["cas"] <= 1 and m["fd_features"] > 0 and m["n"] == 30


def test_compare_runs_every_method_and_writes_one_table(tmp_path, tmp_path_factory):
    out = tmp_path / "cmp"
    argv = ["demo", "--compare", "--out", out, "--steps", 3, "--batch-size", 16, "--fd-steps", 1,
            "--fd-batch-size", 20, "--per-class", 3, "--no-progress",
            "--cache", tmp_path_factory.getbasetemp() / "fastcm-cache"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["methods"] == ["ict", "sct", "meanflow"] and report["budget_clock"] == "cpu"
    assert report["budget_s"] == 240.0  # fastcm.demo.COMPARE_SECONDS; 3 steps end each run first here
    md = (out / "compare.md").read_text()
    for method, label in (("ict", "iCT"), ("sct", "sCT"), ("meanflow", "MeanFlow")):
        run = report["runs"][method]
        assert run["stage1_steps"] == 3 and set(run["metrics"]) == {"one_step", "two_step", "fd_finetuned"}
        assert (out / method / run["checkpoints"][method]).is_file()
        with np.load(out / method / "samples_one_step.npz") as f:
            assert f["x"].shape == (30, 1, 8, 8)
        m = run["metrics"]["one_step"]
        assert f"| {label} | 3 |" in md and f"{m['cas']:.4g}" in md
    one = {m: r["metrics"]["one_step"]["cas"] for m, r in report["runs"].items()}
    assert report["best"]["one_step_cas"] == {"ict": "iCT", "sct": "sCT", "meanflow": "MeanFlow"}[max(one, key=one.get)]


def test_stage1_budget_stops_early(tmp_path, tmp_path_factory):
    """A spent budget stops stage 1 at its first step; without ict_steps the plan is the method's STAGE1_STEPS."""
    from fastcm.demo import STAGE1_STEPS, DemoConfig, run_demo

    cfg = DemoConfig(batch_size=16, fd_steps=0, per_class=2, cas_seeds=0, progress=False, threads=1,
                     stage1_seconds=1e-6, stage1_clock="cpu", method="meanflow")
    report = run_demo(cfg, out=str(tmp_path / "r"), cache=str(tmp_path_factory.getbasetemp() / "fastcm-cache"),
                      verbose=False)
    planned = json.loads((tmp_path / "r" / "meanflow" / "config.json").read_text())["config"]["total_steps"]
    assert planned == report["stage1_steps"] == STAGE1_STEPS["meanflow"] < 4000
    records = report["curves"]["meanflow"]
    assert [r["step"] for r in records if "eval_seconds" not in r] == [1]
    assert [r["step"] for r in records if "eval_seconds" in r] == [0, 1]  # FID at the start and where it stopped
    with pytest.raises(ValueError, match="stage1_clock must be"):
        DemoConfig(stage1_clock="gpu")


def test_old_import_names_are_the_package_objects():
    """fastcm.demo became a package and fastcm.demo_compare its compare module: the old names still import."""
    import fastcm.demo as demo
    import fastcm.demo_compare as old_compare
    from fastcm.demo import compare, config, pipeline, run

    assert old_compare.run_compare is compare.run_compare is demo.run_compare
    assert old_compare.COMPARE_SECONDS == demo.COMPARE_SECONDS == 240.0
    assert old_compare.COMPARE_METHODS == demo.COMPARE_METHODS == ("ict", "sct", "meanflow")
    assert demo.run_demo is run.run_demo and demo.DemoConfig is config.DemoConfig
    assert demo.QUALITY is config.QUALITY and demo.METHOD_LABELS is config.METHOD_LABELS
    assert demo.run_pipeline is pipeline.run_pipeline and demo.setup is pipeline.setup


def test_compare_imports_only_the_public_pipeline():
    """compare (and run) use the pipeline's public names: no underscore name crosses a module of the package."""
    import ast
    import inspect

    from fastcm.demo import compare, run

    for module in (compare, run):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fastcm.demo")):
                assert not [a.name for a in node.names if a.name.startswith("_")], module.__name__


def test_method_demos_get_iCT_steps_compute(monkeypatch, tmp_path):
    """`fastcm demo --method M` without --steps plans the compute of iCT's 4,000 steps (4,000 / STEP_COST[M],
    rounded to 100); --steps is taken as given; --compare caps every method at iCT's 4,000 (its budget is time)."""
    import fastcm.demo
    import fastcm.demo.compare
    from fastcm.demo import STAGE1_STEPS, STEP_COST, DemoConfig, run_compare

    seen = []
    monkeypatch.setattr(fastcm.demo, "run_demo", lambda cfg, **kw: seen.append(cfg) or {"quality": {}})
    for method in ("ict", "sct", "meanflow"):
        assert main(["demo", "--method", method]) == 0
        assert seen[-1].ict_steps is None and seen[-1].stage1_steps == STAGE1_STEPS[method]
        assert abs(STAGE1_STEPS[method] * STEP_COST[method] - 4000) <= 50 * STEP_COST[method]
    assert STAGE1_STEPS["ict"] == 4000 and STAGE1_STEPS["sct"] < 4000 and STAGE1_STEPS["meanflow"] < 4000
    assert main(["demo", "--method", "sct", "--steps", "7"]) == 0 and seen[-1].stage1_steps == 7
    monkeypatch.setattr(fastcm.demo.compare, "_compare", lambda cfg, *a: seen.append(cfg))
    run_compare(DemoConfig(method="sct"), out=str(tmp_path / "cmp"))
    assert seen[-1].ict_steps == 4000 and dataclasses.replace(seen[-1], method="meanflow").stage1_steps == 4000
    with pytest.raises(ValueError, match="ict_steps must be an integer >= 1"):
        DemoConfig(ict_steps=0)
