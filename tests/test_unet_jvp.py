"""Forward-mode AD through the U-Net on the reference ops (impl="torch"): torch.func.jvp with respect to (x, t)
matches a central finite difference in fp64 for every preset small enough for the CPU, in training mode (seeded
dropout: the mask is a function of the seed, so both FD evaluations and the JVP see one mask). Also the second time
input (MeanFlow's (t, t - r)) and the time_scale field of the config (sCT's c_noise = t)."""
import dataclasses

import pytest
import torch
from torch import nn

from fastcm.models import PRESETS, UNetConfig, build_unet

CPU_PRESETS = ("tiny", "digits", "cifar10-small")  # cifar10 (56M) and imagenet64 (296M) are GPU-sized


def _random_net(preset, **overrides):
    torch.manual_seed(0)
    net = build_unet(preset, impl="torch", **overrides).double()
    for m in net.modules():  # the zero-initialised last layers would make F and its tangent identically zero
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.2)
    return net.train()


def _inputs(net, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, *net.input_shape, dtype=torch.float64, generator=g)
    k = net.config.time_inputs
    shape = (B,) if k == 1 else (B, k)
    t = torch.rand(shape, dtype=torch.float64, generator=g) + 0.2
    labels = torch.arange(B) % net.num_classes if net.num_classes else None
    return x, t, torch.randn_like(x), torch.randn_like(t), labels


def _jvp_vs_fd(net, eps=1e-6):
    x, t, dx, dt, labels = _inputs(net)
    seed = torch.tensor(7)
    f = lambda a, b: net(a, b, labels, dropout_seed=seed)  # noqa: E731
    with torch.no_grad():
        out, tangent = torch.func.jvp(f, (x, t), (dx, dt))
        fd = (f(x + eps * dx, t + eps * dt) - f(x - eps * dx, t - eps * dt)) / (2 * eps)
        ref = f(x, t)
    return out, tangent, fd, ref


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_unet_jvp_matches_central_difference(preset):
    net = _random_net(preset)
    out, tangent, fd, ref = _jvp_vs_fd(net)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # the JVP's primal is the plain forward
    assert tangent.abs().max() > 1e-3  # a real tangent, not a silent zero
    scale = fd.abs().max()
    assert (tangent - fd).abs().max() <= 1e-6 * scale, (tangent - fd).abs().max() / scale


def test_unet_jvp_time_only_and_x_only_directions():
    """The two partial derivatives separately (the t-part is what sCM's Eq. 7 warns about)."""
    net = _random_net("tiny")
    x, t, dx, dt, labels = _inputs(net)
    f = lambda a, b: net(a, b, labels, dropout_seed=3)  # noqa: E731
    eps = 1e-6
    with torch.no_grad():
        _, jt = torch.func.jvp(f, (x, t), (torch.zeros_like(x), dt))
        _, jx = torch.func.jvp(f, (x, t), (dx, torch.zeros_like(t)))
        _, both = torch.func.jvp(f, (x, t), (dx, dt))
        fd_t = (f(x, t + eps * dt) - f(x, t - eps * dt)) / (2 * eps)
    assert jt.abs().max() > 1e-4
    torch.testing.assert_close(jt, fd_t, rtol=1e-6, atol=1e-6 * fd_t.abs().max().item())
    torch.testing.assert_close(jt + jx, both, rtol=1e-10, atol=1e-12)  # linearity of the JVP


@pytest.mark.parametrize("preset", ("tiny", "digits"))
def test_two_time_inputs_jvp_matches_central_difference(preset):
    net = _random_net(preset, time_inputs=2)
    assert net.map0.in_features == 2 * net.config.model_channels
    out, tangent, fd, _ = _jvp_vs_fd(net)
    assert (tangent - fd).abs().max() <= 1e-6 * fd.abs().max()
    x, t, _, _, labels = _inputs(net)  # the second label is used: changing h changes the output
    with torch.no_grad():
        a = net(x, t, labels, dropout_seed=1)
        b = net(x, t + torch.tensor([0.0, 0.3], dtype=t.dtype), labels, dropout_seed=1)
    assert (a - b).abs().max() > 1e-4


