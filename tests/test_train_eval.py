"""FID while training (fastcm.train.evaluate): values against an independent scipy computation, fixed seeds, the
DDP sharding (2 gloo ranks == 1 process to 1e-9), failures that do not stop training, the best and its resume."""
import ast
import math
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from fastcm.cm import get_method
from fastcm.fid import FeatureStats, PixelFeatures
from fastcm.models import build_unet
from helpers import torchrun
from fastcm.train.config import check_eval_steps
from fastcm.train.evaluate import (EVAL_STREAM, FIDEvaluator, build_evaluator, default_samples, load_reference,
                                   metric_name, recoverable)


def sampler(name):
    return get_method(name, **({"total_steps": 1} if name == "ict" else {}))


def tiny_model(name="ict", classes=10, seed=3):
    torch.manual_seed(seed)
    m = sampler(name)
    model = m.make_model(build_unet("tiny", num_classes=classes, impl="torch", **m.unet_overrides)).eval()
    with torch.no_grad():  # the presets zero their output layer: perturb it, so the samplers' outputs differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def pixel_reference(n=40, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 64, generator=g, dtype=torch.float64) * 2 - 1
    return FeatureStats.from_features(x, name="pixels")


def scipy_fd(feats: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray) -> float:
    """pytorch-fid's formula with numpy / scipy (the independent reference)."""
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma @ sigma_r).real
    return float(((mu - mu_r) ** 2).sum() + np.trace(sigma) + np.trace(sigma_r) - 2 * np.trace(covmean))


@pytest.mark.parametrize("name", ["ict", "sct", "meanflow"])
def test_fid_equals_scipy_on_the_methods_own_samples(name):
    from fastcm.data import derive_seed

    model, ref, K = tiny_model(name), pixel_reference(), 24
    ev = FIDEvaluator(ref, PixelFeatures(), sampler(name), num_samples=K, steps=(1, 2), seed=7, batch_size=10)
    rec = ev.evaluate(model, step=5)
    assert rec["step"] == 5 and rec["eval_samples"] == K and rec["eval_seconds"] >= 0 and "eval_error" not in rec
    seeds = [derive_seed(7, j, EVAL_STREAM) for j in range(K)]
    labels = torch.arange(K) % 10  # balanced classes, sample j has label j mod 10
    for steps in (1, 2):
        x = sampler(name).sample(model, K, steps, labels, seeds=seeds)  # one call, not batches of 10
        want = scipy_fd(x.flatten(1).double().numpy(), ref.mu.numpy(), ref.sigma.numpy())
        assert rec[metric_name(steps)] == pytest.approx(want, rel=1e-7)
    assert rec["fid_1step"] != rec["fid_2step"]


def test_same_noise_in_every_evaluation_and_rng_and_mode_untouched():
    model, ref = tiny_model().train(), pixel_reference()
    ev = FIDEvaluator(ref, PixelFeatures(), sampler("ict"), num_samples=20, steps=(1,), seed=1, batch_size=7)
    state = torch.get_rng_state()
    a, b = ev.evaluate(model, 1), ev.evaluate(model, 2)
    assert torch.equal(torch.get_rng_state(), state)  # the training trajectory cannot depend on evaluations
    assert model.training  # eval mode inside, restored afterwards
    assert a["fid_1step"] == b["fid_1step"]
    other = FIDEvaluator(ref, PixelFeatures(), sampler("ict"), num_samples=20, steps=(1,), seed=1, batch_size=20)
    assert other.evaluate(model, 3)["fid_1step"] == pytest.approx(a["fid_1step"], rel=1e-6)  # fp32 rounding of other batches
    reseeded = FIDEvaluator(ref, PixelFeatures(), sampler("ict"), num_samples=20, steps=(1,), seed=2)
    assert reseeded.evaluate(model, 1)["fid_1step"] != a["fid_1step"]


def test_shards_are_whole_global_batches_covering_every_sample_once():
    ev = FIDEvaluator(pixel_reference(), PixelFeatures(), sampler("ict"), num_samples=11, batch_size=2)
    shards = []
    for r in range(4):
        ev.rank, ev.world = r, 4
        shards.append([list(b) for b in ev.shard()])
    assert shards == [[[0, 1]], [[2, 3], [4, 5]], [[6, 7]], [[8, 9], [10]]]
    ev.num_samples = 3  # fewer batches than ranks: some ranks generate nothing
    assert [len(ev.shard()) for ev.rank in range(4)] == [0, 1, 0, 1]


