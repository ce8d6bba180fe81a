"""Stage 2: FD-loss fine-tune. One-step samples with gradient -> a feature network -> the Frechet distance of their
features to reference statistics of the training data (fastcm.fid.FDLoss, queue mode by default), optionally plus
a weighted iCT term; EMA of the weights for evaluation.

Each generated sample j of the global batch draws its noise (and label) from its own generator seeded from
(seed, step, j), so the global batch, and with it the loss and the gradient, do not depend on how many ranks
share it. Under DDP every rank gathers all ranks' features (FDLoss does), computes the same FD, and
back-propagates into its own samples; DDP then averages the ranks' gradients, so the FD term is multiplied by
the world size before backward to apply the full-batch gradient (see fastcm.fid.distributed).

Dropout. By default the FD term's samples are generated *without* the U-Net's dropout: the FD is then measured on
the samples that sampling and evaluation produce (dropout only perturbs them, and lowering the FD of perturbed
samples is a different objective). ``fd_dropout=True`` keeps it on, with masks that are a function of
(seed, step, global sample index) alone (one seed per sample, fastcm.nn.dropout_keep_mask), so N ranks still
equal one process. The optional iCT term always trains with dropout, as iCT does.
"""
import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastcm.cm import ICTLoss, method_of_model
from fastcm.cm.precond import unwrap
from fastcm.data import BatchLoader, derive_seed
from fastcm.fid import FDLoss, FeatureStats, compute_stats
from fastcm.fid.loss import normalize_fd
from fastcm.nn import SeededDropout

from .config import FDConfig
from .ict import check_dataset
from .loop import Trainer, TrainResult
from .progress import CallbackLike

_NOISE_STREAM, _ICT_STREAM, _DROPOUT_STREAM = 0xFD, 0x1C7, 0xD0


def finetune_fd(cfg: FDConfig, model: nn.Module, feature_net: nn.Module, ref_stats, *, dataset=None,
                out_dir=None, resume=False, restart: bool = False, device=None,
                callbacks: Optional[Sequence[CallbackLike]] = None, progress: bool = True,
                allow_data_change: bool = False) -> TrainResult:
    """Fine-tune ``model`` (e.g. ``load_model(checkpoint)``: an iCT ConsistencyModel, an sCT TrigFlowModel or a
    MeanFlowModel) to lower the FD of its one-step samples (the method's own one-step generator, see
    :func:`one_step_generate`).

    Args:
        feature_net: any module mapping images (B, C, H, W) in [-1, 1] to features (B, d) (a digits classifier's
            penultimate layer, FID Inception-v3 …); it is frozen (eval mode, no parameter gradients) but
            differentiated through.
        ref_stats: reference statistics of the training data in the same feature space: a FeatureStats (see
            :func:`reference_stats`), or a (mu, sigma) pair.
        dataset: training images, needed only for the iCT term (cfg.ict_weight > 0).
        out_dir, resume, restart, device, callbacks, progress, allow_data_change: as for
            :func:`fastcm.train.train_ict` (``dataset``, when given, is fingerprinted and checked on resume).
    Logged: ``fd`` (the FD of the global batch itself, also with fd_normalize), ``loss`` (the objective).
    """
    if not isinstance(cfg, FDConfig):
        raise TypeError(f"cfg must be an FDConfig, got {type(cfg).__name__}")
    if not isinstance(feature_net, nn.Module):
        raise TypeError(f"feature_net must be an nn.Module, got {type(feature_net).__name__}")
    mu, sigma = _moments(ref_stats)
    trainer = Trainer("fd", cfg, model, out_dir=out_dir, device=device, callbacks=callbacks, progress=progress)
    cm, dev, info, B = trainer.cm, trainer.device, trainer.info, trainer.local_batch
    feature_net = feature_net.to(dev).eval().requires_grad_(False)
    _check_features(feature_net, cm, mu.numel(), dev)
    fd = FDLoss(mu, sigma, mode=cfg.fd_mode, queue_size=cfg.queue_size, ema_beta=cfg.fd_ema_beta).to(dev)
    trainer.extra["fd_loss"] = FDLossState(fd)
    if cfg.ict_weight > 0 and trainer.method != "ict":
        raise ValueError(f"ict_weight={cfg.ict_weight} adds an iCT term, which needs an iCT model; this one is "
                         f"{trainer.method!r} (use ict_weight=0)")
    ict_term = _ict_term(cfg, dataset, trainer) if cfg.ict_weight > 0 else None
    trainer.curriculum = lambda k: {"fd_mode": cfg.fd_mode, "ict_N": cfg.s1 + 1 if ict_term else None}
    trainer.start(resume, restart, data=dataset, allow_data_change=allow_data_change)
    if ict_term is not None:
        ict_term.batches = ict_term.loader.iterate(trainer.step)

    def loss_fn(step: int):
        start = info.rank * B  # global index of this rank's first sample
        z, labels = one_step_inputs(cfg.seed, step, start, B, cm.input_shape, cm.num_classes, cfg.balanced_labels)
        z, labels = z.to(dev), None if labels is None else labels.to(dev)
        seeds = dropout_seeds(cfg.seed, step, start, B).to(dev) if cfg.fd_dropout else None
        with contextlib.nullcontext() if cfg.fd_dropout else dropout_off(cm):
            x = one_step_generate(trainer.net, z, labels, seeds)  # with gradient
        feats = feature_net(x)
        with torch.autocast(dev.type, enabled=False):  # the FD is computed in fp64
            fd_value = fd(feats.float())
        objective = normalize_fd(fd_value) if cfg.fd_normalize else fd_value  # what FDLoss(normalize=True) returns
        total, logged, extras = objective * info.world_size, objective.detach(), {"fd": fd_value.detach()}
        if ict_term is not None:
            ict_mean = ict_term(step)
            total = total + cfg.ict_weight * ict_mean
            logged = logged + cfg.ict_weight * ict_mean.detach()
            extras["ict"] = ict_mean.detach()
        extras["loss"] = logged  # the objective (normalised FD) + w * iCT, without the DDP factor
        return total, extras

    return trainer.run(loss_fn)


