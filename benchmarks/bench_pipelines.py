"""Pipelines: one-step sampling (images/s) and an iCT training step, eager reference ops vs torch.compile'd
reference ops, and on CUDA compiled with the Triton ops (plus channels_last and bf16-autocast variants).

CPU: the `cifar10-small` preset at batch 1/16/64 for sampling and batch 16 for the training step.
CUDA: the `cifar10` and `imagenet64` presets. The compiled U-Net uses fullgraph=True (no graph breaks).
"""
import pytest
import torch

from _harness import DEVICE, SMOKE, bench, record, sync
from fastcm.cm import ConsistencyModel, ICTLoss
from fastcm.models import build_unet

if SMOKE:
    SAMPLE_CASES = [("tiny", 2)]
    STEP_CASES = [("tiny", 4)]
elif DEVICE == "cuda":
    SAMPLE_CASES = [(p, b) for p in ("cifar10", "imagenet64") for b in (1, 16, 64)]
    STEP_CASES = [("cifar10", 64), ("imagenet64", 16)]
else:
    SAMPLE_CASES = [("cifar10-small", b) for b in (1, 16, 64)]
    STEP_CASES = [("cifar10-small", 16)]

# provider -> (ops impl, compiled, channels_last, bf16 autocast)
PROVIDERS = {"eager": ("torch", False, False, False), "compiled": ("torch", True, False, False)}
if DEVICE == "cuda":
    PROVIDERS.update({"compiled+triton": ("triton", True, False, False),
                      "compiled+triton+channels_last": ("triton", True, True, False),
                      "compiled+triton+bf16": ("triton", True, False, True)})
if SMOKE:  # the smoke run checks the suite runs; compiling is covered by the U-Net tests (and costs ~1 min)
    PROVIDERS = {"eager": PROVIDERS["eager"]}
_MODELS = {}


def _model(preset: str, provider: str):
    """One ConsistencyModel per (preset, provider), compiled once and shared by every batch size."""
    key = (preset, provider)
    if key not in _MODELS:
        impl, compiled, channels_last, _ = PROVIDERS[provider]
        torch.manual_seed(0)
        unet = build_unet(preset, impl=impl, dropout=0.0).to(DEVICE)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        model = ConsistencyModel(unet)
        _MODELS[key] = (model, torch.compile(model, fullgraph=True) if compiled else model)
    return _MODELS[key]


def _labels(unet, n):
    return torch.randint(0, unet.num_classes, (n,), device=DEVICE) if unet.num_classes else None


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("preset, batch", SAMPLE_CASES, ids=[f"{p}-b{b}" for p, b in SAMPLE_CASES])
def test_one_step_sampling(benchmark, preset, batch, provider):
    model, fn = _model(preset, provider)
    model.eval()
    z = torch.randn(batch, *model.unet.input_shape, device=DEVICE)
    labels = _labels(model.unet, batch)
    autocast = PROVIDERS[provider][3]

    def run():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            x = fn(model.sigma_max * z, model.sigma_max, labels).clamp(-1, 1)
        sync()
        return x

    record(benchmark, group=f"pipeline:sample:{preset}:{batch}", pipeline="one-step sampling", case=f"{preset} b{batch}",
           dtype="bf16-autocast" if autocast else "fp32", mode="fwd", provider=provider, items=batch,
           items_unit="img")
    bench(benchmark, run, rounds=3 if batch >= 16 and DEVICE == "cpu" else 10)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("preset, batch", STEP_CASES, ids=[f"{p}-b{b}" for p, b in STEP_CASES])
def test_ict_training_step(benchmark, preset, batch, provider):
    model, fn = _model(preset, provider)
    model.train()
    loss_fn = ICTLoss(total_steps=400_000)
    opt = torch.optim.RAdam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, *model.unet.input_shape, device=DEVICE) * 2 - 1
    labels = _labels(model.unet, batch)
    gen = torch.Generator(DEVICE).manual_seed(0)
    autocast = PROVIDERS[provider][3]

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(fn, x, step=200_000, class_labels=labels, generator=gen).mean()
        loss.backward()
        opt.step()
        sync()
        return loss

    record(benchmark, group=f"pipeline:ict-step:{preset}:{batch}", pipeline="iCT training step",
           case=f"{preset} b{batch}", dtype="bf16-autocast" if autocast else "fp32", mode="fwd+bwd",
           provider=provider, items=batch, items_unit="img")
    bench(benchmark, run, rounds=3 if DEVICE == "cpu" else 10)


# ----------------------------------------------------------------------------------------------------------------
# FD-loss fine-tune step: one-step generation with gradient -> features (d) -> FD loss -> backward -> optimizer step.
# The feature network is a small random conv net with a d-dim head (an Inception forward at B=256 would take
# minutes on this CPU and is the same for every route); what differs between providers is the FD route.
FD_B, FD_D = (16, 64) if SMOKE else (256, 2048)


def _feature_net(d: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32 * 16, d)).to(DEVICE)


def _reference_stats(net: torch.nn.Module, d: int):
    from fastcm.fid import FeatureStats

    stats = FeatureStats(d)
    with torch.no_grad():
        for _ in range(max(2, (2 * d) // 1024)):
            stats.update(net(torch.rand(1024, 1, 8, 8, device=DEVICE)) + 0.1)
    return stats.mu, stats.sigma


@pytest.mark.parametrize("provider", ["full", "batch", "queue"])
def test_fd_loss_training_step(benchmark, provider):
    from fastcm.fid import FDLoss
    from fastcm.fid.loss import fd_loss_full_ref
    from fastcm.ops import sqrtm

    torch.manual_seed(0)
    model = ConsistencyModel(build_unet("digits", impl="torch")).to(DEVICE)
    net = _feature_net(FD_D)
    mu_ref, sigma_ref = _reference_stats(net, FD_D)
    if provider == "full":
        sqrt_ref = sqrtm(sigma_ref.to(DEVICE), impl="torch")
        fd = lambda f: fd_loss_full_ref(f, mu_ref.to(DEVICE), sigma_ref.to(DEVICE), sqrt_ref=sqrt_ref)  # noqa: E731
    else:
        fd = FDLoss(mu_ref, sigma_ref, mode=provider, queue_size=min(50_000, 8 * FD_D)).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=2e-5)
    z = torch.randn(FD_B, 1, 8, 8, device=DEVICE)
    labels = torch.arange(FD_B, device=DEVICE) % 10
    if provider == "queue":  # a full queue, as in the steady state of fine-tuning
        with torch.no_grad():
            fd.enqueue(net(torch.rand(8 * FD_D, 1, 8, 8, device=DEVICE)))

    def run():
        opt.zero_grad(set_to_none=True)
        x = model(model.sigma_max * z, model.sigma_max, labels)
        loss = fd(net((x + 1) / 2))
        loss.backward()
        opt.step()
        sync()
        return loss

    record(benchmark, group=f"pipeline:fd-step:{FD_B}x{FD_D}", pipeline="FD-loss fine-tune step",
           case=f"B{FD_B} d{FD_D}", dtype="fp32 net, fp64 FD", mode="fwd+bwd", provider=provider, items=FD_B,
           items_unit="img")
    bench(benchmark, run, rounds=3 if DEVICE == "cpu" else 10, warmup=1)