class Exploding(nn.Module):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


def test_failures_are_one_line_records_and_bugs_still_raise():
    model, ref = tiny_model(), pixel_reference()
    oom = FIDEvaluator(ref, Exploding(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore")),
                       sampler("ict"), num_samples=10)
    rec = oom.evaluate(model, 4)
    assert rec["eval_error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"
    assert "fid_1step" not in rec and rec["eval_seconds"] >= 0
    with torch.no_grad():
        broken = tiny_model()
        for p in broken.parameters():
            p.fill_(float("nan"))
    nan = FIDEvaluator(ref, PixelFeatures(), sampler("ict"), num_samples=10).evaluate(broken, 4)
    assert "NaN" in nan["eval_error"] and "fid_1step" not in nan
    bug = FIDEvaluator(ref, Exploding(TypeError("a bug")), sampler("ict"), num_samples=10)
    with pytest.raises(TypeError, match="a bug"):
        bug.evaluate(model, 4)
    assert recoverable(RuntimeError("CUDA error: out of memory")) and not recoverable(RuntimeError("shape"))


def test_best_is_the_lowest_first_sampler_fid_and_survives_a_state_round_trip():
    ev = FIDEvaluator(pixel_reference(), PixelFeatures(), sampler("ict"), num_samples=10, steps=(2, 1))
    assert ev.update_best({"step": 10, "fid_2step": 5.0, "fid_1step": 1.0})
    assert not ev.update_best({"step": 20, "fid_2step": 6.0, "fid_1step": 0.5})  # the first entry decides
    assert not ev.update_best({"step": 25, "eval_error": "OutOfMemoryError: ..."})
    assert ev.update_best({"step": 30, "fid_2step": 4.0})
    state = ev.state_dict()
    assert state["best"] == {"step": 30, "metric": "fid_2step", "value": 4.0}
    again = FIDEvaluator(pixel_reference(), PixelFeatures(), sampler("ict"), num_samples=10, steps=(2, 1))
    again.load_state_dict(state)
    assert again.best == ev.best
    for changed in (dict(num_samples=12), dict(steps=(1, 2))):
        kw = {**dict(num_samples=10, steps=(2, 1)), **changed}
        other = FIDEvaluator(pixel_reference(), PixelFeatures(), sampler("ict"), **kw)
        with pytest.raises(ValueError, match="different evaluation"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="reference"):
        FIDEvaluator(pixel_reference(seed=6), PixelFeatures(), sampler("ict"), num_samples=10,
                     steps=(2, 1)).load_state_dict(state)
    FIDEvaluator(pixel_reference(seed=6), PixelFeatures(), sampler("ict"), num_samples=10).load_state_dict(
        {"spec": {}, "best": None})  # a run without a best yet accepts any evaluation


def test_reference_files_pick_the_extractor_and_the_default_sample_count(tmp_path):
    named = pixel_reference().save(tmp_path / "pixels.npz")
    stats, name = load_reference(named)
    assert name == "pixels" and default_samples(stats, name) == 40
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2100, 2048, generator=g, dtype=torch.float64)
    mu, sigma = a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False)
    np.savez(tmp_path / "pytorch-fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's layout: no n, no feature name
    stats, name = load_reference(tmp_path / "pytorch-fid.npz")
    assert name == "inception" and default_samples(stats, name) == 10_000
    np.savez(tmp_path / "unnamed64.npz", mu=mu[:64], sigma=sigma[:64, :64])
    with pytest.raises(ValueError, match="does not record its feature space"):
        load_reference(tmp_path / "unnamed64.npz")
    with pytest.raises(FileNotFoundError, match="fastcm stats"):
        load_reference(tmp_path / "missing.npz")
    ev = build_evaluator(named, sampler("ict"), steps="1,2", input_shape=(1, 8, 8))
    assert ev.num_samples == 40 and ev.steps == (1, 2) and isinstance(ev.features, PixelFeatures)
    with pytest.raises(ValueError, match="Inception"):
        build_evaluator(named, sampler("ict"), feature_weights="w.pth")
    with pytest.raises(ValueError, match="64-d pixels statistics"):
        build_evaluator(named, sampler("ict"), input_shape=(3, 8, 8))


def test_eval_steps_validation():
    assert check_eval_steps("1,2") == (1, 2) and check_eval_steps(2) == (2,) and check_eval_steps([2, 1]) == (2, 1)
    for bad in ("", "1,1", "0", "a", (), (1.5,), (True,)):
        with pytest.raises(ValueError, match="eval_steps"):
            check_eval_steps(bad)
    with pytest.raises(ValueError, match="iCT"):
        FIDEvaluator(pixel_reference(), PixelFeatures(), sampler("ict"), num_samples=4, steps=(1, 3))
    FIDEvaluator(pixel_reference(), PixelFeatures(), sampler("meanflow"), num_samples=4, steps=(1, 3))


WORKER = textwrap.dedent('''
    import os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fastcm.data import ArrayDataset
    from fastcm.fid import PixelFeatures
    from fastcm.train import ICTConfig, init_distributed, train_ict
    from fastcm.train.evaluate import FIDEvaluator
    from case import CASE

    class OOMOnRank1(PixelFeatures):
        def forward(self, x):
            if dist.get_rank() == 1:
                raise torch.OutOfMemoryError("CUDA out of memory on rank 1")
            return super().forward(x)

    def main(out):
        info = init_distributed("cpu")
        model, ref, method = CASE()
        ev = FIDEvaluator(ref, PixelFeatures(), method, num_samples=11, steps=(1, 2), seed=4, batch_size=4, info=info)
        rec = ev.evaluate(model, 3)
        stats = ev.local_stats(model, 2).all_reduce()
        meta = {k: repr(v) for k, v in rec.items()}
        # one rank fails: every rank records the failure and nobody waits in a collective
        flaky = FIDEvaluator(ref, OOMOnRank1(), method, num_samples=11, seed=4, batch_size=4, info=info)
        meta["flaky"] = flaky.evaluate(model, 3)["eval_error"]
        # the loop under DDP: every rank evaluates, rank 0 logs and keeps the best
        g = torch.Generator().manual_seed(0)
        data = ArrayDataset(torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.arange(32) % 10)
        cfg = ICTConfig(total_steps=2, batch_size=8, lr=1e-3, s0=2, s1=8, log_every=1, sample_every=0,
                        save_every=0, eval_every=1, eval_stats=os.path.join(out, "ref.npz"), eval_samples=11,
                        eval_batch_size=4)
        res = train_ict(cfg, data, CASE()[0].train(), out_dir=os.path.join(out, "run"), progress=False)
        meta["loop_evals"] = repr([r.get("fid_1step") for r in res.records if "eval_seconds" in r])
        meta["loop_best"] = repr(res.best)
        save_file({"mu": stats.mu, "sigma": stats.sigma}, os.path.join(out, f"rank{info.rank}.safetensors"),
                  metadata=meta)
        dist.destroy_process_group()

    if __name__ == "__main__":
        main(sys.argv[1])
''')

CASE = textwrap.dedent('''
    import torch
    from fastcm.cm import get_method
    from fastcm.fid import FeatureStats
    from fastcm.models import build_unet

    def CASE():
        torch.manual_seed(3)
        method = get_method("ict", total_steps=1)
        model = method.make_model(build_unet("tiny", num_classes=10, impl="torch")).eval()
        g = torch.Generator().manual_seed(5)
        ref = FeatureStats.from_features(torch.rand(40, 64, generator=g, dtype=torch.float64) * 2 - 1, "pixels")
        return model, ref, method
''')


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_to_1e_9(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "case.py").write_text(CASE)
    ns = {}
    exec(compile(CASE, "case", "exec"), ns)
    model, ref, method = ns["CASE"]()
    ref.save(tmp_path / "ref.npz")
    torchrun(tmp_path / "worker.py", tmp_path, timeout=240)
    metas = []
    for r in range(2):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    single = FIDEvaluator(ref, PixelFeatures(), method, num_samples=11, steps=(1, 2), seed=4, batch_size=4)
    want = single.evaluate(model, 3)
    for key in ("fid_1step", "fid_2step"):
        assert key not in metas[1]  # rank 0 computes the distance; the others only contribute statistics
        got = float(metas[0][key])
        assert math.isfinite(got) and abs(got - want[key]) <= 1e-9 * abs(want[key]), key
    assert metas[0]["flaky"] == "failed on another rank"
    assert metas[1]["flaky"] == "OutOfMemoryError: CUDA out of memory on rank 1"
    evals = ast.literal_eval(metas[0]["loop_evals"])  # rank 0: steps 0, 1, 2, each with a finite FID
    assert len(evals) == 3 and all(math.isfinite(v) for v in evals)
    assert ast.literal_eval(metas[0]["loop_best"])["value"] == min(evals) and metas[1]["loop_best"] == "None"
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()
    one = single.local_stats(model, 2)
    for r in range(2):
        t = load_file(str(tmp_path / f"rank{r}.safetensors"))
        for name, ref_t in (("mu", one.mu), ("sigma", one.sigma)):
            assert torch.allclose(t[name], ref_t, rtol=1e-9, atol=1e-9 * float(ref_t.abs().max())), (r, name)


def test_training_curves_plot_the_fid_and_the_report_tabulates_it(tmp_path):
    from PIL import Image

    from fastcm.eval.demo_report import fid_curve_lines
    from fastcm.eval.report import plot_training_curves

    stage1 = [{"step": s, "loss": 1.0 / (s + 1), "N": 10} for s in range(0, 9, 2)]
    stage1 += [{"stage": "ict", "step": s, "fid_1step": 100.0 / (s + 1), "fid_2step": 80.0 / (s + 1),
                "eval_seconds": 0.5, "eval_samples": 450} for s in (0, 4, 8)]
    fd = [{"step": 1, "loss": 1.0, "fd": 3.0},
          {"stage": "fd", "step": 1, "eval_error": "OutOfMemoryError: x", "eval_seconds": 0.1, "eval_samples": 450}]
    path = plot_training_curves(tmp_path / "curves.png", stage1, fd)
    assert Image.open(path).size[0] == round(3 * 5.5 * 110)  # loss, stage-1 FID and stage-2 panels
    assert Image.open(plot_training_curves(tmp_path / "plain.png", stage1[:5])).size[0] == round(5.5 * 110)
    report = {"curves": {"ict": stage1, "fd": fd}, "stage_seconds": {"ict": 10.0},
              "best": {"ict": {"step": 8, "metric": "fid_1step", "value": 100 / 9}},
              "evaluation": {"features": "digits", "stats": "digits-test.npz", "samples": 450}}
    text = "\n".join(fid_curve_lines(report))
    assert "| ict | 8 | 11.11 | 8.889 | 0.5 |  |" in text and "OutOfMemoryError: x" in text
    assert "- ict: 3 evaluations, 1.5 s, 15.0 % of the stage's 10 s; best fid_1step 11.11 at step 8" in text
    assert fid_curve_lines({"curves": {"ict": stage1[:5]}}) == []


def test_progress_bar_shows_the_last_evaluation_beside_the_training_record():
    from fastcm.train.progress import RunLogger, eval_postfix

    assert eval_postfix({"step": 2, "fid_1step": 12.345678, "fid_2step": 9.5, "eval_seconds": 1.0}) == \
        {"fid1": "12.35", "fid2": "9.5"}
    assert eval_postfix({"step": 2, "eval_error": "OutOfMemoryError: x", "eval_seconds": 1.0}) == {"fid": "failed"}
    log = RunLogger(None, 0, 10, True, True, None, desc="ict")
    try:
        log.log({"step": 1, "loss": 0.5, "img_per_s": 3.0})
        log.log({"step": 1, "fid_1step": 7.0, "eval_seconds": 0.1})
        log.log({"step": 2, "loss": 0.25, "img_per_s": 3.0})  # a training record keeps the last FID on the bar
        assert log.bar.postfix == "loss=0.25, img/s=3.0, fid1=7"
    finally:
        log.close()
