"""CPU thread policy of a training run on a shared machine (the demo's stages use it): how many torch threads to
start with, and a callback that falls back to one thread when throughput collapses because the cores are shared."""
import os
from typing import Optional

def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not available on every platform
        return None


def choose_threads(requested: Optional[int]) -> tuple:
    """(torch CPU threads, reason). None = torch's default, except on a machine that is already busy.

    Measured on the project's 2-core CPU (digits U-Net, iCT step at batch 64): 2 threads 0.076 s/step, 1 thread
    0.109 s/step when the machine is otherwise idle; but when other processes keep the cores busy, 2 OpenMP threads
    wait on each other at every operator and a step took 0.4-5 s against 0.17-0.26 s for 1 thread.
    """
    import torch

    if requested is not None:
        return requested, "--threads"
    default, load, cores = torch.get_num_threads(), load_average(), os.cpu_count() or 1
    if default > 1 and load is not None and load >= cores - 0.5:
        return 1, f"the machine is busy (load average {load:.1f} on {cores} cores); --threads N overrides"
    return default, "torch's default"


class ThreadGuard:
    """Training callback: when more than one CPU thread is in use and throughput falls below half the best seen
    for two log intervals in a row (another process took a core, see choose_threads), continue on 1 thread."""

    def __init__(self, stage: str, events: list, verbose: bool = True):
        self.stage, self.events, self.verbose, self.best, self.slow = stage, events, verbose, 0.0, 0

    def __call__(self, record: dict) -> None:
        import torch

        rate = record.get("img_per_s") or 0.0
        if torch.get_num_threads() == 1:
            return
        self.best = max(self.best, rate)
        self.slow = self.slow + 1 if rate < 0.5 * self.best else 0
        if self.slow >= 2:
            torch.set_num_threads(1)
            note = (f"{self.stage} step {record.get('step')}: throughput fell from {self.best:.0f} to {rate:.0f} "
                    "img/s (the cores are shared); continuing on 1 CPU thread")
            self.events.append(note)
            if self.verbose:
                print(f"\n[fastcm] {note}", flush=True)
