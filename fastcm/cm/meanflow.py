"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, arXiv 2505.13447): one-step generation with an average-velocity net.

Convention of the paper (t = 1 is noise): z_t = (1 - t) x + t e, e ~ N(0, I), conditional velocity v = e - x.
Average velocity u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau. Differentiating (t - r) u = int_r^t v dtau in t
gives the MeanFlow identity u(z_t, r, t) = v(z_t, t) - (t - r) du/dt with du/dt = v d_z u + 0 d_r u + 1 d_t u, a JVP
along the tangent (v, 0, 1). Training (Alg. 1): u_tgt = v - (t - r) sg(du/dt); L = ||u_theta - sg(u_tgt)||^2 per sample,
with the adaptive weight sg(1 / (L + c)^p). The net is conditioned on (t, t - r) (official code). Sampling:
z_0 = z_1 - u(z_1, 0, 1), or z_r = z_t - (t - r) u(z_t, r, t) over a schedule.

The paper's text was not available here: the constants (logit-normal(-2, 2) for both times, 75 % of pairs with
r != t, p = 0.75, c = 1e-3 on CIFAR-10) are those of the official PyTorch code (py-meanflow, "v0 = paper config").
"""
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastcm._checks import check_choice, check_int, check_real, check_tensor

from .jvp import JVP_MODES, dual_pass, network_jvp
from .precond import UNetWrapper, find_wrapped, unwrap
from .sampling import PerSampleNoise, Seeds, eval_mode, model_device, resolve_labels, resolve_seeds


def meanflow_sample_times(n: int, P_mean: float = -2.0, P_std: float = 2.0, ratio: float = 0.75,
                          generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32,
                          r_P_mean: Optional[float] = None, r_P_std: Optional[float] = None):
    """(r, t), each (n,), with 0 < r <= t < 1 ("lognorm" in the paper is a logit-normal: sigmoid(N(mu, sigma))).

    Without ``r_P_mean``/``r_P_std`` (the paper's sampler, py-meanflow "v0"): two draws from logit-N(P_mean, P_std),
    t = max, r = min. With them ("v1"): t ~ logit-N(P_mean, P_std), r ~ logit-N(r_P_mean, r_P_std), r = min(t, r).
    Then, with probability 1 - ``ratio``, r = t (plain flow matching for that sample): ``ratio`` is the fraction
    of pairs with r != t.
    """
    check_real("P_mean", P_mean)
    check_real("P_std", P_std, positive=True)
    check_real("ratio", ratio, minimum=0.0, maximum=1.0)
    if (r_P_mean is None) != (r_P_std is None):
        raise ValueError("r_P_mean and r_P_std must be given together")
    dev = generator.device if generator is not None else device
    a = torch.sigmoid(P_mean + P_std * torch.randn(n, generator=generator, device=dev, dtype=torch.float64))
    if r_P_mean is None:
        b = torch.sigmoid(P_mean + P_std * torch.randn(n, generator=generator, device=dev, dtype=torch.float64))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
    else:
        check_real("r_P_mean", r_P_mean)
        check_real("r_P_std", r_P_std, positive=True)
        b = torch.sigmoid(r_P_mean + r_P_std * torch.randn(n, generator=generator, device=dev, dtype=torch.float64))
        t, r = a, torch.minimum(a, b)
    same = torch.rand(n, generator=generator, device=dev, dtype=torch.float64) >= ratio
    r = torch.where(same, t, r)
    return r.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


class MeanFlowModel(UNetWrapper):
    """u_theta(z, r, t) = unet(z, (t, t - r)): the average-velocity network (conditioned on t and h = t - r).

    Args:
        unet: called as ``unet(z, labels, class_labels=None, dropout_seed=None)`` with labels (B, 2) = (t, t - r);
            a fastcm U-Net must be built with ``time_inputs=2``.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module, got {type(unet).__name__}")
        cfg = getattr(unwrap(unet), "config", None)
        if cfg is not None and getattr(cfg, "time_inputs", 2) != 2:
            raise ValueError(f"unet must take two time inputs (build it with time_inputs=2), got "
                             f"time_inputs={cfg.time_inputs}")
        self.unet = unet

    def _time(self, name: str, v, z: Tensor) -> Tensor:
        acc = torch.promote_types(z.dtype, torch.float32)
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            v = torch.full((z.shape[0],), check_real(name, v, minimum=0.0, maximum=1.0), device=z.device, dtype=acc)
        check_tensor(name, v, shape=(z.shape[0],))
        return v.to(device=z.device, dtype=acc)

    def forward(self, z: Tensor, r, t, class_labels: Optional[Tensor] = None, dropout_seed=None) -> Tensor:
        """u(z, r, t): z (B, C, H, W); r, t floats or (B,) tensors with 0 <= r <= t <= 1 (checked for floats;
        tensor values are not checked: that would be a host sync and a graph break under torch.compile)."""
        check_tensor("z", z, ndim=4)
        if not isinstance(r, Tensor) and not isinstance(t, Tensor) and isinstance(r, numbers.Real) and \
                isinstance(t, numbers.Real) and r > t:
            raise ValueError(f"r and t must satisfy 0 <= r <= t <= 1, got r={r}, t={t}")
        r, t = self._time("r", r, z), self._time("t", t, z)
        labels = torch.stack([t, t - r], dim=1)
        return self.unet(z.to(t.dtype), labels, class_labels=class_labels, dropout_seed=dropout_seed).to(t.dtype)


def find_meanflow(model: nn.Module) -> MeanFlowModel:
    return find_wrapped(model, MeanFlowModel)


def meanflow_target(v: Tensor, r: Tensor, t: Tensor, dudt: Tensor) -> Tensor:
    """u_tgt = v - (t - r) du/dt (the MeanFlow identity), r and t of shape (B,)."""
    return v - (t - r).view(-1, *([1] * (v.dim() - 1))) * dudt


def meanflow_adaptive_loss(u: Tensor, u_tgt: Tensor, p: float = 0.75, c: float = 1e-3) -> Tensor:
    """Per-sample L / sg((L + c)^p) with L = ||u - u_tgt||^2 summed over C*H*W (official code), shape (B,).

    Its gradient is sg(w) grad L with w = 1 / (L + c)^p; p = 1/2 gives the Pseudo-Huber gradient (with c <-> c^2).
    """
    L = (u - u_tgt).flatten(1).square().sum(1)
    return L / (L.detach() + c) ** p


class MeanFlowLoss:
    """Callable returning the unreduced (B,) MeanFlow loss (Alg. 1 with adaptive weighting); the trainer takes the
    mean.

    Args:
        P_mean, P_std, ratio, r_P_mean, r_P_std: the (r, t) sampler, see :func:`meanflow_sample_times`.
        p, c: adaptive weight 1 / (L + c)^p (CIFAR-10 code: 0.75, 1e-3; ImageNet JAX code: 1.0, 0.01).
        jvp_impl: ops backend during the JVP (see :mod:`fastcm.cm.jvp`): None, the model's own route (the fused
            Triton forward+tangent kernels on CUDA, probed once), or "torch" (the reference ops).
        jvp_mode: "one_pass" (u_theta with its graph and du/dt from ONE model call on forward-AD duals, as
            py-meanflow's ``torch.func.jvp`` primal; the tangent is detached) or "two_pass" (a JVP without graph,
            then the trainable u_theta with the same dropout seed, py-meanflow's "separate u_pred"; the oracle).
    """

    def __init__(self, P_mean: float = -2.0, P_std: float = 2.0, ratio: float = 0.75, p: float = 0.75,
                 c: float = 1e-3, *, r_P_mean: Optional[float] = None, r_P_std: Optional[float] = None,
                 jvp_impl: Optional[str] = None, jvp_mode: str = "one_pass"):
        meanflow_sample_times(1, P_mean, P_std, ratio, r_P_mean=r_P_mean, r_P_std=r_P_std)  # validates
        self.p = check_real("p", p, minimum=0.0)
        self.c = check_real("c", c, positive=True)
        self.P_mean, self.P_std, self.ratio = float(P_mean), float(P_std), float(ratio)
        self.r_P_mean, self.r_P_std, self.jvp_impl = r_P_mean, r_P_std, jvp_impl
        check_choice("jvp_mode", jvp_mode, JVP_MODES)
        self.jvp_mode = jvp_mode

    def target(self, model, z: Tensor, r: Tensor, t: Tensor, v: Tensor, class_labels=None, dropout_seed=None):
        """(u^-, u_tgt): the stop-gradient u(z, r, t) and v - (t - r) du/dt, du/dt the JVP along (v, 0, 1)."""
        mf = find_meanflow(model)
        # mf.forward, not mf(...): a torch.compile'd module call (Trainer compile=True) cannot run under
        # torch.func.jvp ("meta conversion of a view functorch tensor"); the JVP runs eagerly (fastcm.cm.jvp).
        u_minus, dudt = network_jvp(mf, lambda zz, rr, tt: mf.forward(zz, rr, tt, class_labels, dropout_seed),
                                    (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), impl=self.jvp_impl)
        return u_minus, meanflow_target(v, r, t, dudt)

    def __call__(self, model, x0: Tensor, step: int = 0, class_labels: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-sample loss (B,) for images x0 (B, C, H, W) in [-1, 1]; ``model`` a MeanFlowModel (optionally
        compiled / DDP-wrapped); ``step`` is unused (no curriculum); ``generator`` drives (r, t), e and dropout."""
        check_tensor("x0", x0, ndim=4)
        find_meanflow(model)
        acc = torch.promote_types(x0.dtype, torch.float32)
        x0 = x0.to(acc)
        dev = generator.device if generator is not None else x0.device
        r, t = meanflow_sample_times(x0.shape[0], self.P_mean, self.P_std, self.ratio, generator, x0.device, acc,
                                     r_P_mean=self.r_P_mean, r_P_std=self.r_P_std)
        e = torch.randn(x0.shape, generator=generator, device=dev, dtype=acc).to(x0.device)
        seed = torch.randint(0, 2**31 - 1, (), generator=generator, device=dev).to(x0.device)
        tv = t.view(-1, 1, 1, 1)
        z, v = (1 - tv) * x0 + tv * e, e - x0
        if self.jvp_mode == "one_pass":  # u_theta and du/dt along (v, 0, 1) from one call
            u, dudt = dual_pass(find_meanflow(model), lambda zz, rr, tt: model(zz, rr, tt, class_labels,
                                                                               dropout_seed=seed),
                                (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), impl=self.jvp_impl)
            u_tgt = meanflow_target(v, r, t, dudt.to(u.dtype))
        else:
            _, u_tgt = self.target(model, z, r, t, v, class_labels, seed)
            u = model(z, r, t, class_labels, dropout_seed=seed)
        return meanflow_adaptive_loss(u, u_tgt, self.p, self.c)


def _check_times(times) -> list:
    try:
        times = [float(s) for s in times]
    except (TypeError, ValueError):
        raise TypeError(f"times must be a sequence of floats, got {times!r}") from None
    if len(times) < 2 or times[0] > 1 or times[-1] < 0 or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be >= 2 strictly descending values in [0, 1] (e.g. (1.0, 0.0)), got {times}")
    return times


@torch.no_grad()
def meanflow_sample(model, n: int, class_labels=None, steps: int = 1, times: Optional[Sequence[float]] = None,
                    generator: Optional[torch.Generator] = None, *, seeds: Seeds = None,
                    clip: bool = True) -> Tensor:
    """n samples (n, C, H, W) in [-1, 1] from a MeanFlowModel (eval mode, restored after).

    z_1 = e ~ N(0, I); for consecutive (t, r) of ``times``: z_r = z_t - (t - r) u(z_t, r, t). ``times`` None gives
    ``steps`` + 1 equal intervals from 1 to 0; one step is z_0 = z_1 - u(z_1, 0, 1). Sample j depends on seeds[j] only.
    """
    mf = find_meanflow(model)
    check_int("n", n)
    if times is None:
        check_int("steps", steps)
        times = [1.0 - k / steps for k in range(steps + 1)]
    times = _check_times(times)
    noise = PerSampleNoise(resolve_seeds(n, seeds, generator))
    device, shape = model_device(model), tuple(mf.input_shape)
    labels = resolve_labels(class_labels, n, mf.num_classes, noise, device)
    with eval_mode(model):
        z = noise.randn(shape, device)
        for t, r in zip(times, times[1:]):
            z = z - (t - r) * model(z, r, t, labels)
    return z.clamp(-1.0, 1.0) if clip else z
