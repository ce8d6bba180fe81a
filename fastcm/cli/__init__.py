"""The ``fastcm`` command: demo, train, sample, edit, stats, fid, cas, export, bench.

Every subcommand has ``--help``. Mistakes a user can fix (a missing file, a non-empty --out, a wrong option value,
a --device this torch cannot use, an output location that is read-only or under a file, a diverged training run)
end with one line ``fastcm <command>: error: <what to fix>`` and exit status 2, not a traceback
(FASTCM_DEBUG=1 shows the traceback instead). ``fastcm train`` stopped by SIGINT / SIGTERM saves a checkpoint after
the step in flight, says where in one line and exits with 130 / 143.
"""
import argparse
import contextlib
import errno
import os
import sys
import warnings

import fastcm

DATA_HELP = "dataset: digits (embedded), cifar10:DIR (cifar-10-batches-py), folder:DIR (one subfolder per class) " \
            "or FILE.npz (arrays x, y)"
CHECKPOINT_HELP = "a fastcm checkpoint (.safetensors) written by train, a run directory (its newest checkpoint) or " \
                  "RUN/best (RUN/checkpoints/best.safetensors, the best evaluation of --eval-every; bare 'best': " \
                  "the run in the current directory)"
FEATURES_HELP = "feature space: digits (small CNN trained on the digits train split, cached), pixels, or " \
                "inception (FID Inception-v3; needs --weights)"


def _out_args(p, what: str, default: str = "a new directory under runs/") -> None:
    p.add_argument("--out", default=None, help=f"directory for {what} (default: {default}); an existing, "
                                               "non-empty directory is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")


