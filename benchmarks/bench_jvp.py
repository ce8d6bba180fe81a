"""JVP training steps (sCT and MeanFlow): how the network's tangent is computed, against a plain training step.

One entry = one optimizer step of the method's loss (fastcm.cm.SCTLoss / MeanFlowLoss), RAdam included.
Providers (how the network's output and tangent are computed):

- ``jvp-reference``: the default, ``jvp_mode="one_pass"``: ONE network call on forward-AD dual inputs under
  autograd gives the trainable output and its (detached) tangent, then the backward; reference ops (materialises the
  L x L attention matrix and its tangent);
- ``two-pass-reference``: ``jvp_mode="two_pass"``: ``torch.func.jvp`` without a graph, then the trainable pass and
  its backward (the route before the one-pass change, and the tests' oracle);
- ``fd-fp32`` / ``fd-fp64``: a central finite difference of the network, (F(p + h d) - F(p - h d)) / 2h per sample,
  h = max(1e-3 t, 1e-6) (sCM's epsilon_t as FastGen uses it), in fp32, or in fp64 as FastGen
  runs it (the weights are cast to fp64 for the two passes and back: that cast is part of the timed step; this
  entry measures cost: SCTLoss's network closure rounds F to the input dtype, so its fp64 route is not more
  accurate than fp32 here); F(p) is taken as the mean of the two passes (O(h^2)); these run in two_pass mode;
- ``jvp-triton`` / ``two-pass-triton`` (CUDA only): the same two modes through the model's own Triton ops
  (jvp_impl=None; one launch of each op's output-and-tangent kernel per layer; fastcm.cm.jvp probes the route's
  tangents first and the entry is skipped, saying why, when the route does not carry the right tangent);
- ``plain`` (and ``plain-triton`` on CUDA): the trainable pass + backward + RAdam alone, the denominator of the
  goal "fused JVP step <= 1.5x a plain forward+backward step".

Shapes: the ``cifar10-small`` and ``imagenet64`` presets (CUDA: batch 64 and 16). On the CPU only cifar10-small at
batch 8: imagenet64 (a 295M-parameter U-Net with attention at 32x32) takes minutes per step there. Peak memory is
recorded on CUDA (_harness.bench). ``test_attention_jvp_memory`` isolates the attention op's JVP over L (CUDA: up to
L = 4096) to show whether its memory grows like L^2 (reference) or L (a fused route).
"""
import contextlib

import pytest
import torch

import fastcm.cm.meanflow as meanflow_module
import fastcm.cm.sct as sct_module
from _harness import DEVICE, SMOKE, bench, record, sync
from fastcm.cm import METHODS, get_method
from fastcm.models import build_unet

if SMOKE:
    CASES = [("tiny", 2)]
elif DEVICE == "cuda":
    CASES = [("cifar10-small", 64), ("imagenet64", 16)]
else:
    CASES = [("cifar10-small", 8)]

PROVIDERS = ["plain", "jvp-reference", "two-pass-reference", "fd-fp32", "fd-fp64"]
if DEVICE == "cuda":
    PROVIDERS += ["plain-triton", "jvp-triton", "two-pass-triton"]
if SMOKE:
    PROVIDERS = ["plain", "jvp-reference", "two-pass-reference", "fd-fp32"]
METHOD_NAMES = ("sct", "meanflow")


def fd_network_jvp(dtype: torch.dtype):
    """A drop-in for fastcm.cm.jvp.network_jvp computing the tangent by a central difference in ``dtype``."""

    def jvp(model, fn, primals, tangents, impl="torch"):
        t = primals[-1]  # the time: sCT's primals are (x_t / sigma_d, t), MeanFlow's (z, r, t)
        h = torch.clamp(1e-3 * t.abs().to(dtype), min=1e-6)
        cast = dtype != primals[0].dtype
        ctx = contextlib.ExitStack()
        with torch.no_grad(), ctx:
            if cast:
                model.to(dtype)
                ctx.callback(model.to, primals[0].dtype)
            p = [x.to(dtype) for x in primals]
            d = [v.to(dtype) for v in tangents]
            hs = [h.view(-1, *([1] * (x.dim() - 1))) for x in p]
            plus = fn(*[x + s * v for x, s, v in zip(p, hs, d)])
            minus = fn(*[x - s * v for x, s, v in zip(p, hs, d)])
            out = 0.5 * (plus + minus)  # F(p) + O(h^2): two network passes per step, not three
            tangent = (plus - minus) / (2 * hs[0])
        return out.to(primals[0].dtype), tangent.to(primals[0].dtype)

    return jvp


