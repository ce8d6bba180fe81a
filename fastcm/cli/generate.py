"""``fastcm train``, ``fastcm sample`` and ``fastcm edit``: checkpoints in, runs / samples / edited images out.

Everything that can reject the inputs (options, data, checkpoint, model) runs before the output directory is
created; a command that fails after creating it removes it again while it is still empty, and files are written
only once their content is known to be valid (finite samples), each through a temporary file and a rename.
"""
import contextlib
import os
from pathlib import Path

from fastcm._checks import check_int
from fastcm._io import check_input_file
from fastcm.cli import UsageError


@contextlib.contextmanager
def _output_dir(out, overwrite: bool, prefix: str):
    """prepare_out_dir's directory for the block; removed again if the block fails and left it empty (and it did
    not exist before)."""
    from fastcm.eval.report import prepare_out_dir

    existed = out is not None and Path(out).expanduser().exists()
    path = prepare_out_dir(out, overwrite, prefix=prefix)
    try:
        yield path
    except BaseException:
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


# -- train ------------------------------------------------------------------------------------------

def _overrides(args, **names) -> dict:
    """Config fields the user set on the command line (None = keep the stage config's default)."""
    return {field: getattr(args, arg) for field, arg in names.items() if getattr(args, arg) is not None}


def cmd_train(args) -> int:
    from fastcm.data import load_dataset

    if args.resume and args.restart:
        raise UsageError("--resume continues the run in --out and --restart starts it over: pass one of them")
    if args.allow_data_change and not args.resume:
        raise UsageError("--allow-data-change belongs to --resume (a new run records whatever --data it gets)")
    data = load_dataset(args.data, "train")
    common = dict(_overrides(args, total_steps="steps", batch_size="batch_size", lr="lr", save_every="save_every",
                             save_minutes="save_minutes"), seed=args.seed, hflip=args.hflip, compile=args.compile,
                  **_eval_options(args))
    if args.stage == "fd" and (args.method is not None or args.tangent_warmup is not None):
        raise UsageError("--method and --tangent-warmup belong to --stage ict; --stage fd keeps the method of --init")
    if args.tangent_warmup is not None and (args.method or "ict") != "sct":
        raise UsageError("--tangent-warmup is sCT's: pass it with --method sct")
    prepare = _train_ict_stage if args.stage == "ict" else _train_fd_stage
    train = prepare(args, data, common)  # validates everything (and computes FD reference statistics) first
    with _output_dir(args.out, args.overwrite or args.resume or args.restart, f"train-{args.stage}") as out:
        result = train(out)
    last = result.records[-1] if result.records else {}
    print(f"trained {result.step} steps ({args.method or 'ict'} stage)" if args.stage == "ict" else
          f"trained {result.step} steps (fd stage)", end="")
    print(f"; last loss {last.get('loss')}, skipped steps "
          f"{result.skipped_steps}")
    if result.best is not None:
        where = f" -> {result.best_checkpoint}" if result.best_checkpoint is not None else ""
        print(f"best: {result.best['metric']} {result.best['value']:.6g} at step {result.best['step']}{where}")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}\nnext: fastcm sample --checkpoint {result.checkpoint}")
    return 0


def _eval_options(args) -> dict:
    """The --eval-* options as config fields (the statistics path made absolute, so a resume from elsewhere finds
    it); --feature-weights also serves Inception --eval-stats."""
    from fastcm.train.config import check_eval_steps
    from fastcm.train.evaluate import load_reference

    given = [f"--eval-{n}" for n in ("stats", "samples", "steps") if getattr(args, f"eval_{n}") is not None]
    if not args.eval_every:
        if given:
            raise UsageError(f"{', '.join(given)} take effect with --eval-every STEPS (> 0)")
        return {} if args.eval_every is None else {"eval_every": 0}
    if args.eval_stats is None:
        raise UsageError("--eval-every needs --eval-stats FILE (reference statistics: `fastcm stats DATA --features "
                         "F --out FILE.npz`, or a pytorch-fid .npz)")
    if not os.path.isfile(args.eval_stats):
        raise FileNotFoundError(f"--eval-stats {args.eval_stats!r} does not exist")
    out = {"eval_every": check_int("--eval-every", args.eval_every), "eval_stats": os.path.abspath(args.eval_stats)}
    if args.eval_samples is not None:
        out["eval_samples"] = check_int("--eval-samples", args.eval_samples, 2)
    if args.eval_steps is not None:
        try:
            out["eval_steps"] = check_eval_steps(args.eval_steps)
        except ValueError:
            raise UsageError(f"--eval-steps must be sampler step counts such as 1,2; got {args.eval_steps!r}") from None
    if args.feature_weights is not None and load_reference(args.eval_stats)[1] == "inception":
        out["eval_feature_weights"] = os.path.abspath(args.feature_weights)
    return out


