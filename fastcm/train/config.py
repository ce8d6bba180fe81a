"""Frozen, JSON-serialisable configs of the two training stages (``to_dict`` / ``from_dict``).

Stage 1 trains with ``method``: "ict" (default), "sct" or "meanflow" (fastcm.cm.methods); each method reads its own
hyper-parameters below and ignores the others'. sCT's tangent warm-up H (``tangent_warmup``) defaults to 1,000 steps,
not the paper's 10,000 (sCM App. G.2, for 100k+ step runs): at H = 10,000 a few-thousand-step run (the digits demo)
would train its whole length on a partly switched-off tangent.

ICTConfig defaults are iCT's CIFAR-10 values (Song & Dhariwal 2023): RAdam lr 1e-4, batch 1024, 400k steps,
s0 = 10, s1 = 1280, P_mean = -1.1, P_std = 2.0, rho = 7, eval EMA 0.99993. FDConfig defaults follow the calibrated
digits fine-tune measured on this project's CPU: Adam lr 2e-5, batch 250, 300 steps.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

from fastcm._checks import check_bool, check_choice, check_int, check_real, is_int, is_real
from fastcm.cm.hyperparameters import check_hyperparameters

METHOD_NAMES = ("ict", "sct", "meanflow")  # fastcm.cm.METHODS (checked against it in fastcm.train.ict)

OPTIMIZERS = ("radam", "adam")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FD_MODES = ("queue", "batch", "ema")

# Fields that may differ between a run and its resumption: they change logging, speed or safety margins, not the
# optimisation trajectory (precision does change rounding; it is allowed so a run can move to other hardware).
# The evaluation fields never change the trajectory either (it draws from its own generators, in eval mode); a
# resumed run whose best checkpoint was chosen by another evaluation is refused by fastcm.train.evaluate instead.
RESUMABLE_CHANGES = frozenset({"log_every", "sample_every", "num_samples", "save_every", "save_minutes", "keep_last",
                               "compile", "compile_backend", "num_workers", "max_nonfinite", "max_weight_rms",
                               "precision", "eval_every", "eval_stats", "eval_samples", "eval_steps",
                               "eval_batch_size", "eval_feature_weights", "eval_cache"})


@dataclass(frozen=True)
class TrainConfig:
    """Fields shared by both stages. ``batch_size`` is the global batch, split evenly across DDP ranks."""

    total_steps: int = 400_000         # K: optimizer steps of the stage (also sets the iCT curriculum)
    batch_size: int = 1024             # global batch (divisible by the number of ranks)
    lr: float = 1e-4                   # learning rate (constant, no warm-up or decay, as in CM/iCT)
    optimizer: str = "radam"           # "radam" (CM/iCT) or "adam"
    betas: tuple = (0.9, 0.999)        # Adam/RAdam betas
    weight_decay: float = 0.0          # L2 weight decay (iCT: none)
    grad_clip: Optional[float] = None  # clip the global gradient norm to this value; None = no clipping
    ema_beta: float = 0.99993          # decay of the evaluation EMA of the weights
    precision: str = "auto"            # autocast dtype: "auto" (bf16/fp16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    compile: bool = False              # torch.compile the model call of the training step and the one-step sampler
    compile_backend: str = "inductor"  # torch.compile backend ("inductor"; "aot_eager" compiles in seconds)
    seed: int = 0                      # seeds data order, flips, noise and dropout (per step and rank)
    hflip: bool = False                # random horizontal flips of the training images
    num_workers: int = 0               # data-loader worker processes (datasets without an in-memory fast path)
    log_every: int = 50                # steps between metrics.jsonl records / progress-bar updates
    sample_every: int = 1000           # steps between PNG sample grids (0 = only at the end)
    num_samples: int = 64              # images per sample grid (one-step, EMA weights, fixed seeds)
    save_every: int = 5000             # steps between checkpoints (0 = only at the end)
    save_minutes: float = 10.0         # also save after this many minutes of training since the last save (0 = off)
    keep_last: Optional[int] = 3       # checkpoints kept on disk; None keeps all
    max_nonfinite: int = 10            # K non-finite steps in a row stop training
    max_weight_rms: Optional[float] = 1e3  # divergence: weight RMS above this for K steps in a row stops (None = off)
    # FID while training (fastcm.train.evaluate): the EMA model's samples against a FeatureStats file
    eval_every: int = 0                # steps between evaluations (also at step 0 of a fresh run and the last); 0 = off
    eval_stats: Optional[str] = None   # reference statistics file; its recorded feature space picks the extractor
    eval_samples: Optional[int] = None  # K samples per evaluation; None: 10,000 (Inception) or the reference's size
    eval_steps: tuple = (1, 2)         # samplers evaluated (fid_1step, fid_2step); the first picks best.safetensors
    eval_batch_size: int = 250         # images per sampler / feature-network call on each rank
    eval_feature_weights: Optional[str] = None  # Inception weight file for Inception statistics
    eval_cache: Optional[str] = None   # cache directory of the digits feature CNN (None: $FASTCM_CACHE, ~/.cache)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))  # JSON gives a list
        object.__setattr__(self, "eval_steps", check_eval_steps(self.eval_steps))
        _validate(self)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists when dumped)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild from :meth:`to_dict` output (e.g. a checkpoint's JSON); unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MethodConfig(TrainConfig):
    """Stage 1, consistency training with ``method`` ("ict", "sct" or "meanflow"; fastcm.cm.get_method) and each
    method's hyper-parameters (iCT's unprefixed, sCT's ``sct_``/``tangent_``, MeanFlow's ``mf_``). iCT: Pseudo-Huber
    c = None uses 0.00054 * sqrt(C*H*W). ``ICTConfig`` is the same class under its first name."""

    s0: int = 10                       # initial discretization intervals of N(k)
    s1: int = 1280                     # final discretization intervals (N is capped at s1 + 1)
    P_mean: float = -1.1               # lognormal p(i): mean of ln sigma
    P_std: float = 2.0                 # lognormal p(i): std of ln sigma
    rho: float = 7.0                   # Karras grid exponent
    huber_c: Optional[float] = None    # Pseudo-Huber c; None = 0.00054 * sqrt(d)
    method: str = "ict"                # "ict" | "sct" | "meanflow" (fastcm.cm.get_method)
    # sCT (Lu & Song 2025, App. G.2 CIFAR-10 values except H, see the module docstring)
    tangent_warmup: int = 1000         # H of the tangent warm-up r = min(1, step / H); 0 = none
    sct_P_mean: float = -1.0           # lognormal proposal of tan(t) sigma_d: mean
    sct_P_std: float = 1.4             # ... and std
    tangent_c: float = 0.1             # tangent normalisation g / (||g|| + c)
    # MeanFlow (Geng et al. 2025, CIFAR-10 values)
    mf_P_mean: float = -2.0            # logit-normal (r, t) sampler: mean
    mf_P_std: float = 2.0              # ... and std
    mf_ratio: float = 0.75             # share of the (r, t) pairs with r != t (the rest: r = t, flow matching)
    mf_p: float = 0.75                 # adaptive weight 1 / (loss + c)^p

    def method_hyperparameters(self, method: Optional[str] = None) -> dict:
        """The keyword arguments of ``fastcm.cm.get_method(method, ...)`` (default: ``self.method``)."""
        return {kw: getattr(self, field) for field, kw in METHOD_FIELDS[method or self.method].items()}


ICTConfig = MethodConfig  # the first name, kept: existing code and checkpoints' config.json keep working


# MethodConfig field -> the method's keyword (fastcm.cm.get_method); their ranges: fastcm.cm.hyperparameters
METHOD_FIELDS = {
    "ict": {"total_steps": "total_steps", "s0": "s0", "s1": "s1", "P_mean": "P_mean", "P_std": "P_std",
            "rho": "rho", "huber_c": "c"},
    "sct": {"sct_P_mean": "P_mean", "sct_P_std": "P_std", "tangent_c": "tangent_c", "tangent_warmup": "warmup_steps"},
    "meanflow": {"mf_P_mean": "P_mean", "mf_P_std": "P_std", "mf_ratio": "ratio", "mf_p": "p"},
}


@dataclass(frozen=True)
class FDConfig(TrainConfig):
    """Stage 2, FD-loss fine-tune: one-step samples -> feature net -> Frechet distance to reference statistics.

    An optional iCT term (``ict_weight`` > 0) regularises with the final curriculum (N = s1 + 1 levels).
    """

    total_steps: int = 300
    batch_size: int = 250
    lr: float = 2e-5
    optimizer: str = "adam"
    ema_beta: float = 0.999
    sample_every: int = 100
    save_every: int = 100
    fd_mode: str = "queue"             # FDLoss mode: "queue" (default), "batch" or "ema"
    queue_size: int = 50_000           # feature queue length (queue mode)
    fd_ema_beta: float = 0.999         # statistics EMA decay (ema mode)
    fd_normalize: bool = False         # divide the FD by its detached value (+0.01) so its scale stays ~1
    fd_dropout: bool = False           # generate the FD term's samples with the U-Net's dropout (see fd.py)
    balanced_labels: bool = True       # generate the classes in equal shares (conditional models)
    ict_weight: float = 0.0            # weight of the optional iCT term (0 = FD loss only)
    s1: int = 1280                     # the iCT term's discretization intervals (fixed N = s1 + 1)
    P_mean: float = -1.1
    P_std: float = 2.0
    rho: float = 7.0
    huber_c: Optional[float] = None


def check_eval_steps(steps) -> tuple:
    """``steps`` ("1,2", an int or a sequence) as a non-empty tuple of distinct positive sampler step counts."""
    if isinstance(steps, str):
        try:
            steps = [int(s) for s in steps.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"eval_steps must be sampler step counts such as '1,2', got {steps!r}") from None
    steps = tuple(steps) if isinstance(steps, (list, tuple)) else (steps,)
    if not steps or not all(is_int(s, 1) for s in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"eval_steps must be distinct positive step counts (e.g. (1, 2)), got {steps!r}")
    return tuple(int(s) for s in steps)


def _validate_eval(c: TrainConfig) -> None:
    if c.eval_samples is not None and not is_int(c.eval_samples, 2):
        raise ValueError(f"eval_samples must be None (the default for the feature space) or an int >= 2, got "
                         f"{c.eval_samples!r}")
    for name in ("eval_stats", "eval_feature_weights", "eval_cache"):
        if getattr(c, name) is not None and (not isinstance(getattr(c, name), str) or not getattr(c, name)):
            raise ValueError(f"{name} must be None or a file path (str), got {getattr(c, name)!r}")
    if c.eval_every and c.eval_stats is None:
        raise ValueError(f"eval_every={c.eval_every} needs eval_stats (a statistics file written by `fastcm stats`)")


def _validate(c: TrainConfig) -> None:
    ints = {"total_steps": 1, "batch_size": 1, "seed": 0, "num_workers": 0, "log_every": 1, "sample_every": 0,
            "num_samples": 1, "save_every": 0, "max_nonfinite": 1, "s0": 1, "s1": 1, "queue_size": 1,
            "tangent_warmup": 0, "eval_every": 0, "eval_batch_size": 1}
    for name, lo in ints.items():
        if hasattr(c, name):
            check_int(name, getattr(c, name), lo)
    if c.keep_last is not None:
        check_int("keep_last", c.keep_last)
    for name in ("lr", "ema_beta", "weight_decay", "ict_weight", "fd_ema_beta"):
        check_real(name, getattr(c, name, 0.0), minimum=0.0)
    if hasattr(c, "method"):
        check_choice("method", c.method, METHOD_NAMES)
    if not c.lr > 0 or not 0 <= c.ema_beta < 1 or (hasattr(c, "fd_ema_beta") and not 0 <= c.fd_ema_beta < 1):
        raise ValueError(f"need lr > 0 and EMA betas in [0, 1), got lr={c.lr}, ema_beta={c.ema_beta}")
    if len(c.betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in c.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {c.betas!r}")
    if not is_real(c.save_minutes) or c.save_minutes < 0:
        raise ValueError(f"save_minutes must be a finite number >= 0 (0 = off), got {c.save_minutes!r}")
    for name in ("grad_clip", "max_weight_rms"):
        v = getattr(c, name, None)
        if v is not None and not (is_real(v) and v > 0):
            raise ValueError(f"{name} must be None or a positive finite number, got {v!r}")
    for name, choices in (("optimizer", OPTIMIZERS), ("precision", PRECISIONS), ("fd_mode", FD_MODES)):
        if hasattr(c, name) and getattr(c, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(c, name)!r}")
    for name in ("compile", "hflip", "fd_normalize", "fd_dropout", "balanced_labels"):
        if hasattr(c, name):
            check_bool(name, getattr(c, name))
    if not isinstance(c.compile_backend, str) or not c.compile_backend:
        raise ValueError(f"compile_backend must be a backend name, got {c.compile_backend!r}")
    _validate_eval(c)
    if hasattr(c, "s0") and c.s0 > c.s1:
        raise ValueError(f"s0 must be <= s1, got s0={c.s0}, s1={c.s1}")
    # every method's fields, whichever method runs: the one table of ranges (the FD stage's iCT term included)
    for method, fields in METHOD_FIELDS.items():
        present = {kw: getattr(c, f) for f, kw in fields.items() if hasattr(c, f)}
        check_hyperparameters(method, present, names={kw: f for f, kw in fields.items()})
