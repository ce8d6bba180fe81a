"""The cost of FID while training: the evaluations' share of a run's wall time (``--eval-every``).

    python benchmarks/eval_cost.py [--threads 1] [--out benchmarks/results/eval-cost.md]

Two runs through the real trainer (fastcm.train.train_ict with eval_every), each timed end to end:
- digits: the demo's stage 1 settings (digits preset, batch 64, RAdam 2e-4, EMA 0), digits-CNN features against the
  digits test split (fastcm's default K = the reference's 450 images), 1- and 2-step samplers;
- cifar10-small: the cifar10-small preset at batch 8 on 3x32x32 images, Inception-v3 FID features. This machine has
  neither CIFAR-10 nor pytorch-fid's weight file, so the images are uniform noise and the Inception weights are a
  random initialisation saved to a temporary file: the FID values mean nothing, the times are those of the real
  network (same architecture, same 299x299 resize). K is small so the run stays short; the table also gives the
  per-image evaluation cost, from which the share at the default K = 10,000 follows.
The share is sum(eval_seconds) / run wall time, with eval_seconds as the trainer logs it in metrics.jsonl.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def run(name, cfg_kw, data, unet_preset, stats, tmp: Path) -> dict:
    from fastcm.cm import get_method
    from fastcm.models import build_unet
    from fastcm.train import ICTConfig, train_ict

    cfg = ICTConfig(**cfg_kw, eval_stats=str(stats), sample_every=0, save_every=0, seed=0)
    torch.manual_seed(0)
    model = get_method("ict", **cfg.method_hyperparameters()).make_model(build_unet(unet_preset))
    t0 = time.perf_counter()
    res = train_ict(cfg, data, model, out_dir=tmp / name, progress=False)
    wall = time.perf_counter() - t0
    evals = [r for r in res.records if "eval_seconds" in r]
    eval_s = sum(r["eval_seconds"] for r in evals)
    k, samplers = evals[0]["eval_samples"], len(cfg.eval_steps)
    fd_s = _fd_seconds(stats)  # the Fréchet distance itself costs the same for any K
    per_image = max(eval_s - len(evals) * samplers * fd_s, 0.0) / (len(evals) * k * samplers)
    step_s = (wall - eval_s) / cfg.total_steps
    return {"run": name, "steps": cfg.total_steps, "batch": cfg.batch_size, "eval_every": cfg.eval_every,
            "evaluations": len(evals), "K": k, "samplers": samplers, "wall_s": round(wall, 2),
            "eval_s": round(eval_s, 2), "share": eval_s / wall, "step_s": step_s, "fd_s": fd_s,
            "eval_per_image_s": per_image, "fid_1step": [r.get("fid_1step") for r in evals]}


def _fd_seconds(stats_path, repeats: int = 3) -> float:
    """Median seconds of one fastcm.fid.fid between two d-dimensional statistics (the reference and itself)."""
    from fastcm.fid import FeatureStats, fid

    ref = FeatureStats.load(stats_path)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fid(ref, ref)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def share_at(r: dict, k: int, every: int) -> float:
    """The share of an evaluation every ``every`` steps at K = ``k`` from the measured per-image, per-FD and
    per-step costs (one evaluation's cost over an interval's cost)."""
    one = r["samplers"] * (k * r["eval_per_image_s"] + r["fd_s"])
    return one / (one + every * r["step_s"])


def digits_run(tmp: Path, steps: int, every: int) -> dict:
    from fastcm.data import load_digits
    from fastcm.fid import dataset_stats

    stats = dataset_stats("digits:test", "digits").save(tmp / "digits-test.npz")
    kw = dict(total_steps=steps, batch_size=64, lr=2e-4, ema_beta=0.0, log_every=50, eval_every=every)
    return run("digits", kw, load_digits("train"), "digits", stats, tmp)


def cifar_run(tmp: Path, steps: int, every: int, k: int) -> dict:
    from safetensors.torch import save_file

    from fastcm.data import ArrayDataset
    from fastcm.fid import FeatureStats, FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp / "inception-random-init.safetensors"
    save_file({n: t.contiguous() for n, t in FIDInceptionV3().state_dict().items()}, str(weights))
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(2100, 2048, generator=g, dtype=torch.float64)  # n > d: a full-rank covariance
    stats = FeatureStats.from_features(feats, name="inception").save(tmp / "inception.npz")
    data = ArrayDataset(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8))
    kw = dict(total_steps=steps, batch_size=8, lr=1e-4, log_every=10, eval_every=every, eval_samples=k,
              eval_batch_size=25, eval_feature_weights=str(weights))
    return run("cifar10-small", kw, data, "cifar10-small", stats, tmp)


def markdown(rows, threads: int) -> str:
    lines = [f"# FID while training: the evaluations' share of wall time\n",
             f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
             f"torch {torch.__version__}, {threads} torch thread(s). `python benchmarks/eval_cost.py`.\n",
             "| run | steps × batch | eval every | evaluations | K × samplers | wall s | eval s | share | "
             "s / step | s / image | s / FD |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['steps']} × {r['batch']} | {r['eval_every']} | {r['evaluations']} | "
                     f"{r['K']} × {r['samplers']} | {r['wall_s']:.1f} | {r['eval_s']:.1f} | "
                     f"{100 * r['share']:.1f} % | {r['step_s']:.3f} | {r['eval_per_image_s']:.4f} | "
                     f"{r['fd_s']:.3f} |")
    lines += ["", "s / image: sampling + features of one generated image (the evaluation time less its Fréchet "
              "distances, over K × samplers × evaluations); s / FD: one Fréchet distance at the feature width "
              "(median of 3). From these, the share of one evaluation per interval of E steps at K samples is "
              "samplers (K s/image + s/FD) / (that + E s/step):", ""]
    for r in rows:
        digits = r["run"] == "digits"
        k = r["K"] if digits else 10_000
        cells = ", ".join(f"E = {e}: {100 * share_at(r, k, e):.1f} %"
                          for e in ((250, 500, 1000) if digits else (1000, 5000, 20000)))
        lines.append(f"- {r['run']}, K = {k}: {cells}")
    lines += ["", "digits: the demo's stage-1 settings, digits-CNN features against the digits test split (K = its "
              "450 images). cifar10-small: uniform-noise 3x32x32 images and a random-initialised Inception-v3 "
              "(this machine has neither CIFAR-10 nor pytorch-fid's weights), so the FIDs mean nothing and the "
              "times are the real network's; batch 8 on one CPU thread makes a step cheap next to 299x299 "
              "Inception; shares on a GPU at the paper's batch 1024 will differ (not measured: no GPU here). The shares come from one run each on a machine shared with other jobs (noisy)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--digits-steps", type=int, default=1000)
    p.add_argument("--digits-every", type=int, default=250)
    p.add_argument("--cifar-steps", type=int, default=20)
    p.add_argument("--cifar-every", type=int, default=10)
    p.add_argument("--cifar-samples", type=int, default=50)
    p.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    p.add_argument("--from-json", default=None, help="re-render a previous --out file's measurements (no runs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text().split("```json\n")[1].split("\n```")[0])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [digits_run(Path(tmp), args.digits_steps, args.digits_every),
                    cifar_run(Path(tmp), args.cifar_steps, args.cifar_every, args.cifar_samples)]
    text = markdown(rows, args.threads)
    print(text)
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(text + "\n```json\n" + json.dumps(rows, indent=1) + "\n```\n", encoding="utf-8")


if __name__ == "__main__":
    main()