def _train_ict_stage(args, data, common):
    """Validate the consistency-training stage's options and build the method's model; return
    ``train(out_dir) -> TrainResult``."""
    import torch

    from fastcm.cm import METHODS, get_method
    from fastcm.models import build_unet
    from fastcm.train import ICTConfig, train_ict

    init = _diffusers_init(args, data)  # --init diffusers:DIR continues consistency training of that U-Net
    if any(v not in (None, False) for v in (args.init if init is None else None, args.features, args.fd_mode,
                                             args.fd_normalize)):
        raise UsageError("--init (other than diffusers:DIR), --features, --fd-mode and --fd-normalize belong to "
                         "--stage fd")
    if args.feature_weights is not None and not args.eval_every:
        raise UsageError("--feature-weights is the Inception weight file of --stage fd's --features inception or of "
                         "Inception --eval-stats")
    extra = {"tangent_warmup": args.tangent_warmup} if args.tangent_warmup is not None else {}
    cfg = ICTConfig(**common, method=args.method or "ict", **extra)
    if init is not None:
        return lambda out: train_ict(cfg, data, init, out_dir=out, resume=args.resume, restart=args.restart,
                                     device=args.device, progress=not args.no_progress)
    preset = args.preset or ("digits" if data.image_shape == (1, 8, 8) else "cifar10-small")
    with torch.random.fork_rng(devices=[]):  # the initial weights are a function of --seed (as in the demo)
        torch.manual_seed(args.seed)
        unet = build_unet(preset, **METHODS[args.method or "ict"].unet_overrides)
    if tuple(unet.input_shape) != tuple(data.image_shape):
        raise UsageError(f"--preset {preset} generates {tuple(unet.input_shape)} images but {args.data} holds "
                         f"{tuple(data.image_shape)}; pick a preset of that shape")
    model = get_method(cfg.method, **cfg.method_hyperparameters()).make_model(unet)
    return lambda out: train_ict(cfg, data, model, out_dir=out, resume=args.resume, restart=args.restart,
                                 device=args.device, progress=not args.no_progress,
                                 allow_data_change=args.allow_data_change)


def _train_fd_stage(args, data, common):
    """Validate the FD stage's options, load --init and the reference statistics; return ``train(out_dir)``."""
    from fastcm.fid import feature_extractor
    from fastcm.train import FDConfig, finetune_fd, load_model, reference_stats

    if args.init is None:
        raise UsageError("--stage fd fine-tunes an existing model: pass --init CHECKPOINT (from `fastcm train`)")
    if args.preset is not None:
        raise UsageError("--preset belongs to --stage ict; --stage fd keeps the network of --init")
    model = _diffusers_init(args, data)
    if model is None:
        model = load_model(resolve_checkpoint(args.init, "--init"), weights="ema")  # a file, RUN or RUN/best
    if tuple(model.input_shape) != tuple(data.image_shape):
        raise UsageError(f"--init makes {tuple(model.input_shape)} images but {args.data} holds "
                         f"{tuple(data.image_shape)}")
    features = args.features or ("digits" if data.image_shape == (1, 8, 8) else "inception")
    # Digits features: batch mode measured better than the queue in the demo's FD stage (see fastcm/demo/pipeline.py).
    mode = args.fd_mode or ("batch" if features == "digits" else "queue")
    cfg = FDConfig(**common, fd_mode=mode, fd_normalize=args.fd_normalize)
    net = feature_extractor(features, weights=args.feature_weights, device=args.device or "cpu")
    ref = reference_stats(net, data)  # fp64 statistics of every training image in that feature space

    def train(out):
        print(f"FD fine-tune in {features} feature space ({mode} mode) against {len(data)} training images",
              flush=True)
        return finetune_fd(cfg, model, net, ref, dataset=data, out_dir=out, resume=args.resume,
                           restart=args.restart, device=args.device, progress=not args.no_progress,
                           allow_data_change=args.allow_data_change)

    return train


def _diffusers_init(args, data):
    """The ConsistencyModel of ``--init diffusers:DIR`` (a local diffusers UNet2DModel, patched with fastcm ops,
    sigmas from its CMStochasticIterativeScheduler config), or None for any other --init."""
    from fastcm.integrations.diffusers_io import is_diffusers_spec, load_consistency_model

    if not is_diffusers_spec(args.init):
        return None
    if args.preset is not None or (args.method or "ict") != "ict":
        raise UsageError("--init diffusers:DIR trains the folder's U-Net with iCT's CM parametrization: drop "
                         "--preset and --method")
    model = load_consistency_model(args.init)
    if tuple(model.input_shape) != tuple(data.image_shape):
        raise UsageError(f"--init {args.init} makes {tuple(model.input_shape)} images but {args.data} holds "
                         f"{tuple(data.image_shape)}")
    return model


