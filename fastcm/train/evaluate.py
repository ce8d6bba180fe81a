"""FID while training: the EMA model's one- and two-step samples against a reference statistics file.

Every ``eval_every`` steps the trainer calls :meth:`FIDEvaluator.evaluate` with the EMA model. The evaluation
generates ``num_samples`` images with the method's own sampler (``Method.sample``, eval mode, in batches), sample j
always from the per-sample seed ``derive_seed(seed, j, EVAL_STREAM)`` and, for a class-conditional model, with
label j mod num_classes, so every evaluation of a run (and a resumed run) sees the same noise and labels and the
curve compares like with like; the 1-step and 2-step samplers share that noise. The images go through the feature
extractor that the statistics file records (``FeatureStats.features``: digits, pixels or inception) into fp64
FeatureStats (fastcm.fid.compute_stats), and the Fréchet distance to the reference is fastcm.fid.fid.

Under DDP the K samples are cut into batches at global indices and rank r generates a contiguous run of whole
batches (the same batches as one process, so the same images); the ranks' fp64 sums are all-reduced
(FeatureStats.all_reduce), so W ranks give the statistics of one process to fp64 rounding. An
evaluation that fails (out of memory, non-finite samples or Fréchet distance) returns a record with ``eval_error``
on every rank (the ranks agree before any collective, so none waits forever) and training goes on.

The best evaluation so far (lowest value of the first entry of ``steps``) is kept in :meth:`state_dict`, which the
trainer saves in each checkpoint with the evaluation's ``spec`` (statistics file digest, feature space, samples,
steps), so a resumed run keeps its best and refuses to compare against a different evaluation.
"""
import hashlib
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from fastcm._checks import check_int
from fastcm.data import derive_seed
from fastcm.fid import FeatureStats, compute_stats, feature_extractor, fid, is_stats_file

from .config import check_eval_steps

EVAL_STREAM = 0xE7A1                 # the seed stream of evaluation noise (training streams: fastcm.train.fd)
INCEPTION_SAMPLES = 10_000           # default samples for Inception FID (the usual FID-10k of training curves)
INCEPTION_DIM = 2048                 # pytorch-fid's statistics files name no feature space: 2048-d is Inception
BEST_NAME = "best.safetensors"       # in the run's checkpoints/ (CheckpointManager's keep-last rule never sees it)
SPEC_KEYS = ("features", "dim", "reference", "samples", "metric")  # what must match to compare with a saved best


class EvalError(RuntimeError):
    """An evaluation failed in a way that must not stop training (OOM, non-finite samples or FD)."""


def metric_name(steps: int) -> str:
    """The metrics.jsonl key of the FID of the ``steps``-step sampler: fid_1step, fid_2step, ..."""
    return f"fid_{steps}step"


def load_reference(path) -> tuple:
    """(FeatureStats, feature-space name) of an evaluation statistics file (``fastcm stats`` output, or a
    pytorch-fid ``.npz``: unnamed 2048-d statistics are Inception's)."""
    if path is None or not is_stats_file(path):
        raise FileNotFoundError(f"eval_stats {str(path)!r} is not a statistics file (.npz / .safetensors with mu and "
                                "sigma); write one with `fastcm stats DATA --features F --out FILE.npz`")
    stats = FeatureStats.load(path)
    name = stats.features
    if name is None:
        if stats.dim != INCEPTION_DIM:
            raise ValueError(f"eval_stats {str(path)!r} does not record its feature space and is {stats.dim}-d (not "
                             f"Inception's {INCEPTION_DIM}); re-create it with `fastcm stats --features ...`")
        name = "inception"
    return stats, name


def default_samples(stats: FeatureStats, features: str) -> int:
    """10,000 for Inception; the reference's own size for the small feature spaces (digits, pixels)."""
    if features == "inception" or not stats.n:
        return INCEPTION_SAMPLES
    return int(stats.n)