@contextlib.contextmanager
def jvp_route(provider: str):
    """Swap the methods' network JVP for the finite-difference one while the entry runs."""
    if not provider.startswith("fd-"):
        yield
        return
    fd = fd_network_jvp(torch.float64 if provider == "fd-fp64" else torch.float32)
    saved = sct_module.network_jvp, meanflow_module.network_jvp
    sct_module.network_jvp = meanflow_module.network_jvp = fd
    try:
        yield
    finally:
        sct_module.network_jvp, meanflow_module.network_jvp = saved


def _setup(preset: str, batch: int, method: str, provider: str):
    triton = provider.endswith("triton")
    kw = {"jvp_impl": None} if triton else {}
    kw["jvp_mode"] = "two_pass" if provider.startswith(("two-pass", "fd-")) else "one_pass"
    m = get_method(method, **({"warmup_steps": 0} if method == "sct" else {}), **kw)
    torch.manual_seed(0)
    unet = build_unet(preset, impl="triton" if triton else "torch", **METHODS[method].unet_overrides)
    model = m.make_model(unet).to(DEVICE).train()
    x = torch.rand(batch, *unet.input_shape, device=DEVICE) * 2 - 1
    labels = torch.randint(0, unet.num_classes, (batch,), device=DEVICE) if unet.num_classes else None
    return m, model, x, labels


def _plain_loss(model, x, labels, gen):
    """The trainable pass alone (the same network call as the methods' primal) with a squared loss."""
    t = torch.rand(x.shape[0], device=DEVICE, generator=gen)
    if hasattr(model, "t_max"):
        out = model(x, t, labels, output="F")
    else:
        out = model(x, t * 0.5, t, labels)
    return out.square().flatten(1).mean(1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("preset, batch", CASES, ids=[f"{p}-b{b}" for p, b in CASES])
def test_jvp_training_step(benchmark, preset, batch, method, provider):
    if provider.startswith("plain") and method != METHOD_NAMES[0]:
        pytest.skip("the plain step does not depend on the method; it is timed once, under sct")
    m, model, x, labels = _setup(preset, batch, method, provider)
    opt = torch.optim.RAdam(model.parameters(), lr=1e-4)
    gen = torch.Generator(DEVICE).manual_seed(0)
    if provider in ("jvp-triton", "two-pass-triton"):
        from fastcm.cm.jvp import check_triton_tangents

        try:
            check_triton_tangents(DEVICE)
        except RuntimeError as e:  # reported as the skip reason: never a timing of a wrong tangent
            pytest.skip(str(e))

    def run():
        opt.zero_grad(set_to_none=True)
        with jvp_route(provider):
            per_sample = (_plain_loss(model, x, labels, gen) if provider.startswith("plain")
                          else m.loss(model, x, labels, 20_000, gen))
        loss = per_sample.mean()
        loss.backward()
        opt.step()
        sync()
        return loss

    record(benchmark, group=f"pipeline:jvp-step:{preset}:{batch}", pipeline="JVP training step",
           case=f"{preset} b{batch}", dtype="fp32", mode="fwd+bwd",
           provider=provider if provider.startswith("plain") else f"{method}:{provider}", items=batch,
           items_unit="img")
    bench(benchmark, run, rounds=3 if DEVICE == "cpu" else 10, warmup=0 if SMOKE else 1)


ATTN_L = [16] if SMOKE else ([256, 1024, 4096] if DEVICE == "cuda" else [64, 256])


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("L", ATTN_L)
def test_attention_jvp_memory(benchmark, L, impl):
    """torch.func.jvp of attention(q, k, v) with tangents on q, k, v (B = 4, 4 heads of 64): time and peak memory."""
    from fastcm.ops import attention

    shape = (4, 4, L, 64)
    q, k, v, dq, dk, dv = (torch.randn(shape, device=DEVICE) for _ in range(6))

    def run():
        with torch.no_grad():
            out = torch.func.jvp(lambda a, b, c: attention(a, b, c, impl=impl), (q, k, v), (dq, dk, dv))
        sync()
        return out

    if impl == "triton":
        try:
            run()
        except RuntimeError as e:  # a route that cannot carry a tangent raises (fastcm.ops); reported, not timed
            pytest.skip(f"attention(impl='triton') has no JVP here: {e}")
    record(benchmark, group=f"op:attention-jvp:{L}", op="attention JVP", case=f"B4 H4 L{L} D64", dtype="fp32",
           mode="jvp", provider=impl, items=L, items_unit="tokens")
    bench(benchmark, run, rounds=3 if DEVICE == "cpu" else 10, warmup=0 if SMOKE else 1)