def _load_model(args):
    model, path = load_checkpoint_model(args.checkpoint, args.weights, args.device)
    args.checkpoint = str(path)  # the file behind RUN/best or RUN, for the messages that name it
    return model


def resolve_checkpoint(spec: str, option: str = "--checkpoint") -> Path:
    """The checkpoint file of --checkpoint: a file as given; RUN/best (or bare ``best``, the run in the current
    directory) is RUN/checkpoints/best.safetensors; a run directory (or its checkpoints/) is its newest checkpoint."""
    from fastcm.train import CheckpointManager
    from fastcm.train.evaluate import BEST_NAME

    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.name == "best" and not path.is_dir():
        run = path.parent
        for best in (run / "checkpoints" / BEST_NAME, run / BEST_NAME):
            if best.is_file():
                return best
        raise FileNotFoundError(f"{option} {spec!r}: {run / 'checkpoints' / BEST_NAME} does not exist (a run "
                                "keeps a best checkpoint only when trained with --eval-every and --eval-stats)")
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            found = CheckpointManager(folder).checkpoints()
            if found:
                return found[-1][1]
        raise FileNotFoundError(f"{option} {spec!r} is a directory without checkpoints (ckpt_*.safetensors)")
    expected = "a .safetensors file written by `fastcm train`, under <out>/checkpoints/, a run directory, or RUN/best"
    if path.exists():  # a FIFO, socket or device: named as such (reading a FIFO would block)
        check_input_file(path, option, expected)
    raise FileNotFoundError(f"{option} {spec!r} does not exist (expected {expected})")


def load_checkpoint_model(spec: str, weights: str = "ema", device=None):
    """(model, checkpoint file) of a --checkpoint argument (see resolve_checkpoint)."""
    from fastcm.train import load_model

    path = resolve_checkpoint(spec)
    return load_model(path, weights=weights, device=device or "cpu"), path


def _sigmas(args, model, default_steps: int) -> tuple:
    if args.sigmas:
        return tuple(args.sigmas)
    steps = args.steps or default_steps
    from fastcm.cm.sampling import ICT_TWO_STEP_SIGMA

    return (float(model.sigma_max),) if steps == 1 else (float(model.sigma_max), ICT_TWO_STEP_SIGMA)


def cmd_sample(args) -> int:
    import torch

    from fastcm.cm import get_method, method_of_model, sample
    from fastcm.data import save_grid
    from fastcm.eval.report import save_samples_npz

    model = _load_model(args)  # refuses non-finite weights
    classes = model.num_classes
    if classes:
        per = check_int("--per-class", args.per_class)
        labels = torch.arange(classes).repeat_interleave(per)
    else:
        labels, per = None, None
    if labels is not None and args.num is not None:
        raise UsageError(f"-n/--num is for unconditional models; this one is class-conditional ({classes} classes): "
                         "use --per-class")
    n = len(labels) if labels is not None else 64 if args.num is None else check_int("-n/--num", args.num)
    method = method_of_model(model)
    if args.sigmas:  # explicit noise levels: the multistep CM sampler, which only iCT's parameterisation has
        if method != "ict":
            raise UsageError(f"--sigmas are iCT noise levels; this is a {method} checkpoint: use --steps 1 or 2")
        sigmas = tuple(args.sigmas)
        draw = lambda: sample(model, n, labels, sigmas=sigmas, seeds=args.seed, batch_size=256)  # noqa: E731
        how = f"{len(sigmas)} step(s), sigmas {list(sigmas)}"
    else:
        steps = args.steps or 1
        draw = lambda: get_method(method).sample(model, n, steps, labels, seeds=args.seed, batch_size=256)  # noqa: E731
        how = f"{steps} step(s), {method} sampler" + (f", sigmas {list(_sigmas(args, model, 1))}"
                                                      if method == "ict" else "")
    with _output_dir(args.out, args.overwrite, "samples") as out:
        x = _finite(draw().cpu(), args)
        save_samples_npz(out / "samples.npz", x, labels)
        if labels is not None:
            k = min(per, 16)  # one row per class, at most 16 columns
            grid = x.reshape(classes, per, *x.shape[1:])[:, :k].reshape(classes * k, *x.shape[1:])
            save_grid(grid, out / "samples.png", nrow=k, overwrite=True)
        else:
            save_grid(x[:256], out / "samples.png", overwrite=True)
    print(f"wrote {n} samples ({how}) to {out}/samples.npz and "
          f"{out}/samples.png")
    return 0


def _finite(x, args):
    """``x`` when every value is finite; else ValueError (nothing is written)."""
    import torch

    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the model of {args.checkpoint} produced NaN/inf images ({int((~torch.isfinite(x)).sum())} "
                         "values); nothing was written")
    return x


