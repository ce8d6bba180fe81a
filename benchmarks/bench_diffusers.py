"""A diffusers UNet2DModel at the DDPM CIFAR-10 configuration (Ho et al. 2020; google/ddpm-cifar10-32's config,
random init, 35.7M parameters): forward and forward+backward, eager vs fastcm.patch'ed vs patched + torch.compile.

CPU: the reference routes (impl="torch") at batch 8 (batch 64 takes minutes per call on this machine), fp32.
CUDA: batch 64, fp32 / bf16 / fp16 weights, every route (the Triton ops), with peak memory. The DDPM net's single
256-dim attention head runs the Triton attention (head dims up to 256); attention is also timed at head dim 64
("-h64": attention_head_dim=64, 4 heads), the width most diffusers U-Nets use.
"""
import pytest
import torch

from _harness import DEVICE, SMOKE, bench, record, sync

diffusers = pytest.importorskip("diffusers")

import fastcm  # noqa: E402

DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256), norm_num_groups=32, norm_eps=1e-6,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
TINY = dict(DDPM_CIFAR10, sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 32, 32))

if SMOKE:
    CASES, DTYPES, BATCH = {"tiny": TINY}, [torch.float32], 2
elif DEVICE == "cuda":
    CASES = {"ddpm-cifar10": DDPM_CIFAR10, "ddpm-cifar10-h64": dict(DDPM_CIFAR10, attention_head_dim=64)}
    DTYPES, BATCH = [torch.float32, torch.bfloat16, torch.float16], 64
else:
    CASES, DTYPES, BATCH = {"ddpm-cifar10": DDPM_CIFAR10}, [torch.float32], 8

# provider -> (fastcm.patch'ed, torch.compile'd); the ops run impl="auto": Triton on CUDA, the reference on CPU
PROVIDERS = {"eager": (False, False), "patched": (True, False), "patched+compiled": (True, True)}
if DEVICE == "cuda":
    PROVIDERS["compiled"] = (False, True)  # what compile alone gives, beside what patching adds
if SMOKE:  # compiling is covered by tests/test_patch_diffusers.py
    PROVIDERS = {k: v for k, v in PROVIDERS.items() if not v[1]}
_MODELS = {}


def _model(case: str, dtype: torch.dtype, provider: str):
    key = (case, dtype, provider)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time (CUDA memory, CPU RAM)
        patched, compiled = PROVIDERS[provider]
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(**CASES[case]).to(DEVICE, dtype)
        if patched:
            fastcm.patch(unet)
        _MODELS[key] = (unet, torch.compile(unet, fullgraph=True) if compiled else unet)
    return _MODELS[key]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_unet(benchmark, case, dtype, mode, provider):
    unet, fn = _model(case, dtype, provider)
    size = CASES[case]["sample_size"]
    x = torch.randn(BATCH, 3, size, size, device=DEVICE, dtype=dtype)
    t = torch.randint(0, 1000, (BATCH,), device=DEVICE)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(x, t).sample
        else:
            unet.zero_grad(set_to_none=True)
            out = fn(x, t).sample
            out.backward(torch.ones_like(out))
        sync()
        return out

    name = str(dtype).replace("torch.", "")
    record(benchmark, group=f"diffusers:{case}:b{BATCH}:{name}:{mode}", pipeline="diffusers UNet2DModel",
           case=f"{case} b{BATCH}", dtype=name, mode=mode, provider=provider, items=BATCH, items_unit="img")
    bench(benchmark, run, rounds=3 if DEVICE == "cpu" else 10)
