"""What stops a training run early and safely: its errors, the SIGINT/SIGTERM handler, the NaN/inf and divergence
guard, and the two numbers it watches (the gradient norm, the weight RMS). The loop (fastcm.train.loop) calls them
once per step; see its docstring for the order.
"""
import signal
import threading
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from fastcm._checks import check_int


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


class DivergenceError(RuntimeError):
    """The weights grew past ``max_weight_rms`` and stayed there too many steps in a row."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a step; ``checkpoint`` holds that step (None without out_dir)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path], saved_elsewhere: bool = False,
                 save_error: Optional[str] = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = (f"checkpoint saved to {checkpoint}" if checkpoint else "checkpoint saved by rank 0"
                 if saved_elsewhere else "no checkpoint (no out_dir)")
        if save_error is not None:  # the save after the step failed (a full disk): say so, keep the exit status
            where = f"saving failed: {save_error}"
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; {where}"
                         + ("; continue with --resume (resume=True)" if checkpoint or saved_elsewhere else ""))


class StopSignals:
    """While training: the first SIGINT / SIGTERM is recorded in ``received`` (the loop stops after the step in
    flight and saves); the handlers then fall back to the default action, so a second signal ends the process at
    once. Installed only in the main thread (Python delivers signals there); elsewhere nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self._previous = 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.received:
            self.received = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class NonFiniteGuard:
    """Counts bad steps. A step with a non-finite loss or gradient is skipped (no optimizer or EMA update) and
    counted in ``skipped``; ``max_consecutive`` of them in a row raise NonFiniteError. Under fp16 autocast the
    gradient scaler's overflow steps (inf gradients, after which it halves its scale) are counted as skipped too.
    After an update, weights whose RMS exceeds ``max_weight_rms`` (a bound far above what training produces: the
    U-Net presets start near 0.1 and move by about lr per step) count as diverged; ``max_consecutive`` such steps in
    a row raise DivergenceError."""

    def __init__(self, max_consecutive: int = 10, max_weight_rms: Optional[float] = None):
        max_consecutive = check_int("max_consecutive", max_consecutive)
        self.max_consecutive, self.max_weight_rms = max_consecutive, max_weight_rms
        self.skipped = self.consecutive = self.diverged = 0

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

    def check_weights(self, rms: float, step: int) -> None:
        """Record the weight RMS after ``step``'s update. Raises DivergenceError at the K-th step in a row above
        max_weight_rms (a NaN RMS counts as above)."""
        if self.max_weight_rms is None or rms <= self.max_weight_rms:
            self.diverged = 0
            return
        self.diverged += 1
        if self.diverged >= self.max_consecutive:
            raise DivergenceError(f"training diverged: the weight RMS was above max_weight_rms={self.max_weight_rms:g} "
                                  f"for {self.diverged} steps in a row (up to step {step}, now {rms:.3g}); stopped "
                                  "without saving. Lower the learning rate (or enable grad_clip)")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "diverged": self.diverged}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.diverged = int(state.get("diverged", 0))


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


@torch.no_grad()
def weight_rms(params: Iterable[Tensor]) -> float:
    """sqrt(mean of theta^2) over every element of every parameter (fp64 accumulation)."""
    params = [p.detach() for p in params if p.is_floating_point()]
    if not params:
        return 0.0
    sq = torch.stack(torch._foreach_norm(params)).double().square().sum()  # one device sync, not one per tensor
    return (float(sq) / sum(p.numel() for p in params)) ** 0.5


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when every floating tensor is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
