"""GroupNorm(32) + (1 + scale) / shift + SiLU at U-Net feature-map shapes, forward and forward+backward.

Providers: the eager reference (``group_norm_ref``: aten group_norm, then modulation and SiLU as separate kernels,
computed in fp32), ``eager-native`` (the same chain in the input dtype, as a plain U-Net block writes it: no fp32
round trip for fp16 inputs), the reference under ``torch.compile`` (Inductor fuses it into one kernel per pass: the
baseline to beat), and the fused Triton op (CUDA only; the interpreter is no benchmark). Cases come from the
registry's ``make_inputs`` (``batch1`` is sampling at batch 1, where the split reduction keeps a GPU busy). Each
case runs NCHW and channels_last (the kernels read both in place, with vector loads along the contiguous axis).

Each entry records ``bytes``, the compulsory memory traffic of a fully fused implementation (forward: read x, write
y; backward: read x and dy, write dx; the (N, C) and (C,) parameters are negligible), so the report prints the
effective GB/s. Goal on a GPU: >= 2x eager and not slower than compiled at batch >= 8, C >= 128.
"""
import pytest
import torch
import torch.nn.functional as F

from _harness import DEVICE, SMOKE, bench, op_providers, record, timed_call
from fastcm.ops import group_norm, group_norm_ref
from fastcm.ops.group_norm import make_inputs

DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
CASES = make_inputs.cases[:1] if SMOKE else make_inputs.cases[1:]
LAYOUTS = ("nchw",) if SMOKE else ("nchw", "channels_last")
_COMPILED = {}


def _native(x, num_groups, weight, bias, eps, scale, shift, act):
    y = F.group_norm(x, num_groups, weight, bias, eps) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y) if act == "silu" else y


def _fn(provider):
    if provider == "eager":
        return group_norm_ref
    if provider == "eager-native":
        return _native
    if provider == "compiled":
        if "ref" not in _COMPILED:
            _COMPILED["ref"] = torch.compile(group_norm_ref, dynamic=False)
        return _COMPILED["ref"]
    return lambda **kw: group_norm(**kw, impl="triton")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["eager-native", *op_providers()])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_group_norm(benchmark, case, layout, provider, mode):
    kwargs = make_inputs(case, device=DEVICE, dtype=DTYPE, requires_grad=(mode != "fwd"))
    if layout == "channels_last":
        kwargs["x"] = kwargs["x"].detach().to(memory_format=torch.channels_last).requires_grad_(mode != "fwd")
    x = kwargs["x"]
    passes = 2 if mode == "fwd" else 5  # x, y | x, y, x, dy, dx
    shape = "x".join(map(str, x.shape)) + ("" if layout == "nchw" else ":cl")
    record(benchmark, group=f"group_norm:{case}:{layout}:{mode}", op="group_norm", case=f"{case}:{shape}",
           dtype=DTYPE, mode=mode, provider=provider, bytes=passes * x.numel() * x.element_size())
    bench(benchmark, timed_call(_fn(provider), kwargs, mode), rounds=3 if SMOKE else 20)
