"""``fastcm export``: a checkpoint out as a diffusers ConsistencyModelPipeline folder (see
fastcm.integrations.diffusers_io)."""
from fastcm.cli import CHECKPOINT_HELP, UsageError


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write an iCT checkpoint as a diffusers ConsistencyModelPipeline folder",
                       description="Write --checkpoint's model to --diffusers DIR: model_index.json, unet/ (a "
                                   "UNet2DModel) and scheduler/ (CMStochasticIterativeScheduler with the model's "
                                   "sigma_min, sigma_max, sigma_data), loadable with "
                                   "diffusers.ConsistencyModelPipeline.from_pretrained(DIR). Works for iCT and FD-stage "
                                   "checkpoints of a diffusers U-Net (fastcm train --init diffusers:DIR); fastcm's "
                                   "own U-Nets and sCT / MeanFlow checkpoints are refused with the reason.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--diffusers", required=True, metavar="DIR", help="the pipeline folder to write")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights (default: ema)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty DIR")


def cmd_export(args) -> int:
    from fastcm.cli.generate import resolve_checkpoint
    from fastcm.cm import method_from_metadata
    from fastcm.integrations.diffusers_io import SCHEDULER_CLASS, check_export_dir, export_pipeline
    from fastcm.train import load_model, read_checkpoint_meta

    path = resolve_checkpoint(args.checkpoint)
    method = method_from_metadata(read_checkpoint_meta(path))
    if method != "ict":
        raise UsageError(f"{path} is a {method} checkpoint: diffusers' {SCHEDULER_CLASS} samples only the CM "
                         "parametrization of iCT, so sCT and MeanFlow checkpoints cannot be exported")
    check_export_dir(args.diffusers, args.overwrite)  # before the model is loaded
    model = load_model(path, weights=args.weights, impl="torch")
    out = export_pipeline(model, args.diffusers, overwrite=args.overwrite)
    print(f"wrote {out}: ConsistencyModelPipeline (UNet2DModel + {SCHEDULER_CLASS}, sigma_min "
          f"{model.sigma_min:g}, sigma_max {model.sigma_max:g}, sigma_data {model.sigma_data:g}) from {path}\n"
          f"next: diffusers.ConsistencyModelPipeline.from_pretrained({str(out)!r})")
    return 0
