"""sCT: continuous-time consistency training in TrigFlow (Lu & Song 2025, "Simplifying, Stabilizing & Scaling
Continuous-Time Consistency Models", arXiv 2410.11081; equation numbers are the paper's).

TrigFlow (Sec. 3, Eqs. 3-5): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2];
f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, c_noise(t)) with c_noise(t) = t (Sec. 4.1).

One training iteration (Alg. 1): tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d); dx_t/dt = cos(t) z - sin(t) x0;
  g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt)    (Eq. 6 times cos t, warm-up r)
  g = g / (||g|| + c)                                                                 (tangent normalisation)
  L = e^{w_phi(t)} / D ||F_theta(x_t/sigma_d, t) - F^-(x_t/sigma_d, t) - g||^2 - w_phi(t)           (Eq. 8)
with F^- = stopgrad(F_theta), r = min(1, step / H), c = 0.1, H = 10 000 (App. G.2), D = dim(x0). The JVP uses the
"JVP rearrangement" of Sec. 5.1: primal (x_t / sigma_d, t), tangent (cos t sin t dx_t/dt / sigma_d, cos t sin t), which
returns cos t sin t dF^-/dt directly, so no intermediate carries the 1/sin or 1/cos blow-ups.
"""
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastcm._checks import check_choice, check_int, check_real, check_tensor

from .jvp import JVP_MODES, dual_pass, network_jvp
from .precond import UNetWrapper, find_wrapped
from .sampling import PerSampleNoise, Seeds, eval_mode, model_device, resolve_labels, resolve_seeds

TANGENT_NORMS = ("l2", "rms")
OUTPUTS = ("f", "F", "F_and_weight")