def test_two_time_inputs_shape_is_checked():
    net = _random_net("tiny", time_inputs=2)
    x = torch.zeros(2, *net.input_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"noise_labels must have shape \(2, 2\)"):
        net(x, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"noise_labels must have shape \(2\)"):
        _random_net("tiny")(x, torch.zeros(2, 2, dtype=torch.float64))


def test_time_scale_default_is_the_old_embedding():
    """time_scale=None keeps the ADM x1000 for "positional" and x1 for "fourier" (old configs load unchanged)."""
    for preset, scale in (("digits", 1000.0), ("tiny", 1.0)):
        old = {k: v for k, v in dataclasses.asdict(PRESETS[preset]).items() if k not in ("time_inputs", "time_scale")}
        assert UNetConfig(**old) == PRESETS[preset]  # a config.json written before the fields existed
        net = _random_net(preset)
        explicit = build_unet(preset, impl="torch", time_scale=scale).double()
        explicit.load_state_dict(net.state_dict())
        x, t, _, _, labels = _inputs(net)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x, t, labels), explicit.eval()(x, t, labels), rtol=0, atol=0)
        rescaled = build_unet(preset, impl="torch", time_scale=scale * 2).double().eval()
        rescaled.load_state_dict(net.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(rescaled(x, t / 2, labels), net(x, t, labels), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("field,value,match", [
    ("time_inputs", 3, "time_inputs must be 1 or 2"), ("time_inputs", True, "time_inputs must be 1 or 2"),
    ("time_scale", 0.0, "time_scale must be None or a positive"), ("time_scale", "1", "time_scale must be None"),
])
def test_time_fields_are_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        build_unet("tiny", **{field: value})


def _jvp_on(net, impl, x, t, dx, dt, labels):
    net.set_impl(impl)
    seed = torch.tensor(7)
    with torch.no_grad():
        return torch.func.jvp(lambda a, b: net(a, b, labels, dropout_seed=seed), (x, t), (dx, dt))


@pytest.mark.parametrize("preset, time_inputs", [("tiny", 1), ("digits", 2)])
def test_unet_jvp_triton_route_matches_reference_route(preset, time_inputs):
    # The fused forward+tangent kernels (GroupNorm + scale/shift + SiLU, attention) carry the tangent through the
    # whole network; before them the Triton route's tangent was silently zero in every fused op. fp64, interpreter.
    net = _random_net(preset, time_inputs=time_inputs)
    x, t, dx, dt, labels = _inputs(net)
    out_t, tan_t = _jvp_on(net, "triton", x, t, dx, dt, labels)
    out_r, tan_r = _jvp_on(net, "torch", x, t, dx, dt, labels)
    assert tan_r.abs().max() > 1e-3
    torch.testing.assert_close(out_t, out_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tan_t, tan_r, rtol=1e-9, atol=1e-9 * float(tan_r.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["cifar10-small", "cifar10", "imagenet64"])
def test_unet_jvp_triton_route_matches_reference_route_cuda(preset):
    # Every preset on a GPU (make gpu-check): fp32 Triton kernels vs the reference ops, both in fp32.
    torch.manual_seed(0)
    net = build_unet(preset, impl="torch").cuda().train()
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.2)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, *net.input_shape, device="cuda", generator=g)
    t, dx, dt = torch.rand(2, device="cuda", generator=g) + 0.2, torch.randn_like(x), torch.randn(2, device="cuda")
    labels = torch.arange(2, device="cuda") % net.num_classes if net.num_classes else None
    _, tan_t = _jvp_on(net, "triton", x, t, dx, dt, labels)
    _, tan_r = _jvp_on(net, "torch", x, t, dx, dt, labels)
    err = float((tan_t - tan_r).norm() / tan_r.norm())
    assert err <= 1e-2, err
