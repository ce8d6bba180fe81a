"""NaN/inf guard: a step whose loss or gradient is not finite is skipped (no optimizer or EMA update) and counted;
``max_consecutive`` such steps in a row stop training with :class:`NonFiniteError`. Under fp16 autocast the
gradient scaler's overflow steps (inf gradients, after which it halves its scale) are counted as skipped too."""
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


class NonFiniteGuard:
    """Counts skipped steps: ``skipped`` in total, ``consecutive`` in the current run of bad steps."""

    def __init__(self, max_consecutive: int = 10):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive must be a positive int, got {max_consecutive!r}")
        self.max_consecutive, self.skipped, self.consecutive = max_consecutive, 0, 0

    def update(self, finite: bool, step: int) -> bool:
        """Record whether ``step`` was finite; return it. Raises NonFiniteError at the K-th bad step in a row."""
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss "
                                 f"or gradient ({self.skipped} skipped in total); training stopped. Lower the "
                                 "learning rate, enable grad_clip, or use precision='fp32'")
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


def grad_norm(params: Iterable[Tensor], max_norm: Optional[float] = None) -> Tensor:
    """Total L2 norm of the gradients (inf/NaN if any gradient is), clipping them to ``max_norm`` when given
    (torch's rule: scale by min(1, max_norm / (norm + 1e-6))). A non-finite norm is not clipped: that step is
    thrown away."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = get_total_norm([p.grad for p in params], 2.0, error_if_nonfinite=False)
    if max_norm is not None and bool(torch.isfinite(norm)):
        clip_grads_with_norm_(params, max_norm, norm)
    return norm


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when every floating tensor is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
