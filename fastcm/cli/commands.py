"""Handlers of the ``fastcm`` subcommands (parsed arguments in, files and a printed summary out)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from fastcm.cli import UsageError
from fastcm._checks import check_int
from fastcm.cli.export import cmd_export  # noqa: F401  (dispatched by name)
from fastcm.cli.generate import cmd_edit, cmd_sample, cmd_train  # noqa: F401  (dispatched by name)


def cmd_demo(args) -> int:
    from fastcm.demo import DemoConfig, run_compare, run_demo

    if args.compare and args.method != "ict":
        raise UsageError("--compare trains every method; drop --method")
    if args.compare and args.strict:
        raise UsageError("--strict checks the quality goals of one demo run; --compare has none")
    cfg = DemoConfig(ict_steps=args.steps, batch_size=args.batch_size, lr=args.lr, fd_steps=args.fd_steps,
                     fd_batch_size=args.fd_batch_size, fd_lr=args.fd_lr, per_class=args.per_class,
                     judge=args.judge, cas_seeds=args.cas_seeds, cas_epochs=args.cas_epochs, preset=args.preset,
                     seed=args.seed, threads=args.threads, progress=not args.no_progress, method=args.method,
                     stage1_seconds=args.budget_seconds, eval_every=args.eval_every)
    if args.compare:
        cfg = dataclasses.replace(cfg, stage1_clock="cpu")  # see fastcm.demo.compare.COMPARE_SECONDS
        run_compare(cfg, out=args.out, overwrite=args.overwrite, cache=args.cache)
        return 0
    report = run_demo(cfg, out=args.out, overwrite=args.overwrite, cache=args.cache)
    return 3 if args.strict and not report["quality"]["all_passed"] else 0


# -- metrics --------------------------------------------------------------------------------------------------------

def _batch(args):
    return None if args.batch_size is None else check_int("--batch-size", args.batch_size)


def cmd_stats(args) -> int:
    from fastcm.eval.report import check_new_file
    from fastcm.fid import dataset_stats, is_stats_file

    out = check_new_file(args.out, args.overwrite, suffix=".npz")
    if is_stats_file(args.input):
        raise UsageError(f"{args.input} already is a statistics file; give images (a dataset: digits[:split], "
                         "cifar10:DIR[:split], folder:DIR or an .npz with x)")
    stats = dataset_stats(args.input, args.features, weights=args.weights, batch_size=_batch(args),
                          device=args.device)
    stats.save(out, overwrite=True)  # check_new_file applied the --overwrite rule
    print(f"wrote {out}: {args.features} statistics of {stats.n} images (mu ({stats.dim},), sigma ({stats.dim}, "
          f"{stats.dim}))")
    return 0


def cmd_fid(args) -> int:
    from fastcm.fid import dataset_stats
    from fastcm.fid.metric import stats_distance

    if args.checkpoint is not None:
        return _checkpoint_fid(args)
    if args.b is None:
        raise UsageError("fid needs two sources A B (or --checkpoint C and one reference A)")
    features = args.features or "digits"
    kw = dict(weights=args.weights, batch_size=_batch(args), device=args.device)
    a, b = dataset_stats(args.a, features, **kw), dataset_stats(args.b, features, **kw)
    if a.dim != b.dim:
        raise UsageError(f"A and B have features of different sizes ({a.dim} vs {b.dim}): compare statistics "
                         "computed with the same --features")
    value = stats_distance(a, b, (f"A ({args.a!r})", f"B ({args.b!r})"))  # a non-finite FD names its statistics
    name = "FID" if features == "inception" else f"FD ({features} features)"
    if args.json:
        print(json.dumps({"features": features, "fd": value, "n_a": a.n, "n_b": b.n}))
    else:
        print(f"{name}: {value:.6g}")
    return 0


def _checkpoint_fid(args) -> int:
    """FID of --checkpoint's samples against the reference A, through the evaluation of ``train --eval-every``
    (fastcm.train.evaluate.FIDEvaluator: the same per-sample seeds, labels and batches)."""
    from fastcm.cli.generate import load_checkpoint_model
    from fastcm.cm import get_method, method_of_model
    from fastcm.fid import dataset_stats, feature_extractor, is_stats_file
    from fastcm.train.config import check_eval_steps
    from fastcm.train.evaluate import FIDEvaluator, default_samples, load_reference, metric_name

    if args.b is not None:
        raise UsageError("--checkpoint's samples take B's place: give one reference A (a statistics file or dataset)")
    model, path = load_checkpoint_model(args.checkpoint, "ema", args.device)
    if is_stats_file(args.a):
        ref, name = load_reference(args.a)
        if args.features is not None and args.features != name:
            raise UsageError(f"{args.a} holds {name} statistics but --features {args.features} was given")
    else:
        name = args.features or "digits"
        ref = dataset_stats(args.a, name, weights=args.weights, batch_size=_batch(args), device=args.device or "cpu")
    net = feature_extractor(name, weights=args.weights if name == "inception" else None, device=args.device or "cpu")
    k = default_samples(ref, name) if args.num is None else check_int("--num", args.num, 2)
    try:
        steps = check_eval_steps(args.steps)
    except ValueError:
        raise UsageError(f"--steps must be sampler step counts such as 1,2; got {args.steps!r}") from None
    ev = FIDEvaluator(ref, net, get_method(method_of_model(model)), num_samples=k, steps=steps,
                      seed=check_int("--seed", args.seed, 0), batch_size=_batch(args) or 250,
                      device=args.device or "cpu")
    rec = ev.evaluate(model, 0)
    if "eval_error" in rec:
        raise ValueError(f"the evaluation of {path} failed: {rec['eval_error']}")
    values = {f"{k}_step": rec[metric_name(k)] for k in ev.steps}
    if args.json:
        print(json.dumps({"features": name, "checkpoint": str(path), "samples": k, "seed": args.seed, **values}))
    else:
        label = "FID" if name == "inception" else f"FD ({name} features)"
        print(f"{label} of {path} ({k} samples): " + ", ".join(f"{s.replace('_', '-')} {v:.6g}"
                                                           for s, v in values.items()))
    return 0


def _arrays(ds):
    import torch

    return ds.get_batch(torch.arange(len(ds)))


def cmd_cas(args) -> int:
    from fastcm.data import load_npz, train_test_datasets
    from fastcm.eval.cas import cas_protocol
    from fastcm.eval.report import check_new_file, write_json

    out = check_new_file(args.json, args.overwrite, suffix=".json", what="--json") if args.json else None
    syn = load_npz(args.synthetic)
    if syn.labels is None:
        raise UsageError(f"{args.synthetic} has no labels: CAS needs an array y of class labels beside x")
    train, test, held_out = train_test_datasets(args.real)
    if syn.image_shape != train.image_shape:
        raise UsageError(f"synthetic images are {syn.image_shape} but {args.real} images are {train.image_shape}")
    (xr, yr), (xs, ys), (xt, yt) = _arrays(train), _arrays(syn), _arrays(test)
    res = cas_protocol(xr, yr, xs, ys, xt, yt, judge=args.judge, seeds=args.seeds,
                       num_classes=train.num_classes,
                       cnn_epochs=check_int("--epochs", args.epochs))
    res["real_test_set"] = held_out
    print(format_cas(res, args.real))
    if out is not None:
        write_json(out, res)
        print(f"wrote {out}")
    return 0


def format_cas(res: dict, real: str) -> str:
    seeds = " ".join(str(s) for s in res["seeds"])
    lines = [f"CAS protocol on {real} (real test set: {res.get('real_test_set', 'its test split')}, "
             f"{res['test_size']} images), judge {res['judge']}, seeds {seeds}",
             f"{'train set':<16}{'images':>8}{'top-1 mean':>12}{'std':>9}"]
    for arm in ("real", "synthetic", "real+synthetic"):
        r = res[arm]
        lines.append(f"{arm:<16}{r['train_size']:>8}{r['mean']:>12.4f}{r['std']:>9.4f}")
    gain = 100 * res["real_plus_synthetic_minus_real"]
    lines.append(f"real + synthetic beats real alone: {res['verdict']} ({gain:+.2f} points)")
    return "\n".join(lines)


# -- bench ----------------------------------------------------------------------------------------------------------

def _checkout_root() -> Path:
    import fastcm

    return Path(fastcm.__file__).resolve().parents[1]


def cmd_bench(args) -> int:
    bench_dir = Path(args.benchmarks) if args.benchmarks else _checkout_root() / "benchmarks"
    if not (bench_dir.is_dir() and any(bench_dir.glob("bench_*.py"))):
        raise UsageError(f"no benchmark suites in {bench_dir}: `fastcm bench` runs from a source checkout "
                         "(git clone; pip install -e '.[test]'); a wheel install does not ship benchmarks/. "
                         "Pass --benchmarks DIR to point at them.")
    root = bench_dir.parent
    json_path = Path(args.json) if Path(args.json).is_absolute() else root / args.json
    json_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, BENCH_SMOKE="1") if args.smoke else dict(os.environ)
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", "-o", "addopts=", "-o", "python_files=bench_*.py",
           "-p", "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={json_path}"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=root, env=env).returncode
    if rc != 0:
        print(f"fastcm bench: the benchmark run failed (pytest exit status {rc})", file=sys.stderr)
        return rc
    report = bench_dir / "report.py"
    if not report.is_file():
        print(f"benchmark results: {json_path} ({report} not found, so no markdown report)")
        return 0
    cmd = [sys.executable, str(report), str(json_path)] + (["--smoke"] if args.smoke else [])
    return subprocess.run(cmd, cwd=root, env=env).returncode