def stats_digest(stats: FeatureStats) -> str:
    """SHA-256 (first 16 hex digits) of the reference's mu and sigma: what 'the same evaluation' means on resume."""
    h = hashlib.sha256()
    for t in (stats.mu, stats.sigma):
        h.update(t.detach().double().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FIDEvaluator:
    """FID of a model's samples against ``reference`` during training (see the module docstring).

    Args:
        reference: the reference FeatureStats (e.g. of the training or test split).
        features: the feature network (images in [-1, 1] -> (B, d)), matching the reference's space.
        method: the fastcm.cm Method whose ``sample`` generates (fastcm.cm.get_method(name)).
        num_samples: K, samples per evaluation (split across ranks).
        steps: the samplers' step counts; the first one picks the best checkpoint.
        seed: the run's seed (the evaluation noise is a function of it and the sample index only).
        batch_size: images per sampler and feature-network call on each rank.
        info: the trainer's DistInfo (None: one process).
        spec: what identifies this evaluation in checkpoints (source file, feature space ...); see ``spec()``.
    """

    def __init__(self, reference: FeatureStats, features: nn.Module, method, *, num_samples: int,
                 steps: Sequence[int] = (1, 2), seed: int = 0, batch_size: int = 250, info=None,
                 device=None, spec: Optional[dict] = None):
        if not isinstance(reference, FeatureStats):
            raise TypeError(f"reference must be a FeatureStats, got {type(reference).__name__}")
        if not callable(features) or not hasattr(method, "sample"):
            raise TypeError("features must be a feature network and method a fastcm.cm Method (with .sample)")
        self.reference, self.features, self.method = reference, features, method
        self.num_samples = check_int("eval_samples", num_samples, 2)
        self.steps = check_eval_steps(steps)
        if getattr(method, "name", None) == "ict" and not set(self.steps) <= {1, 2}:
            raise ValueError(f"eval_steps for iCT must be 1 and/or 2 (its one- and two-step samplers), got "
                             f"{self.steps}")
        self.seed, self.batch_size = check_int("seed", seed, 0), check_int("eval_batch_size", batch_size)
        self.rank, self.world = (info.rank, info.world_size) if info is not None else (0, 1)
        self.device = torch.device(device) if device is not None else getattr(info, "device", torch.device("cpu"))
        self._spec = {"features": reference.features, "dim": reference.dim, "reference": stats_digest(reference),
                      "samples": self.num_samples, "metric": metric_name(self.steps[0]), **(spec or {})}
        self.best: Optional[dict] = None  # {"step", "metric", "value"} of the lowest first-steps FID so far

    # -- one evaluation -------------------------------------------------------------------------------------------

    def shard(self) -> list:
        """The global sample batches (ranges) this rank generates: the K samples are cut into batches of
        ``batch_size`` at global indices, and each rank takes a contiguous run of whole batches, so every image is
        computed in the same batch as in one process (identical images, not only identical statistics)."""
        k, b, w, r = self.num_samples, self.batch_size, self.world, self.rank
        nb = -(-k // b)
        return [range(i * b, min((i + 1) * b, k)) for i in range(r * nb // w, (r + 1) * nb // w)]

    def seeds(self, indices) -> list:
        """Per-sample seeds of global samples ``indices``: the same in every evaluation of the run."""
        return [derive_seed(self.seed, j, EVAL_STREAM) for j in indices]

    def _labels(self, model, indices) -> Optional[torch.Tensor]:
        classes = int(getattr(model, "num_classes", 0) or 0)
        return torch.tensor(list(indices), dtype=torch.int64) % classes if classes else None

    def _images(self, model, steps: int):
        """This rank's samples of the ``steps``-step sampler, one batch at a time."""
        for part in self.shard():
            labels = self._labels(model, part)
            x = self.method.sample(model, len(part), steps, labels, seeds=self.seeds(part))
            if not bool(torch.isfinite(x).all()):
                raise EvalError(f"the {steps}-step samples hold NaN/inf")
            yield x

    def local_stats(self, model, steps: int) -> FeatureStats:
        """fp64 FeatureStats of this rank's samples (empty when its shard is)."""
        if not self.shard():
            return FeatureStats(self.reference.dim, device=self.device, features=self.reference.features)
        return compute_stats(self._images(model, steps), self.features, self.batch_size, self.device,
                             name=self.reference.features)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Evaluate ``model`` (the EMA module) at ``step``: a record with fid_<k>step for each sampler, the wall time
        ``eval_seconds`` and ``eval_samples`` (rank 0's values; the others get the same record without FIDs), or with
        ``eval_error`` (one line) when the evaluation failed on any rank."""
        t0 = time.perf_counter()
        record = {"step": int(step), "eval_samples": self.num_samples}
        local, error = {}, None
        try:
            for k in self.steps:
                local[k] = self.local_stats(model, k)
        except Exception as e:  # noqa: BLE001 -- only the failures listed in recoverable() are swallowed
            if not recoverable(e):
                raise
            error = _one_line(e)
            _free_memory(self.device)
        if self._any_rank_failed(error is not None):
            record["eval_error"] = error or "failed on another rank"
        else:
            try:
                record.update(self._distances(local))
            except Exception as e:  # noqa: BLE001
                if not recoverable(e):
                    raise
                record["eval_error"] = _one_line(e)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record["eval_seconds"] = round(time.perf_counter() - t0, 4)
        return record

    def _distances(self, local: dict) -> dict:
        out = {}
        for k, stats in local.items():
            if self.world > 1:
                stats.all_reduce()  # fp64 sums of every rank (collective: every rank takes part)
            if self.rank == 0:
                value = fid(stats, self.reference)
                if not math.isfinite(value):
                    raise EvalError(f"the {k}-step Fréchet distance is not finite ({value})")
                out[metric_name(k)] = value
        return out

    def _any_rank_failed(self, failed: bool) -> bool:
        if self.world == 1:
            return failed
        import torch.distributed as dist

        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([int(failed)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- the best evaluation ------------------------------------------------------------------------------------

    def update_best(self, record: dict) -> bool:
        """Record ``record`` as the best when its first-steps FID is lower than the best so far; return whether."""
        key = metric_name(self.steps[0])
        value = record.get(key)
        if value is None or not math.isfinite(value):
            return False
        if self.best is not None and value >= self.best["value"]:
            return False
        self.best = {"step": int(record["step"]), "metric": key, "value": float(value)}
        return True

    def spec(self) -> dict:
        """What identifies this evaluation: feature space, dimension, reference digest, samples, metric."""
        return dict(self._spec)

    def config_entries(self, best_checkpoint: Optional[Path], out_dir: Path) -> dict:
        """config.json's ``evaluation`` (the spec) and ``best`` (with its file relative to the run directory)."""
        best = None if self.best is None or best_checkpoint is None else \
            {**self.best, "path": str(Path(best_checkpoint).relative_to(out_dir))}
        return {"evaluation": self.spec(), "best": best}

    def state_dict(self) -> dict:
        return {"spec": self.spec(), "best": None if self.best is None else dict(self.best)}

    def load_state_dict(self, state: Optional[dict], source: str = "the checkpoint") -> None:
        """Restore the best of a resumed run (the lower of the current and the saved one); a best measured by a
        different evaluation (another reference, feature space, sample count or first sampler) is refused, since
        comparing with it would be meaningless."""
        if not state or not state.get("best"):
            return
        saved, now = state.get("spec") or {}, self.spec()
        diff = [k for k in SPEC_KEYS if saved.get(k) != now.get(k)]
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise ValueError(f"cannot resume with a different evaluation ({changes}): the best checkpoint of {source} "
                             "was chosen by the old one. Resume with the same --eval-stats/--eval-samples/"
                             "--eval-steps, or start a new out_dir")
        if self.best is None or state["best"]["value"] < self.best["value"]:
            self.best = dict(state["best"])


def evaluator_options(cfg) -> dict:
    """build_evaluator's keyword arguments from a TrainConfig's eval_* fields (and its seed)."""
    return {"num_samples": cfg.eval_samples, "steps": cfg.eval_steps, "seed": cfg.seed,
            "batch_size": cfg.eval_batch_size, "feature_weights": cfg.eval_feature_weights, "cache": cfg.eval_cache}


def write_best(directory: Path, tensors, meta: dict, best: dict) -> Path:
    """``directory/best.safetensors``: the full checkpoint of the best step (with ``meta["best"]``), replaced
    atomically (temporary file, fsync, rename); CheckpointManager's keep-last rule never prunes it."""
    from .checkpoint import save_checkpoint

    return save_checkpoint(Path(directory) / BEST_NAME, tensors, {**meta, "best": best}, overwrite=True)


def adopt_best_file(evaluator: FIDEvaluator, path: Path) -> Optional[Path]:
    """On (re)start: take the best recorded in an existing ``checkpoints/best.safetensors`` (header only) when it
    beats the resumed checkpoint's (it may come from steps after that checkpoint); return its path, or None."""
    from .checkpoint import read_checkpoint_meta

    if not path.is_file():
        return None
    meta = read_checkpoint_meta(path)
    evaluator.load_state_dict({"spec": (meta.get("eval") or {}).get("spec"), "best": meta.get("best")},
                              source=str(path))
    return path


def recoverable(e: BaseException) -> bool:
    """Failures of an evaluation that training survives: out of memory, non-finite samples / features / FD
    (fastcm.fid raises ValueError for those), a failed matrix square root."""
    if isinstance(e, (EvalError, torch.OutOfMemoryError, ValueError, ArithmeticError, torch.linalg.LinAlgError)):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def build_evaluator(stats_path, method, *, num_samples: Optional[int] = None, steps=(1, 2), seed: int = 0,
                    batch_size: int = 250, feature_weights: Optional[str] = None, cache: Optional[str] = None,
                    info=None, device=None, input_shape=None) -> FIDEvaluator:
    """The evaluator of a statistics file: its recorded feature space picks the extractor (``feature_weights`` is
    the Inception weight file), ``num_samples`` None picks :func:`default_samples`. ``input_shape`` (the model's)
    is checked against the extractor with one probe batch."""
    reference, name = load_reference(stats_path)
    if feature_weights is not None and name != "inception":
        raise ValueError(f"eval feature weights are Inception's, but {stats_path} holds {name!r} statistics")
    dev = torch.device(device) if device is not None else getattr(info, "device", torch.device("cpu"))
    net = feature_extractor(name, weights=feature_weights if name == "inception" else None, cache=cache, device=dev)
    if input_shape is not None:
        _check_extractor(net, name, reference.dim, input_shape, dev)
    k = default_samples(reference, name) if num_samples is None else num_samples
    reference.features = name
    spec = {"stats": str(Path(stats_path))}
    return FIDEvaluator(reference, net, method, num_samples=k, steps=steps, seed=seed, batch_size=batch_size,
                        info=info, device=dev, spec=spec)


@torch.no_grad()
def _check_extractor(net, name: str, dim: int, input_shape, dev) -> None:
    try:
        probe = net(torch.zeros(2, *input_shape, device=dev))
    except ValueError as e:  # e.g. digits features on 3x32x32 images
        raise ValueError(f"eval_stats holds {name} statistics, which do not fit the model's images: {e}") from None
    if probe.shape[1] != dim:
        raise ValueError(f"eval_stats holds {dim}-d {name} statistics but the {name} extractor gives "
                         f"{probe.shape[1]}-d features")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
