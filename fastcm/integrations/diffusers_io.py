"""diffusers folders in and out: start fastcm training from a diffusers ``UNet2DModel`` and hand a trained consistency
model back as a folder that ``diffusers.ConsistencyModelPipeline.from_pretrained`` loads and samples.

In (``fastcm train --init diffusers:DIR``): DIR is a pipeline folder (``model_index.json``, ``unet/``, optionally
``scheduler/``) or a bare model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, optionally a
``scheduler_config.json`` beside it). Nothing is downloaded. The ``CMStochasticIterativeScheduler`` config, when
present, gives sigma_min / sigma_max / sigma_data; without one they are that scheduler's defaults (CM App. C: 0.002,
80, 0.5). The U-Net runs as F of :class:`fastcm.cm.ConsistencyModel` through :class:`DiffusersUNet` (t = 250 ln sigma,
the scheduler's ``sigma_to_t``) and is patched with :func:`fastcm.patch`.

Out (``fastcm export``): the iCT-parametrized model of a checkpoint whose network is a diffusers U-Net: its unpatched
``UNet2DModel`` plus a ``CMStochasticIterativeScheduler`` with the model's sigmas. fastcm's own U-Nets are refused:
every fastcm residual block and attention divides its residual sum by sqrt(2) (NCSN++ skip_rescale), and
``UNet2DModel`` fixes the down/up blocks' ``output_scale_factor`` to 1, so no weight conversion is exact.
"""
import json
import math
import os
from pathlib import Path
from typing import Optional, Tuple

from torch import nn

PREFIX = "diffusers:"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "CMStochasticIterativeScheduler"
SIGMA_DEFAULTS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}  # the scheduler's defaults (CM App. C)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
TIMESTEP_SCALE = 1000.0  # CMStochasticIterativeScheduler.sigma_to_t: t = 1000 * ln(sigma) / 4 = 1000 * c_noise


def _diffusers(what: str):
    """The diffusers module, or a one-line error saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"{what} needs diffusers (pip install 'fastcm[diffusers]')") from None
    return diffusers


def is_diffusers_spec(spec) -> bool:
    """True for an ``--init`` value of the form ``diffusers:DIR``."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} {str(path)!r} is not a JSON object")
    return doc


def _folders(root: Path, what: str) -> Tuple[Path, Optional[Path]]:
    """(the U-Net's folder, the scheduler config file or None) of a pipeline or bare-model folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {str(root)!r} is not a directory (a diffusers folder saved with "
                                "save_pretrained)")
    if (root / "model_index.json").is_file() or (root / "unet").is_dir():  # a pipeline folder
        unet_dir, scheduler = root / "unet", root / "scheduler" / "scheduler_config.json"
    else:
        unet_dir, scheduler = root, root / "scheduler_config.json"
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{what} {str(root)!r} has no {str(unet_dir / 'config.json')!r} (a UNet2DModel saved "
                                "with save_pretrained, or a pipeline folder with unet/)")
    return unet_dir, (scheduler if scheduler.is_file() else None)


def read_sigmas(path: Optional[Path], what: str) -> dict:
    """sigma_min / sigma_max / sigma_data of a ``CMStochasticIterativeScheduler`` config (defaults without one)."""
    if path is None:
        return dict(SIGMA_DEFAULTS)
    cfg = _read_json(path, f"{what}: scheduler config")
    if cfg.get("_class_name") != SCHEDULER_CLASS:
        raise ValueError(f"{what}: {str(path)!r} configures a {cfg.get('_class_name')!r}, not a {SCHEDULER_CLASS} "
                         "(the consistency-model scheduler that gives sigma_min/sigma_max/sigma_data)")
    out = {k: cfg.get(k, v) for k, v in SIGMA_DEFAULTS.items()}
    bad = {k: v for k, v in out.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or v <= 0}
    if bad or out["sigma_min"] >= out["sigma_max"]:
        raise ValueError(f"{what}: {str(path)!r} needs finite 0 < sigma_min < sigma_max and sigma_data > 0, got {out}")
    return {k: float(v) for k, v in out.items()}


def load_unet(spec: str, what: str = "--init"):
    """(UNet2DModel on the CPU in eval mode, sigmas dict) of ``diffusers:DIR`` or ``DIR``; one-line errors."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"{what} must be a folder path (diffusers:DIR or DIR), got {type(spec).__name__}")
    root = Path(spec[len(PREFIX):] if is_diffusers_spec(spec) else spec).expanduser()
    what = f"{what} diffusers:{root}"
    unet_dir, scheduler = _folders(root, what)
    cfg = _read_json(unet_dir / "config.json", f"{what}: model config")
    if cfg.get("_class_name") != UNET_CLASS:
        raise ValueError(f"{what}: {str(unet_dir / 'config.json')!r} describes a {cfg.get('_class_name')!r}, not a "
                         f"{UNET_CLASS} (fastcm trains diffusers UNet2DModels)")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{what}: time_embedding_type {cfg.get('time_embedding_type')!r} is not supported; fastcm "
                         "feeds the scheduler's t = 250 ln(sigma) to a 'positional' embedding")
    if not any((unet_dir / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{what}: {str(unet_dir)!r} holds no weights ({WEIGHT_FILES[0]})")
    sigmas = read_sigmas(scheduler, what)
    try:
        unet = _diffusers(what).UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as e:  # a damaged weight file, a config that does not build, weights of another shape
        raise ValueError(f"{what}: diffusers could not load it ({str(e).strip().splitlines()[0]})") from None
    return unet.eval(), sigmas


def consistency_model(unet: nn.Module, sigmas: dict, impl: Optional[str] = "auto"):
    """``ConsistencyModel(DiffusersUNet(unet))`` with ``sigmas``, the U-Net patched with fastcm ops (impl None: not)."""
    import fastcm
    from fastcm.cm import ConsistencyModel

    from .adapter import DiffusersUNet

    if impl is not None:
        fastcm.patch(unet, impl=impl)
    return ConsistencyModel(DiffusersUNet(unet, TIMESTEP_SCALE), sigmas["sigma_data"], sigmas["sigma_min"],
                            sigmas["sigma_max"])


def load_consistency_model(spec: str, impl: str = "auto", what: str = "--init"):
    """The iCT-parametrized model of a diffusers folder (``diffusers:DIR``), patched with fastcm ops."""
    unet, sigmas = load_unet(spec, what)
    return consistency_model(unet, sigmas, impl)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the diffusers config goes into the header's "model" entry, from which load_model rebuilds the net.

def unet_record(net: nn.Module) -> Optional[dict]:
    """JSON record of a :class:`DiffusersUNet` (its U-Net's public config and the timestep scale); None otherwise."""
    from .adapter import DiffusersUNet

    if not isinstance(net, DiffusersUNet):
        return None
    cfg = json.loads(net.unet.to_json_string())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}  # no paths or versions
    return {"unet_config": cfg, "timestep_scale": net.timestep_scale}


def rebuild_unet(record: dict, where: str = "the checkpoint"):
    """A fresh (randomly initialized) :class:`DiffusersUNet` of :func:`unet_record`'s ``record``."""
    from .adapter import DiffusersUNet

    diffusers = _diffusers(f"{where} holds a diffusers U-Net: it")
    cfg = dict(record.get("unet_config") or {})
    name = cfg.pop("_class_name", UNET_CLASS)
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"{where} records a diffusers network {name!r} that this diffusers "
                         f"{diffusers.__version__} does not have")
    return DiffusersUNet(cls.from_config(cfg), record.get("timestep_scale", TIMESTEP_SCALE))