def _sampling_args(p) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to load (default: ema)")
    p.add_argument("--steps", type=int, choices=(1, 2), default=None,
                   help="1 = one-step, 2 = two-step with the checkpoint's method (iCT: sigma 80 then 0.821; sCT: "
                        "TrigFlow t_max then 1.1; MeanFlow: t = 1, 0.5, 0); default 1 for sample, 2 for edit")
    p.add_argument("--sigmas", type=float, nargs="+", default=None,
                   help="explicit descending noise levels for multistep sampling of an iCT checkpoint (overrides "
                        "--steps)")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample i uses seed + i (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")


def _add_demo(sub) -> None:
    from fastcm.demo import STAGE1_STEPS, DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="the embedded digits demo: iCT, samples, FD/CAS evaluation, FD fine-tune",
                       description="Train a class-conditional consistency model on scikit-learn digits with iCT "
                                   "(or --method sct / meanflow), "
                                   "sample one- and two-step, evaluate (classifier-feature FD, pixel FD, CAS), "
                                   "fine-tune with the FD loss, evaluate again, and write report.json/report.md, "
                                   "sample .npz files, PNG grids and a training-curve plot to --out.")
    _out_args(p, "the demo's files")
    p.add_argument("--steps", type=int, default=None,
                   help="stage-1 steps (default: the compute of 4,000 iCT steps: "
                        + ", ".join(f"{m} {n:,}" for m, n in STAGE1_STEPS.items()) + "; --compare: at most 4,000)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"stage-1 batch (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"stage-1 RAdam learning rate (default: {d.lr})")
    p.add_argument("--fd-steps", type=int, default=d.fd_steps,
                   help=f"FD-loss fine-tune steps, 0 skips the stage (default: {d.fd_steps})")
    p.add_argument("--fd-batch-size", type=int, default=d.fd_batch_size,
                   help=f"fine-tune batch (default: {d.fd_batch_size})")
    p.add_argument("--fd-lr", type=float, default=d.fd_lr, help=f"fine-tune Adam learning rate (default: {d.fd_lr})")
    p.add_argument("--per-class", type=int, default=d.per_class,
                   help=f"samples per class for evaluation and the .npz files (default: {d.per_class})")
    p.add_argument("--judge", choices=("logreg", "cnn"), default=d.judge,
                   help=f"CAS classifier for the stage metrics (default: {d.judge})")
    p.add_argument("--cas-seeds", type=int, default=d.cas_seeds,
                   help=f"seeds of the real/synthetic/real+synthetic protocol, 0 skips it (default: {d.cas_seeds})")
    p.add_argument("--cas-epochs", type=int, default=d.cas_epochs,
                   help=f"training epochs of the protocol's CNN judge (default: {d.cas_epochs})")
    p.add_argument("--preset", default=d.preset, help=f"U-Net preset (default: {d.preset})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of everything (default: {d.seed})")
    p.add_argument("--cache", default=None, help="cache directory for the digits feature network "
                                                 "(default: $FASTCM_CACHE or ~/.cache/fastcm)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when a quality goal is not met")
    p.add_argument("--method", choices=("ict", "sct", "meanflow"), default=d.method,
                   help=f"stage 1's consistency method (default: {d.method})")
    p.add_argument("--compare", action="store_true",
                   help="train iCT, sCT and MeanFlow at an equal time budget of stage 1 (--budget-seconds, in CPU "
                        "seconds per thread, so other jobs on a shared machine do not shrink it), "
                        "evaluate each one- and two-step and after the FD stage, and write compare.md/compare.json "
                        "(about 25 minutes on 2 CPU cores; the CAS protocol is skipped)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="STEPS",
                   help="FID while training of stage 1 (digits features vs the test split, one- and two-step) every "
                        f"STEPS steps, 0 = off; the FD stage evaluates at its log steps (default: {d.eval_every})")
    p.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                   help="time budget of stage 1: it stops early when S seconds are spent (wall clock; CPU seconds "
                        "per thread with --compare) (default: none; 240 per method with --compare)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a consistency model (iCT stage, or FD-loss fine-tune of a checkpoint)",
                       description="Stage 'ict' trains from scratch with iCT; stage 'fd' fine-tunes the model of "
                                   "--init with the Fréchet-distance loss. Writes config.json, metrics.jsonl, "
                                   "samples/ and checkpoints/ to --out.")
    p.add_argument("--data", default="digits", help=DATA_HELP + " (default: digits)")
    p.add_argument("--stage", choices=("ict", "fd"), default="ict",
                   help="training stage: ict = consistency training from scratch with --method, fd = FD-loss "
                        "fine-tune of --init (default: ict)")
    p.add_argument("--method", choices=("ict", "sct", "meanflow"), default=None,
                   help="consistency method of --stage ict: ict (iCT, Song & Dhariwal 2023), sct (continuous-time "
                        "CT in TrigFlow, Lu & Song 2025) or meanflow (Geng et al. 2025); sct and meanflow train "
                        "through a network JVP in one pass, about 1.3x an iCT step (default: ict)")
    p.add_argument("--tangent-warmup", type=int, default=None, metavar="H",
                   help="sCT tangent warm-up steps H (default: 1000; the paper's 10000 suits 100k-step runs)")
    p.add_argument("--preset", default=None, help="U-Net preset for --stage ict: tiny, digits, cifar10-small, "
                                                  "cifar10, imagenet64 (default: digits for digits data, else "
                                                  "cifar10-small)")
    p.add_argument("--init", default=None, help="checkpoint to fine-tune (required for --stage fd): a file, a run "
                                                "directory (its newest checkpoint) or RUN/best; or diffusers:DIR, "
                                                "a local diffusers UNet2DModel folder (sigmas from its "
                                                "CMStochasticIterativeScheduler config), for --stage fd or ict")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the stage config's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the stage config's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the stage config's)")
    p.add_argument("--features", choices=("digits", "inception"), default=None,
                   help="feature network of the FD loss (--stage fd; default: digits for 1x8x8 data)")
    p.add_argument("--feature-weights", default=None, help="Inception weights file for --features inception and for "
                                                           "Inception --eval-stats")
    p.add_argument("--fd-mode", choices=("queue", "batch", "ema"), default=None,
                   help="how the FD loss estimates the generated statistics (--stage fd; default: batch for digits "
                        "features, whose covariance is singular, else queue)")
    p.add_argument("--fd-normalize", action="store_true",
                   help="divide the FD loss by its detached value + 0.01 (steady gradient scale; the demo's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--compile", action="store_true", help="torch.compile the model call (fullgraph)")
    p.add_argument("--device", default=None, help="cpu, cuda … (default: cuda if available; torchrun sets it)")
    _add_train_schedule(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _out_args(p, "the run")


def _add_train_schedule(p) -> None:
    """fastcm train's checkpoint, evaluation and resume options."""
    p.add_argument("--save-every", type=int, default=None, metavar="STEPS",
                   help="steps between checkpoints, 0 = only at the end (default: the stage config's, 5000 for ict, "
                        "100 for fd)")
    p.add_argument("--save-minutes", type=float, default=None, metavar="M",
                   help="also save after M minutes of training since the last checkpoint, 0 = off (default: 10). "
                        "Ctrl-C (SIGINT) or SIGTERM saves after the step in flight and exits 130 / 143; a second "
                        "one exits at once")
    p.add_argument("--eval-every", type=int, default=None, metavar="STEPS",
                   help="FID of the EMA model every STEPS steps (also at step 0 and the last step), logged as "
                        "fid_1step / fid_2step in metrics.jsonl; the best is kept as checkpoints/best.safetensors; "
                        "0 = off (default: 0); needs --eval-stats")
    p.add_argument("--eval-stats", default=None, metavar="FILE",
                   help="reference statistics of --eval-every (`fastcm stats` output or a pytorch-fid .npz); the "
                        "feature space it records picks the extractor (inception: --feature-weights)")
    p.add_argument("--eval-samples", type=int, default=None, metavar="K",
                   help="samples per evaluation (default: 10000 for inception, the reference's size for digits or "
                        "pixels)")
    p.add_argument("--eval-steps", default=None, metavar="1,2",
                   help="samplers to evaluate; the first one picks the best checkpoint (default: 1,2)")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out (a damaged one is "
                                                        "refused and left untouched)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although --data differs from the data the run was trained on "
                        "(recorded in config.json and every checkpoint; refused by default)")
    p.add_argument("--restart", action="store_true", help="start over in an --out that holds a run: its files move "
                                                         "to --out/previous-<time>/ (nothing is deleted)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint: samples.npz and a PNG grid",
                       description="Load a checkpoint and write samples.npz (x in [-1, 1], y labels) and "
                                   "samples.png (one row per class for class-conditional models).")
    _sampling_args(p)
    p.add_argument("--per-class", type=int, default=10, help="samples per class (conditional models; default 10)")
    p.add_argument("-n", "--num", type=int, default=None, help="number of samples (unconditional; default 64)")
    _out_args(p, "samples.npz and samples.png")


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="zero-shot editing with a checkpoint: inpaint, colorize, super-resolution, "
                                    "denoise",
                       description="Apply a zero-shot edit (Consistency Models, Algorithm 4) to real images and "
                                   "write edited.npz and a PNG grid (rows: input, corrupted, edited).")
    _sampling_args(p)
    p.add_argument("--task", required=True, choices=("inpaint", "colorize", "super-resolution", "denoise"))
    p.add_argument("--input", default="digits:test", help="images to edit: digits[:train|test], FILE.npz or an "
                                                          "image folder (default: digits:test)")
    p.add_argument("-n", "--num", type=int, default=16, help="number of images to edit (default 16)")
    p.add_argument("--labels", type=int, nargs="+", default=None, metavar="L",
                   help="class labels of the input images for a class-conditional model: one per image, or one for "
                        "all (default: the labels --input holds; required when it holds none)")
    p.add_argument("--factor", type=int, default=2, help="super-resolution block factor (default 2)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level for denoise (default 0.5)")
    _out_args(p, "edited.npz and edited.png")