def trigflow_time(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """t = arctan(sigma / sigma_d): the TrigFlow time of an EDM noise level (Eq. 30; then x_t = cos(t) x_sigma)."""
    return torch.atan(sigma / sigma_data)


def trigflow_sigma(t: Tensor, sigma_data: float = 0.5) -> Tensor:
    """sigma = sigma_d tan(t), the inverse of :func:`trigflow_time` (SNR = 1 / tan^2 t, Eq. 34)."""
    return sigma_data * torch.tan(t)


def trigflow_interpolate(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = cos(t) x0 + sin(t) z with t of shape (B,) broadcast over the image dims."""
    tv = t.view(-1, *([1] * (x0.dim() - 1)))
    return tv.cos() * x0 + tv.sin() * z


def sct_sample_t(n: int, P_mean: float = -1.0, P_std: float = 1.4, sigma_data: float = 0.5,
                 generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32) -> Tensor:
    """sCT's time proposal (Alg. 1): log(sigma_d tan t) ~ N(P_mean, P_std^2), i.e. t = arctan(e^tau / sigma_d)."""
    check_real("P_std", P_std, positive=True)
    check_real("P_mean", P_mean)
    dev = generator.device if generator is not None else device
    tau = P_mean + P_std * torch.randn(n, generator=generator, device=dev, dtype=torch.float64)
    return torch.atan(tau.exp() / sigma_data).to(device=device, dtype=dtype)


class AdaptiveWeight(nn.Module):
    """w_phi(t) of Eq. 8 ("following EDM2"): fixed random Fourier features of c_noise(t) = t, then a linear layer.

    EDM2's uncertainty weighting: at the optimum e^{w*(t)} / D E||.||^2 = 1 (App. D). The layer starts at zero, so
    training starts from the unweighted loss ||.||^2 / D.
    """

    def __init__(self, channels: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # fixed features: part of the architecture, not of the init seed
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        feats = math.sqrt(2) * torch.cos(t[:, None].to(self.freqs.dtype) * self.freqs + self.phases)
        return self.linear(feats.to(self.linear.weight.dtype)).squeeze(1)


class TrigFlowModel(UNetWrapper):
    """f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t) around a fastcm U-Net (Eq. 5).

    Args:
        unet: network called as ``unet(x, noise_labels, class_labels=None, dropout_seed=None)`` with noise_labels =
            c_noise(t) = t. For a fastcm U-Net build it with ``time_scale=1`` (sCM Sec. 4.1: positional embedding
            of t itself, no large frequency factor); see :data:`fastcm.cm.methods.METHODS`.
        sigma_data: data standard deviation (0.5 for data in [-1, 1]).
        sigma_max: one-step sampling starts at t_max = arctan(sigma_max / sigma_d) (80 -> 1.56454 for 0.5).
        weight_channels: Fourier features of the adaptive weight w_phi(t) (0: no adaptive weighting, w = 0).
    """

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, sigma_max: float = 80.0, weight_channels: int = 128):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module, got {type(unet).__name__}")
        self.sigma_data = check_real("sigma_data", sigma_data, positive=True)
        self.sigma_max = check_real("sigma_max", sigma_max, positive=True)
        check_int("weight_channels", weight_channels, minimum=0)
        self.unet = unet
        self.weight = AdaptiveWeight(weight_channels) if weight_channels else None

    @property
    def t_max(self) -> float:
        return math.atan(self.sigma_max / self.sigma_data)

    def _time(self, t, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            if not 0 <= t <= math.pi / 2:
                raise ValueError(f"t must lie in [0, pi/2] (TrigFlow time), got {t!r}")
            t = torch.full((x.shape[0],), float(t), device=x.device, dtype=acc)
        check_tensor("t", t, shape=(x.shape[0],))
        return t.to(device=x.device, dtype=acc)

    def F_theta(self, x_in: Tensor, t: Tensor, class_labels=None, dropout_seed=None) -> Tensor:
        """The raw network F_theta(x_in, c_noise(t)) with c_noise(t) = t; x_in = x_t / sigma_d."""
        return self.unet(x_in, t, class_labels=class_labels, dropout_seed=dropout_seed)

    def forward(self, x_t: Tensor, t, class_labels: Optional[Tensor] = None, dropout_seed=None, output: str = "f"):
        """``output="f"``: f_theta(x_t, t) (Eq. 5); ``"F"``: F_theta(x_t / sigma_d, t); ``"F_and_weight"``:
        (F_theta, w_phi(t)), the trainable pass of the sCT loss (through forward so DDP sees every parameter).
        x_t: (B, C, H, W); t: a float or (B,) tensor in [0, pi/2]."""
        check_tensor("x_t", x_t, ndim=4)
        check_choice("output", output, OUTPUTS)
        t = self._time(t, x_t)  # tensor values are not range-checked: a host sync, a graph break under compile
        acc = t.dtype
        F_x = self.F_theta(x_t.to(acc) / self.sigma_data, t, class_labels, dropout_seed).to(acc)
        if output == "F":
            return F_x
        if output == "F_and_weight":
            w = self.weight(t).to(acc) if self.weight is not None else torch.zeros_like(t)
            return F_x, w
        tv = t.view(-1, 1, 1, 1)
        return tv.cos() * x_t.to(acc) - tv.sin() * self.sigma_data * F_x


def find_trigflow(model: nn.Module) -> TrigFlowModel:
    return find_wrapped(model, TrigFlowModel)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H) (Alg. 1; H = 10 000 in every sCM experiment); H = 0 disables the warm-up (r = 1)."""
    check_int("step", step, minimum=0)
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def sct_tangent(F_minus: Tensor, jvp_out: Tensor, x_t: Tensor, dxt_dt: Tensor, t: Tensor, sigma_data: float,
                r: float = 1.0) -> Tensor:
    """g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d jvp_out), jvp_out = cos t sin t dF^-/dt.

    With r = 1 this is cos(t) df^-/dt of Eq. 6; r < 1 is the tangent warm-up (Sec. 4.2: sin t -> r sin t in the
    second term only).
    """
    tv = t.view(-1, *([1] * (x_t.dim() - 1)))
    cos, sin = tv.cos(), tv.sin()
    return -cos**2 * (sigma_data * F_minus - dxt_dt) - r * (cos * sin * x_t + sigma_data * jvp_out)


def normalize_tangent(g: Tensor, c: float = 0.1, norm: str = "l2") -> Tensor:
    """g / (||g|| + c) per sample (Alg. 1, c = 0.1). ``norm="l2"``: the paper's ||g||_2 over all of C*H*W (as rCM);
    ``"rms"``: ||g||_2 / sqrt(D) (FastGen's ``g_norm_spatial_invariance``). The norm is taken in fp64."""
    check_choice("norm", norm, TANGENT_NORMS)
    n = g.detach().double().flatten(1).norm(dim=1)
    if norm == "rms":
        n = n / math.sqrt(g[0].numel())
    return g / (n + c).to(g.dtype).view(-1, *([1] * (g.dim() - 1)))


def sct_adaptive_loss(F_theta: Tensor, target: Tensor, w: Tensor) -> Tensor:
    """Per-sample e^{w} / D ||F_theta - target||^2 - w (Eq. 8 with target = F^- + g), shape (B,)."""
    D = F_theta[0].numel()
    return w.exp() / D * (F_theta - target).flatten(1).square().sum(1) - w


class SCTLoss:
    """Callable returning the unreduced (B,) sCT loss of Eq. 8 (Alg. 1); the trainer takes the mean.

    Args:
        P_mean, P_std: the time proposal (CIFAR-10: -1.0 / 1.4; ImageNet-64: -1.0 / 1.6; App. G.2).
        tangent_c: c of the tangent normalisation (0.1); None disables it (sCM Fig. 5a ablation).
        warmup_steps: H of the tangent warm-up (10 000); 0 disables it.
        tangent_norm: "l2" (the paper's ||g||) or "rms" (FastGen), see :func:`normalize_tangent`.
        jvp_impl: ops backend during the JVP (see :mod:`fastcm.cm.jvp`): None, the model's own route (the fused
            Triton forward+tangent kernels on CUDA, probed once), or "torch" (the reference ops).
        jvp_mode: "one_pass" (F_theta with its graph, w_phi(t) and the tangent from ONE model call on forward-AD
            duals: the adaptive weight is in the same call, it is a linear layer on t) or "two_pass" (a
            ``torch.func.jvp`` without graph, then the trainable call; the oracle). See :mod:`fastcm.cm.jvp`.
    """

    def __init__(self, P_mean: float = -1.0, P_std: float = 1.4, tangent_c: Optional[float] = 0.1,
                 warmup_steps: int = 10_000, tangent_norm: str = "l2", jvp_impl: Optional[str] = None,
                 jvp_mode: str = "one_pass"):
        sct_sample_t(1, P_mean, P_std)  # validates P_mean, P_std
        if tangent_c is not None:
            check_real("tangent_c", tangent_c, positive=True)
        check_int("warmup_steps", warmup_steps, minimum=0)
        check_choice("tangent_norm", tangent_norm, TANGENT_NORMS)
        check_choice("jvp_mode", jvp_mode, JVP_MODES)
        self.jvp_mode = jvp_mode
        self.P_mean, self.P_std, self.tangent_c = float(P_mean), float(P_std), tangent_c
        self.warmup_steps, self.tangent_norm, self.jvp_impl = int(warmup_steps), tangent_norm, jvp_impl

    def tangent(self, model, x_t: Tensor, t: Tensor, dxt_dt: Tensor, step: int, class_labels=None,
                dropout_seed=None):
        """(F^-, g): the stop-gradient network output and the normalised, warmed-up tangent (no graph)."""
        tf = find_trigflow(model)
        sd = tf.sigma_data
        cs = (t.cos() * t.sin()).view(-1, 1, 1, 1)  # JVP rearrangement (Sec. 5.1)
        F_minus, jvp_out = network_jvp(
            tf, lambda x_in, tt: tf.F_theta(x_in, tt, class_labels, dropout_seed).to(x_t.dtype),
            (x_t / sd, t), (cs * dxt_dt / sd, cs.flatten()), impl=self.jvp_impl)
        return F_minus, self._g(F_minus, jvp_out, x_t, t, dxt_dt, step, sd)

    def _g(self, F_minus, jvp_out, x_t, t, dxt_dt, step, sd):
        g = sct_tangent(F_minus, jvp_out, x_t, dxt_dt, t, sd, tangent_warmup(step, self.warmup_steps))
        if self.tangent_c is not None:
            g = normalize_tangent(g, self.tangent_c, self.tangent_norm)
        return g

    def one_pass(self, model, x_t: Tensor, t: Tensor, dxt_dt: Tensor, step: int, class_labels=None,
                 dropout_seed=None):
        """(F_theta with its graph, w_phi(t), F^-, g) from one call of ``model`` on dual inputs: the tangent of x_t
        is cos t sin t dx_t/dt and that of t is cos t sin t (Sec. 5.1, the forward divides x_t by sigma_d), so the
        output's tangent is cos t sin t dF^-/dt as in :meth:`tangent`; F^- = sg(F_theta)."""
        tf = find_trigflow(model)
        cs = t.cos() * t.sin()  # JVP rearrangement (Sec. 5.1)
        (F_x, w), jvp_out = dual_pass(
            tf, lambda xx, tt: model(xx, tt, class_labels, dropout_seed=dropout_seed, output="F_and_weight"),
            (x_t, t), (cs.view(-1, 1, 1, 1) * dxt_dt, cs), impl=self.jvp_impl)
        F_minus = F_x.detach()
        return F_x, w, F_minus, self._g(F_minus, jvp_out.to(F_minus.dtype), x_t, t, dxt_dt, step, tf.sigma_data)

    def __call__(self, model, x0: Tensor, step: int, class_labels: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-sample loss (B,) for images x0 (B, C, H, W) in [-1, 1]. ``model``: a TrigFlowModel (optionally
        compiled / DDP-wrapped); ``generator`` (any device) drives t, z and the dropout seed shared by both passes."""
        check_tensor("x0", x0, ndim=4)
        tf = find_trigflow(model)
        acc = torch.promote_types(x0.dtype, torch.float32)
        x0 = x0.to(acc)
        dev = generator.device if generator is not None else x0.device
        t = sct_sample_t(x0.shape[0], self.P_mean, self.P_std, tf.sigma_data, generator, x0.device, acc)
        z = tf.sigma_data * torch.randn(x0.shape, generator=generator, device=dev, dtype=acc).to(x0.device)
        seed = torch.randint(0, 2**31 - 1, (), generator=generator, device=dev).to(x0.device)
        x_t = trigflow_interpolate(x0, z, t)
        tv = t.view(-1, 1, 1, 1)
        dxt_dt = tv.cos() * z - tv.sin() * x0  # the unbiased sCT estimate of dx_t/dt (Alg. 1)
        if self.jvp_mode == "one_pass":
            F_x, w, F_minus, g = self.one_pass(model, x_t, t, dxt_dt, step, class_labels, seed)
        else:
            F_minus, g = self.tangent(model, x_t, t, dxt_dt, step, class_labels, seed)
            F_x, w = model(x_t, t, class_labels, dropout_seed=seed, output="F_and_weight")
        return sct_adaptive_loss(F_x, F_minus + g, w)


@torch.no_grad()
def sct_sample(model, n: int, class_labels=None, ts: Optional[Sequence[float]] = None,
               generator: Optional[torch.Generator] = None, *, seeds: Seeds = None, clip_denoised: bool = True,
               intermediate_t: float = 1.1, steps: int = 1) -> Tensor:
    """n samples (n, C, H, W) in [-1, 1] from a TrigFlowModel (Sec. 5 / App. G.2; eval mode, restored after).

    x = f(sigma_d z, t_max), then for each further t: x = f(cos(t) x + sin(t) sigma_d z', t). ``ts``: descending
    TrigFlow times; None gives ``steps`` = 1 -> (t_max,), 2 -> (t_max, 1.1) (sCM's two-step time for every
    experiment). Sample j depends on seeds[j] only (see fastcm.cm.sampling.resolve_seeds).
    """
    tf = find_trigflow(model)
    check_int("n", n)
    if ts is None:
        if steps not in (1, 2):
            raise ValueError(f"steps must be 1 or 2 when ts is None (pass ts for more), got {steps!r}")
        ts = (tf.t_max,) if steps == 1 else (tf.t_max, intermediate_t)
    ts = [float(t) for t in ts]
    if not ts or not all(0 < t <= math.pi / 2 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"ts must be strictly descending TrigFlow times in (0, pi/2], got {ts}")
    noise = PerSampleNoise(resolve_seeds(n, seeds, generator))
    device, shape, sd = model_device(model), tuple(tf.input_shape), tf.sigma_data
    labels = resolve_labels(class_labels, n, tf.num_classes, noise, device)
    with eval_mode(model):
        x = sd * noise.randn(shape, device)  # x_{t_max} ~ N(0, sigma_d^2 I): TrigFlow's prior at pi/2
        for i, t in enumerate(ts):
            if i:
                x = math.cos(t) * x + math.sin(t) * sd * noise.randn(shape, device)
            x = model(x, t, labels)
            x = x.clamp(-1.0, 1.0) if clip_denoised else x
    return x.clamp(-1.0, 1.0)
