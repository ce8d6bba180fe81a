"""Every registry op: reference eager vs reference under torch.compile (and the Triton kernel on CUDA),
forward and forward+backward, at the shapes of the U-Net presets (each op's ``make_inputs.cases``)."""
import pytest
import torch

from _harness import DEVICE, SMOKE, bench, op_providers, record, timed_call
from fastcm.ops import REGISTRY

CASES = [(name, case) for name, spec in REGISTRY.items()
         for case in (spec.make_inputs.cases[:1] if SMOKE else spec.make_inputs.cases[1:])]
# Only the combinations an op has: the Triton provider where the op has a Triton route, fwd+bwd where it has a
# backward (the Frechet distance is a metric with LAPACK / torch routes).
PARAMS = [(name, case, provider, mode) for name, case in CASES for provider in op_providers()
          for mode in ("fwd", "fwd+bwd")
          if (provider != "triton" or "triton" in REGISTRY[name].impls)
          and (mode == "fwd" or REGISTRY[name].differentiable)]
_COMPILED = {}


def _fn(name, provider):
    spec = REGISTRY[name]
    if provider == "eager":
        return spec.ref
    if provider == "compiled":
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(spec.ref, dynamic=False)
        return _COMPILED[name]
    return lambda **kw: spec.op(**kw, impl="triton")


@pytest.mark.parametrize("name, case, provider, mode", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_op(benchmark, name, case, provider, mode):
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    kwargs = REGISTRY[name].make_inputs(case, device=DEVICE, dtype=dtype, requires_grad=(mode != "fwd"))
    run = timed_call(_fn(name, provider), kwargs, mode)
    record(benchmark, group=f"op:{name}:{case}:{mode}", op=name, case=case, dtype=dtype, mode=mode,
           provider=provider)
    bench(benchmark, run, rounds=3 if SMOKE else 20)