def one_step_generate(model: nn.Module, z: Tensor, labels=None, dropout_seed=None) -> Tensor:
    """The method's one-step sample of unit noise z (with gradient; ``model`` may be DDP/compile-wrapped), as its
    sampler computes it (without the final clamp):
    iCT x = f(sigma_max z, sigma_max); sCT x = f(sigma_d z, t_max) (TrigFlow, sCM Sec. 5); MeanFlow
    x = z - u(z, 0, 1) (MeanFlow Eq. 12)."""
    inner, B = unwrap(model), z.shape[0]
    name = method_of_model(inner)
    if name == "ict":
        return model(z * inner.sigma_max, torch.full((B,), inner.sigma_max, device=z.device), labels,
                     dropout_seed=dropout_seed)
    if name == "sct":
        return model(z * inner.sigma_data, torch.full((B,), inner.t_max, device=z.device), labels,
                     dropout_seed=dropout_seed)
    r, t = torch.zeros(B, device=z.device), torch.ones(B, device=z.device)
    return z - model(z, r, t, labels, dropout_seed=dropout_seed)


def one_step_inputs(seed: int, step: int, start: int, n: int, shape, num_classes: int, balanced: bool):
    """Noise (n, *shape) and labels (n,) (None when unconditional) of global samples start .. start + n - 1.

    Sample j uses a CPU generator seeded from (seed, step, j): the same global batch on any number of ranks.
    Balanced labels are j mod num_classes (equal shares of every class in a batch of a multiple of it)."""
    zs, labels = [], []
    for j in range(start, start + n):
        g = torch.Generator().manual_seed(derive_seed(seed, step, j, _NOISE_STREAM))
        zs.append(torch.randn(tuple(shape), generator=g))
        if num_classes and not balanced:
            labels.append(int(torch.randint(0, num_classes, (), generator=g)))
    if not num_classes:
        return torch.stack(zs), None
    y = torch.arange(start, start + n) % num_classes if balanced else torch.tensor(labels)
    return torch.stack(zs), y.long()


def dropout_seeds(seed: int, step: int, start: int, n: int) -> Tensor:
    """int64 dropout seeds (n,) of global samples start .. start + n - 1 at ``step``: one mask per sample, the same
    on any number of ranks."""
    return torch.tensor([derive_seed(seed, step, j, _DROPOUT_STREAM) for j in range(start, start + n)],
                        dtype=torch.int64)


@contextlib.contextmanager
def dropout_off(module: nn.Module):
    """Evaluate ``module``'s SeededDropout layers as in eval mode (identity) inside the block; the rest stays."""
    layers = [m for m in module.modules() if isinstance(m, SeededDropout) and m.training]
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m in layers:
            m.training = True


