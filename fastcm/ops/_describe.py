"""What each op declares about its Triton route, beside its launchers and its reference (the fast-ops contract):

* ``min_work(direction, **inputs) -> Work``: the bytes that must move and the FLOPs that must be done for one call
  (each input read once, each output written once, in the inputs' real dtypes); ``direction`` is one of
  ``DIRECTIONS``. The kernel-work report (``make kernel-report``) and the ratio budgets (tests/test_kernel_work.py)
  divide the probe's counts by it.
* ``aot_jobs(call, dtypes, sm_counts) -> Iterator[Job]``: the op's ahead-of-time compile scenarios for one call
  (its keyword arguments, tensors on ``meta``): thunks that run the op's launchers on meta tensors in each of
  ``dtypes`` the op's kernels take, with the launch plan a GPU of each SM count would pick. The compile gate
  (fastcm.perf.gate) records the launches and compiles them for sm_80 / sm_90.
* ``aot_calls(image_shape) -> list``: calls beyond those a U-Net forward makes (a loss on the image batch, the
  covariance sizes of an FID), for the gate and the kernel-work report.

Imports torch only: the Triton side is imported inside the thunks.
"""
import contextlib
import dataclasses
from typing import Callable, NamedTuple, Optional

import torch

DIRECTIONS = ("fwd", "bwd", "fwd+bwd", "jvp")  # jvp: the output and its tangent (forward-mode AD) in one call
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the gate compiles (fp64: the interpreter's, for gradcheck)


class Work(NamedTuple):
    """Bytes moved and FLOPs done by one call (``flops`` counts matrix-multiply FLOPs, 2 per multiply-add)."""
    bytes: int
    flops: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.bytes + other.bytes, self.flops + other.flops)


def nbytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes of the given tensors' elements (None counts 0), in their own dtypes."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def fwd_bwd(direction: str, fwd: Work, bwd: Work, jvp: Optional[Work] = None) -> Work:
    """The minimum of ``direction`` from those of the forward, the backward and the forward-with-tangent."""
    table = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "jvp": jvp}
    if direction not in table or table[direction] is None:
        raise ValueError(f"direction must be one of {[d for d, w in table.items() if w is not None]}, "
                         f"got {direction!r}")
    return table[direction]


@dataclasses.dataclass
class Job:
    """One compile scenario of the gate: ``run()`` calls the launchers of ``fastcm.kernels.<module>`` on meta
    tensors (the gate records those launches instead of running them)."""
    op: str
    label: str
    dtype: torch.dtype
    module: str
    run: Callable[[], None]
    # op-specific checks of one compiled kernel (a kernels/_aot.Compiled): {"problems": [...], other row fields}
    check: Optional[Callable[[object], dict]] = None


@contextlib.contextmanager
def target_sms(sms: Optional[int]):
    """Launchers plan for a GPU with ``sms`` streaming multiprocessors inside the block (kernels/_utils.TARGET_SMS)."""
    from fastcm.kernels import _utils

    token = _utils.TARGET_SMS.set(sms)
    try:
        yield
    finally:
        _utils.TARGET_SMS.reset(token)


def meta_like(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """A meta tensor with t's shape and strides (dtype: t's unless given); None stays None."""
    if t is None:
        return None
    return torch.empty_strided(tuple(t.shape), t.stride(), dtype=dtype or t.dtype, device="meta")


def meta(*shape, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@contextlib.contextmanager
def fp32_matmul(precision: Optional[str]):
    """torch's fp32 matmul setting ("ieee" / "tf32"; None leaves it) inside the block, which the attention and
    sqrtm launchers follow for fp32 inputs (kernels/_utils.fp32_matmul_precision)."""
    if precision is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved, matmul.fp32_precision = matmul.fp32_precision, precision
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def fp32_precisions(dtype: torch.dtype) -> tuple:
    """The fp32 matmul settings that change an fp32 launch (both), or (None,) for other dtypes."""
    return ("ieee", "tf32") if dtype == torch.float32 else (None,)


@contextlib.contextmanager
def deterministic(mode: bool):
    """``torch.use_deterministic_algorithms(mode)`` inside the block (launchers may pick a schedule by it)."""
    saved, saved_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(mode, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved, warn_only=saved_warn)