def _add_metrics(sub) -> None:
    p = sub.add_parser("stats", help="write feature statistics (mu, sigma) of images to a pytorch-fid style .npz")
    p.add_argument("input", help="image folder, FILE.npz (array x) or digits[:train|test|all]")
    p.add_argument("--features", choices=("digits", "pixels", "inception"), default="digits", help=FEATURES_HELP)
    p.add_argument("--weights", default=None, help="Inception weights file (for --features inception)")
    p.add_argument("--out", required=True, help="statistics file to write (.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per feature-network call (default: 50 for inception, else 500)")
    p.add_argument("--device", default="cpu", help="where the feature network runs (default: cpu)")

    p = sub.add_parser("fid", help="Fréchet distance between two image sets or statistics files, or of a checkpoint's "
                                   "samples (--checkpoint) to one",
                       description="FID between A and B; with --checkpoint C, between C's one- and two-step samples "
                                   "(the seeds of fastcm train --eval-every, so --seed = the run's seed reproduces its "
                                   "curve) and the reference A.")
    p.add_argument("a", help="image folder, FILE.npz (images x, or statistics mu/sigma) or digits[:split]")
    p.add_argument("b", nargs="?", default=None, help="the same kinds as A (not with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP + "; its samples take B's place")
    p.add_argument("--steps", default="1,2", metavar="1,2", help="--checkpoint's samplers (default: 1,2)")
    p.add_argument("-n", "--num", type=int, default=None, metavar="K",
                   help="--checkpoint's samples (default: 10000 for inception, the reference's size otherwise)")
    p.add_argument("--seed", type=int, default=0, help="--checkpoint's sampling seed (default: 0)")
    p.add_argument("--features", choices=("digits", "pixels", "inception"), default=None,
                   help=FEATURES_HELP + " (default: digits; a statistics file's own space with --checkpoint)")
    p.add_argument("--weights", default=None, help="Inception weights file (for --features inception)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per feature-network call (default: 50 for inception, else 500)")
    p.add_argument("--device", default="cpu", help="where the feature network runs (default: cpu)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")

    p = sub.add_parser("cas", help="Classification Accuracy Score: classifiers on real, synthetic and both",
                       description="Train the same classifier on real only, synthetic only and real + synthetic "
                                   "and report top-1 on the real test split (mean and spread over seeds).")
    p.add_argument("--synthetic", required=True, help="generated samples: .npz with x (N, C, H, W) in [-1, 1] "
                                                      "and y (N,) labels")
    p.add_argument("--real", default="digits", help="real data with a test split: digits or cifar10:DIR "
                                                    "(default: digits)")
    p.add_argument("--judge", choices=("cnn", "logreg"), default="cnn", help="classifier (default: cnn)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds (default: 0 1 2)")
    p.add_argument("--epochs", type=int, default=10, help="CNN judge training epochs (default 10)")
    p.add_argument("--json", default=None, help="also write the result to this .json file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suites (pytest-benchmark) and write the report",
                       description="Runs `pytest benchmarks --benchmark-json` from a source checkout, then "
                                   "benchmarks/report.py (markdown + CSV in benchmarks/results/).")
    p.add_argument("--smoke", action="store_true", help="each suite once at a tiny size (BENCH_SMOKE=1)")
    p.add_argument("-k", dest="keyword", default=None, help="only benchmarks matching this pytest -k expression")
    p.add_argument("--json", default=".benchmarks/last-run.json", help="where pytest-benchmark writes its JSON "
                                                                       "(relative to the checkout)")
    p.add_argument("--benchmarks", default=None, help="benchmarks directory (default: the source checkout's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcm", description="fastcm: fast, exact, tested consistency models. "
                                     "Start with `fastcm demo` (about 10 minutes on 2 CPU cores).")
    parser.add_argument("--version", action="version", version=f"fastcm {fastcm.__version__}")
    from fastcm.cli.export import add_export

    sub = parser.add_subparsers(dest="command", metavar="{demo,train,sample,edit,stats,fid,cas,export,bench}")
    for add in (_add_demo, _add_train, _add_sample, _add_edit, _add_metrics, add_export, _add_bench):
        add(sub)
    return parser


class UsageError(ValueError):
    """A mistake in the command line the user can fix; printed as one line, exit status 2."""


def check_device(spec: str) -> None:
    """Reject a --device this torch cannot use (a bad name, CUDA on a CPU-only build, a missing GPU) with one line,
    before any work starts."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {spec!r} is not a device name ({str(e).splitlines()[0]}); use cpu, cuda or "
                         "cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "has no CUDA device visible" if torch.backends.cuda.is_built() else "is a CPU-only build"
        raise UsageError(f"--device {spec!r}: this torch {torch.__version__} {built}; use --device cpu")
    try:
        torch.empty(0, device=device)
    except Exception as e:  # e.g. cuda:3 on a one-GPU machine, or a backend this build lacks
        fix = f"cuda:N with N < {torch.cuda.device_count()}" if device.type == "cuda" else "cpu"
        raise UsageError(f"--device {spec!r} is not usable here ({str(e).splitlines()[0]}); use {fix}") from e


# Every integer count of every subcommand (argparse dest -> smallest value), checked once by check_counts.
COUNTS = {"num": 1, "per_class": 1, "steps": 1, "batch_size": 1, "fd_steps": 0, "fd_batch_size": 1, "seed": 0,
          "cas_seeds": 0, "cas_epochs": 1, "epochs": 1, "threads": 1, "save_every": 0, "eval_every": 0,
          "eval_samples": 2, "tangent_warmup": 0, "factor": 2, "seeds": 0, "labels": 0}


def check_counts(args: argparse.Namespace) -> None:
    """Refuse a count option below its minimum (``sample -n 0``, ``--per-class -1`` …) in one line naming it,
    through fastcm._checks.check_int, before any work starts."""
    from fastcm._checks import check_int

    for dest, minimum in COUNTS.items():
        value = getattr(args, dest, None)
        option = "-n/--num" if dest == "num" else "--" + dest.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not isinstance(v, str):  # fid --steps is a list of samplers ("1,2")
                check_int(option, v, minimum)


def _os_error(err: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and the usual fix."""
    what = err.strerror or str(err)
    path = f" {str(err.filename)!r}" if err.filename is not None else ""
    hint = {errno.EROFS: "; that file system is read-only: choose a location you can write",
            errno.EACCES: "; choose a location you can write", errno.EPERM: "; choose a location you can write",
            errno.ENOTDIR: "; a part of that path is a file, not a directory",
            errno.ENOSPC: "; free some space or choose another disk"}.get(err.errno, "")
    if err.errno == errno.EEXIST and err.filename is not None and os.path.isfile(err.filename):
        hint = "; it is a file, not a directory, so nothing can be created under it"
    return f"{what}:{path}{hint}" if path else f"{what}{hint}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from fastcm.cli import commands

    with _notes(args.command):
        return _run(commands, args)


@contextlib.contextmanager
def _notes(command: str):
    """Print each FastcmNote (fastcm._checks.note) as one line ``fastcm <command>: note: …`` on stderr."""
    from fastcm._checks import FastcmNote

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FastcmNote):
            print(f"fastcm {command}: note: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _run(commands, args) -> int:
    try:
        check_counts(args)
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        return int(getattr(commands, f"cmd_{args.command}")(args) or 0)
    except Exception as err:
        message = _one_line(err)
        if message is None or os.environ.get("FASTCM_DEBUG") == "1":  # developers: the full traceback
            raise
        print(f"fastcm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        from fastcm.train import TrainingInterrupted

        if isinstance(interrupt, TrainingInterrupted):  # the checkpoint of the last finished step is on disk
            print(f"fastcm {args.command}: {interrupt}", file=sys.stderr)
            return interrupt.exit_code
        print(f"fastcm {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(err: Exception):
    """The one-line message of an error the user can fix, or None for a bug (which keeps its traceback)."""
    from fastcm.train import DivergenceError, NonFiniteError

    if isinstance(err, OSError):  # a read-only or full disk, a path through a file, no permission …
        return _os_error(err) if err.errno is not None else str(err)
    if isinstance(err, (ValueError, TypeError, NonFiniteError, DivergenceError)):
        return str(err)
    return None


if __name__ == "__main__":
    sys.exit(main())