@torch.no_grad()
def reference_stats(feature_net: nn.Module, dataset, batch_size: int = 256, device=None) -> FeatureStats:
    """fp64 feature statistics of every image of ``dataset`` (the FD stage's reference): ``fid.compute_stats``
    with ``distributed=True``, so under torch.distributed each rank reads a disjoint shard and every rank returns
    the statistics of the whole dataset."""
    if len(dataset) < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {len(dataset)}")
    if not hasattr(dataset, "get_batch"):
        dataset = _Items(dataset)
    return compute_stats(dataset, feature_net, batch_size, device, distributed=True)


class FDLossState:
    """Saves / restores an FDLoss's queue or EMA moments, so a resumed fine-tune continues with the same queue.

    FDLoss keeps that state in non-persistent buffers (absent from its state_dict) and in the integer counters
    ``count``, ``ptr``, ``steps``; every registered buffer is saved. The reference buffers are saved too and must
    match on resume: a run cannot silently continue against different reference statistics.
    """

    REFERENCE = ("mu_ref", "sigma_ref")
    COUNTERS = ("count", "ptr", "steps")

    def __init__(self, fd: FDLoss):
        self.fd = fd

    def state_dict(self) -> dict:
        out = {k: v for k, v in self.fd._buffers.items() if v is not None}
        out.update({k: int(getattr(self.fd, k)) for k in self.COUNTERS if hasattr(self.fd, k)})
        return out

    def load_state_dict(self, state: dict) -> None:
        dev = self.fd.mu_ref.device
        for k in self.REFERENCE:
            if k in state and not torch.equal(state[k].to(dev), getattr(self.fd, k)):
                raise ValueError(f"the checkpoint's FD reference statistics ({k}) differ from ref_stats; resume with "
                                 "the reference it was trained against, or start a new out_dir")
        for k in self.fd._buffers:
            if k not in self.REFERENCE:
                setattr(self.fd, k, state[k].to(dev) if k in state else None)
        for k in self.COUNTERS:
            if k in state:
                setattr(self.fd, k, int(state[k]))


class _ICTTerm:
    """The optional iCT regulariser at the final curriculum (N = s1 + 1 levels throughout)."""

    def __init__(self, cfg: FDConfig, trainer: Trainer, loader: BatchLoader, conditional: bool):
        self.loss = ICTLoss(cfg.total_steps, cfg.s1, cfg.s1, cfg.P_mean, cfg.P_std, cfg.rho, cfg.huber_c)
        self.trainer, self.loader, self.conditional, self.batches = trainer, loader, conditional, None

    def __call__(self, step: int) -> Tensor:
        t = self.trainer
        x, y = next(self.batches)
        x = x.to(t.device, non_blocking=True)
        labels = y.to(t.device, non_blocking=True) if self.conditional else None
        return self.loss(t.net, x, step, labels, generator=t.generator(step, _ICT_STREAM)).mean()


def _ict_term(cfg: FDConfig, dataset, trainer: Trainer) -> _ICTTerm:
    if dataset is None:
        raise ValueError(f"ict_weight={cfg.ict_weight} needs the training dataset (dataset=...)")
    conditional = check_dataset(dataset, trainer.cm)
    info = trainer.info
    loader = BatchLoader(dataset, trainer.local_batch, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                         hflip=cfg.hflip, num_workers=cfg.num_workers)
    return _ICTTerm(cfg, trainer, loader, conditional)


def _moments(ref_stats):
    if isinstance(ref_stats, (tuple, list)) and len(ref_stats) == 2:
        mu, sigma = ref_stats
    elif hasattr(ref_stats, "mu") and hasattr(ref_stats, "sigma"):
        mu, sigma = ref_stats.mu, ref_stats.sigma
    else:
        raise TypeError(f"ref_stats must be a FeatureStats or a (mu, sigma) pair, got {type(ref_stats).__name__}")
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    if mu.dim() != 1 or sigma.shape != (mu.numel(), mu.numel()):
        raise ValueError(f"ref_stats must hold mu (d,) and sigma (d, d), got {tuple(mu.shape)} and "
                         f"{tuple(sigma.shape)}")
    return mu, sigma


@torch.no_grad()
def _check_features(feature_net: nn.Module, cm, dim: int, dev) -> None:
    probe = feature_net(torch.zeros(2, *cm.input_shape, device=dev))
    if not isinstance(probe, Tensor) or probe.shape != (2, dim):
        got = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(f"feature_net must map (B, {', '.join(map(str, cm.input_shape))}) images to (B, {dim}) "
                         f"features to match ref_stats, got {got} for B = 2")


class _Items:
    """A map-style dataset (``dataset[i] = (image, label)``) read in batches, as compute_stats reads datasets."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def get_batch(self, index: Tensor):
        return (torch.stack([torch.as_tensor(self.dataset[int(i)][0]) for i in index]).float(),)