# -- edit -----------------------------------------------------------------------------------------------------------

def _edit_inputs(spec: str, n: int, channels: int):
    """The first n images (and labels, if any) of a dataset string (fastcm.data's grammar; test split default)."""
    import torch

    from fastcm.data import load_dataset

    ds = load_dataset(spec, "test", channels=channels)
    return ds.get_batch(torch.arange(min(n, len(ds))))


def _corrupt(args, model, x, labels):
    """(degraded view for the grid, edited images, what the edit must preserve) for the chosen task."""
    import torch

    from fastcm.cm import block_average, colorize, denoise, inpaint, luminance, super_resolution

    kw = dict(sigmas=_sigmas(args, model, 2), class_labels=labels, seeds=args.seed)
    H, W = x.shape[-2:]
    if args.task == "inpaint":  # keep the top half, generate the bottom half
        mask = torch.zeros(1, 1, H, W)
        mask[..., : H // 2, :] = 1
        edited = inpaint(model, x, mask, **kw)
        shown = x * mask - (1 - mask)
        return shown, edited, float((edited - x).mul(mask).abs().max())
    if args.task == "colorize":
        if x.shape[1] != 3:
            raise UsageError("colorize needs RGB images and a 3-channel model")
        grey = luminance(x)
        edited = colorize(model, grey, **kw)
        return grey.expand(-1, 3, -1, -1), edited, float((luminance(edited) - grey).abs().max())
    if args.task == "super-resolution":
        f = args.factor
        if f < 2 or H % f or W % f:
            raise UsageError(f"--factor must be >= 2 and divide the image size {H}x{W}, got {f}")
        low = block_average(x, f)
        edited = super_resolution(model, low, f, **kw)
        shown = low.repeat_interleave(f, 2).repeat_interleave(f, 3)
        return shown, edited, float((block_average(edited, f) - low).abs().max())
    if not args.sigma > 0:
        raise UsageError(f"--sigma must be > 0, got {args.sigma}")
    g = torch.Generator().manual_seed(args.seed)
    noisy = x + args.sigma * torch.randn(x.shape, generator=g)
    edited = denoise(model, noisy, args.sigma, sigmas=(), class_labels=labels, seeds=args.seed)
    return noisy.clamp(-1, 1), edited, None


def _edit_labels(args, model, labels, n: int):
    """The class labels an edit uses: --labels (one per image, or one for all), else those of --input. A
    class-conditional model without either is refused rather than given random labels."""
    import torch

    classes = model.num_classes
    if not classes:
        if args.labels is not None:
            raise UsageError("--labels: the model of --checkpoint is unconditional (no class labels)")
        return None
    if args.labels is not None:
        if len(args.labels) not in (1, n):
            raise UsageError(f"--labels needs 1 label (for all) or {n} (one per image), got {len(args.labels)}")
        labels = torch.tensor(args.labels * (n if len(args.labels) == 1 else 1), dtype=torch.long)
    elif labels is None:
        raise UsageError(f"the model is class-conditional ({classes} classes) but --input {args.input!r} holds no "
                         "labels: pass --labels L [L ...] (one per image, or one for all)")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise UsageError(f"labels must lie in 0 .. {classes - 1} for this model, got {int(labels.min())} .. "
                         f"{int(labels.max())}")
    return labels


def cmd_edit(args) -> int:
    import torch

    from fastcm.data import save_grid
    from fastcm.eval.report import save_samples_npz

    from fastcm.cm import method_of_model

    model = _load_model(args)
    if method_of_model(model) != "ict":
        raise UsageError(f"--checkpoint is a {method_of_model(model)} model; zero-shot editing (Consistency Models "
                         "Alg. 4) is implemented for iCT checkpoints only")
    n = check_int("--num", args.num)
    x, labels = _edit_inputs(args.input, n, model.input_shape[0])
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise UsageError(f"--input images are {tuple(x.shape[1:])} but the model makes {tuple(model.input_shape)}")
    labels = _edit_labels(args, model, labels, x.shape[0])
    with _output_dir(args.out, args.overwrite, f"edit-{args.task}") as out:
        shown, edited, violation = _corrupt(args, model, x, labels)
        edited = _finite(edited.cpu(), args)
        save_samples_npz(out / "edited.npz", edited, labels, original=x, corrupted=shown)
        save_grid(torch.cat([x, shown, edited.clamp(-1, 1)]), out / "edited.png", nrow=x.shape[0], overwrite=True)
    mse = float((edited - x).pow(2).mean())
    kept = "" if violation is None else f"; known part kept to max |Δ| = {violation:.2e}"
    print(f"{args.task}: {x.shape[0]} images, MSE to the originals {mse:.4f}{kept}\nwrote {out}/edited.npz and "
          f"{out}/edited.png (rows: original, degraded, edited)")
    return 0