# ----------------------------------------------------------------------------------------------------------------
# Out: a ConsistencyModelPipeline folder.

def fastcm_unet_refusal(config) -> str:
    """Why a fastcm U-Net of ``config`` has no exact UNet2DModel (one line)."""
    why = ["its residual blocks and attention divide the residual sum by sqrt(2) (NCSN++ skip_rescale) and "
           "UNet2DModel's down/up blocks cannot (their output_scale_factor is fixed to 1)"]
    if config.embedding == "fourier":
        why.append("its Fourier noise embedding has no UNet2DModel counterpart (diffusers' 'fourier' takes log t and "
                   "divides the output by t)")
    if config.time_inputs != 1:
        why.append(f"it reads {config.time_inputs} time inputs")
    return ("a fastcm U-Net cannot be converted to a diffusers UNet2DModel exactly: " + "; ".join(why) +
            ". Export needs a model trained from a diffusers U-Net (fastcm train --init diffusers:DIR)")


def check_export_dir(out, overwrite: bool, what: str = "--diffusers") -> Path:
    """The folder export writes: a new or empty directory (a non-empty one only with ``overwrite``), never a file."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what} {str(path)!r} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} exists and is not empty; choose a new directory or pass "
                              "--overwrite to replace the pipeline files there")
    return path


def export_pipeline(model: nn.Module, out, overwrite: bool = False) -> Path:
    """Write ``model`` (an iCT-parametrized ConsistencyModel around a diffusers U-Net) as a ConsistencyModelPipeline
    folder: ``model_index.json``, ``unet/`` (unpatched weights and config), ``scheduler/`` (the model's sigmas)."""
    from fastcm.cm import ConsistencyModel, method_of_model
    from fastcm.cm.precond import unwrap
    from fastcm.models import UNet

    from .adapter import DiffusersUNet

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a fastcm ConsistencyModel, got {type(model).__name__}")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path, got {type(out).__name__}")
    inner = unwrap(model)
    if not isinstance(inner, ConsistencyModel):
        raise ValueError(f"model is a {method_of_model(inner)} model; diffusers' {SCHEDULER_CLASS} samples only the "
                         "CM parametrization of iCT (sCT and MeanFlow checkpoints cannot be exported)")
    net = unwrap(inner.unet)
    if isinstance(net, UNet):
        raise ValueError(fastcm_unet_refusal(net.config))
    if not isinstance(net, DiffusersUNet) or type(net.unet).__name__ != UNET_CLASS:
        raise ValueError(f"the model's network is a {type(net).__name__}; export writes diffusers UNet2DModels")
    if net.timestep_scale != TIMESTEP_SCALE or not isinstance(net.unet.config.sample_size, int):
        raise ValueError(f"the pipeline feeds t = 250 ln(sigma) to square images: needs timestep_scale "
                         f"{TIMESTEP_SCALE:g} and an int sample_size, got {net.timestep_scale:g} and "
                         f"{net.unet.config.sample_size!r}")
    path = check_export_dir(out, overwrite)
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    try:
        _save(net.unet, inner, path)
    except BaseException:
        if not existed and not any(path.iterdir()):  # leave no empty folder behind
            path.rmdir()
        raise
    return path


def _save(unet: nn.Module, cm, path: Path) -> None:
    """save_pretrained of the unpatched U-Net and the scheduler; the model's patch is restored afterwards."""
    import fastcm
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    from .report import STATE_ATTR

    state = unet.__dict__.get(STATE_ATTR)
    fastcm.unpatch(unet)
    try:
        scheduler = CMStochasticIterativeScheduler(sigma_min=float(cm.sigma_min), sigma_max=float(cm.sigma_max),
                                                   sigma_data=float(cm.sigma_data))
        ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    finally:
        if state is not None:
            fastcm.patch(unet, state.report.impl, state.report.ops)
