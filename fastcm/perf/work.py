"""What one op call costs, counted on CPU: the Triton route under the interpreter probe (kernels/_probe.py: bytes
loaded and stored by active lanes, ``tl.dot`` FLOPs, per kernel), the torch glue around its kernels, and the eager
PyTorch reference (a ``TorchDispatchMode`` adding up the inputs and outputs of every aten op, and
``torch.utils.flop_counter`` for its FLOPs); each against the op's declared minimum (``OpSpec.min_work``).

Caveats, stated wherever these counts are reported: counted bytes are requested global traffic, an upper bound on
HBM traffic (L2 absorbs re-reads such as K/V tiles shared by query blocks); a floor time max(bytes / bandwidth,
FLOPs / peak) is a bound, not a prediction; no GPU timed any of it.

Needs TRITON_INTERPRET=1 set before triton is imported (the kernels run on the CPU).
"""
import dataclasses
import functools
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

DIRECTIONS = ("fwd", "fwd+bwd", "jvp")
# (HBM bytes/s, dense fp16/bf16 tensor-core FLOP/s, fp32 FMA FLOP/s): NVIDIA's H100 SXM / H200 datasheets
GPUS = {"H100 SXM": (3.35e12, 989e12, 67e12), "H200": (4.8e12, 989e12, 67e12)}
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "lift_fresh", "_to_copy_meta"}


@dataclasses.dataclass
class Count:
    """Bytes and matmul FLOPs of one (call, direction). ``kernels``: the probe's launches summed per kernel (empty
    for the eager reference); ``glue_*``: the aten ops outside the kernels (the whole path for the reference)."""
    loaded: int = 0
    stored: int = 0
    flops: Dict[str, int] = dataclasses.field(default_factory=dict)   # by dot operand dtype ("fp16", ...)
    kernels: dict = dataclasses.field(default_factory=dict)
    launches: int = 0
    glue_bytes: int = 0
    glue_flops: int = 0

    @property
    def bytes(self) -> int:
        return self.loaded + self.stored

    @property
    def dot_flops(self) -> int:
        return sum(self.flops.values())


class _Traffic(TorchDispatchMode):
    """Bytes of the tensor inputs and outputs of every aten op run inside (views and allocations move nothing);
    ops of namespace ``skip`` (fastcm's custom ops, whose kernels the probe counts) are left out."""

    def __init__(self, skip: Optional[str] = None):
        super().__init__()
        self.skip, self.bytes = skip, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves(out)
        metadata = not any(isinstance(t, torch.Tensor) for t in leaves)  # is_same_size & co. answer from shapes
        if func.namespace != self.skip and not func.is_view and func._opname not in _NO_TRAFFIC and not metadata:
            inputs = {k: v for k, v in (kwargs or {}).items() if k != "out"}  # an out= buffer is written, not read
            for t in torch.utils._pytree.tree_leaves((args, inputs, out)):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def materialize(name: str, call: dict, dtype: torch.dtype) -> dict:
    """CPU tensors for a call recorded on ``meta``: random values, the call's shapes, strides and requires_grad,
    floating tensors in ``dtype`` (sqrtm gets symmetric positive-definite matrices, which it requires)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in call.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
            continue
        t = torch.empty_strided(tuple(v.shape), v.stride(), dtype=dtype if v.is_floating_point() else v.dtype)
        if name == "sqrtm":
            r = torch.randn(tuple(v.shape), generator=g, dtype=torch.float64)
            t.copy_(r @ r.mT / v.shape[-1] + torch.eye(v.shape[-1], dtype=torch.float64))
        elif t.is_floating_point():
            t.copy_(torch.randn(tuple(v.shape), generator=g))
        else:
            t.zero_()
        out[k] = t.requires_grad_(bool(v.requires_grad and t.is_floating_point()))
    return out


def run(fn, kwargs: dict, direction: str) -> None:
    """One call of ``fn(**kwargs)`` in ``direction``: "fwd" without autograd; "fwd+bwd" with the gradients of every
    input that requires one; "jvp" with ``torch.func.jvp``, a random tangent for each of those inputs."""
    diff = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    # The random gradient and tangents are the harness's, not the route's: made with the counting modes paused.
    uncounted = torch.utils._python_dispatch._disable_current_modes
    if direction == "fwd":
        with torch.no_grad():
            fn(**kwargs)
    elif direction == "fwd+bwd":
        out = fn(**kwargs)
        with uncounted():
            grad_out = torch.randn_like(out)
        torch.autograd.grad(out, [kwargs[k] for k in diff], grad_out)
    elif direction == "jvp":
        fixed = {k: v for k, v in kwargs.items() if k not in diff}
        primals = tuple(kwargs[k].detach() for k in diff)
        with uncounted():
            tangents = tuple(map(torch.randn_like, primals))
        torch.func.jvp(lambda *xs: fn(**fixed, **dict(zip(diff, xs))), primals, tangents)
    else:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def triton_count(spec, kwargs: dict, direction: str) -> Count:
    """The op's Triton route (``impl="triton"``): every kernel launch under the probe, plus the torch glue."""
    from fastcm.kernels import _probe
    with _probe.probe(sanitize=False) as p, _Traffic(skip="fastcm") as glue, FlopCounterMode(display=False) as f:
        run(functools.partial(spec.op, impl="triton"), kwargs, direction)
    kernels = _probe.summarize(p.launches)
    flops: Dict[str, int] = {}
    for k in kernels.values():
        for dt, v in k.flops.items():
            flops[dt] = flops.get(dt, 0) + v
    return Count(sum(k.loaded for k in kernels.values()), sum(k.stored + k.atomic for k in kernels.values()), flops,
                 kernels, len(p.launches), glue.bytes, f.get_total_flops())


def eager_count(spec, kwargs: dict, direction: str) -> Count:
    """The eager PyTorch reference of the op: every aten op's inputs and outputs, and its FLOPs."""
    with _Traffic() as t, FlopCounterMode(display=False) as f:
        run(spec.ref, kwargs, direction)
    return Count(glue_bytes=t.bytes, glue_flops=f.get_total_flops())


def floor_seconds(nbytes: int, flops: Dict[str, int], gpu: str, fp32_flops: int = 0) -> float:
    """max(bytes / bandwidth, FLOPs / peak) on ``gpu``: fp16/bf16 dots at the tensor-core peak, fp32 and fp64 dots
    (torch's default IEEE fp32 matmuls) and ``fp32_flops`` at the fp32 FMA peak."""
    bw, tensor, fma = GPUS[gpu]
    half = sum(v for k, v in flops.items() if k in ("fp16", "bf16"))
    return max(nbytes / bw, half / tensor + (sum(flops.values()) - half + fp32_flops) / fma)
