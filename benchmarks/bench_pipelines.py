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
