"""What a demo run is: :class:`DemoConfig`, its quality goals, the methods' labels and stage-1 step counts, and the
preset check (the demo needs a 10-class 1x8x8 preset)."""
from dataclasses import dataclass
from typing import Optional

from fastcm._checks import check_choice, check_int

QUALITY = {"min_one_step_cas": 0.92, "min_fd_reduction": 0.20, "max_cas_drop": 0.01}
METHOD_LABELS = {"ict": "iCT", "sct": "sCT", "meanflow": "MeanFlow"}

# Stage-1 steps of `fastcm demo --method M` when --steps is not given: the compute of iCT's 4,000 calibrated steps
# (batch 64, about 6.5 min on the project's 2-core CPU), counted as `--compare` counts it, in CPU seconds per step.
# STEP_COST[M] = CPU time of an M step / an iCT step (iCT: 2 forwards + 1 backward; sCT and MeanFlow: 1 forward on
# dual tensors with its graph + 1 backward, fastcm.cm.jvp), measured by benchmarks/step_cost.py (digits preset, batch
# 64, one thread, RAdam included, medians of 7 interleaved rounds of 3 steps; a shared machine): iCT 0.109 s, sCT
# 0.143 s (1.30x), MeanFlow 0.139 s (1.27x), after the reference GroupNorm/attention took their tangents in closed
# form from the trainable pass (1.57x / 1.58x in the same script before; 2.02x / 1.94x before the one pass stopped
# running torch's third convolution per layer). M gets 4,000 / STEP_COST[M] steps, rounded to 100.
STEP_COST = {"ict": 1.0, "sct": 1.30, "meanflow": 1.27}
ICT_STEPS = 4000
STAGE1_STEPS = {m: int(round(ICT_STEPS / cost, -2)) for m, cost in STEP_COST.items()}


@dataclass(frozen=True)
class DemoConfig:
    preset: str = "digits"        # U-Net preset (fastcm.models.PRESETS)
    seed: int = 0                 # training, sampling and judges
    ict_steps: Optional[int] = None  # stage-1 steps of any method (named before sCT/MeanFlow came); None: the
    #                               method's STAGE1_STEPS (iCT 4,000, calibrated: ≈ 6.5 min at batch 64; the others
    #                               at the same compute)
    batch_size: int = 64
    lr: float = 2e-4              # RAdam
    ema_beta: float = 0.0         # evaluation EMA; 0 evaluates the trained weights (iCT's 0.99993 needs ~100k steps)
    fd_steps: int = 150           # FD-loss fine-tune steps; 0 skips stage 2 (the held-out FD flattens after ~150)
    fd_batch_size: int = 250      # 25 per class
    fd_lr: float = 5e-5           # Adam; 150 steps from one iCT model: 2e-5 → FD -22 %, 5e-5 → -29 %, 1e-4 → -17 %
    per_class: int = 200          # evaluation samples per class (and the .npz files)
    grid_per_class: int = 16      # samples per class in the PNG grids (one row per class)
    judge: str = "logreg"         # CAS judge of the stage metrics: "logreg" (pixels) or "cnn"
    cas_seeds: int = 3            # seeds of the real / synthetic / real+synthetic protocol; 0 skips it
    cas_judge: str = "cnn"        # judge of that protocol (a classifier trained from scratch, as in the paper)
    cas_epochs: int = 10          # its training epochs
    threads: Optional[int] = None  # torch CPU threads (None: auto, see choose_threads)
    progress: bool = True         # tqdm bars
    method: str = "ict"           # stage 1's method: "ict", "sct" or "meanflow" (fastcm.cm.METHODS)
    stage1_seconds: Optional[float] = None  # time budget of stage 1 (stops early); None = all stage1_steps
    stage1_clock: str = "wall"    # its clock: "wall", or "cpu" = this process's CPU seconds / torch threads
    eval_every: int = 500         # FID while training of stage 1 (digits features, test split, 1/2-step); 0 = off
    fd_eval_every: Optional[int] = None  # the same for the FD stage; None = its log interval, 0 = off

    def __post_init__(self):
        for name in ("batch_size", "fd_batch_size", "per_class", "grid_per_class", "cas_epochs"):
            check_int(name, getattr(self, name), 1)
        for name in ("fd_steps", "cas_seeds", "seed", "eval_every"):
            check_int(name, getattr(self, name), 0)
        for name in ("ict_steps", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.fd_eval_every is not None:
            check_int("fd_eval_every", self.fd_eval_every, 0)
        for name in ("lr", "fd_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        check_choice("judge", self.judge, ("logreg", "cnn"))
        check_choice("cas_judge", self.cas_judge, ("logreg", "cnn"))
        check_choice("method", self.method, tuple(METHOD_LABELS))
        check_choice("stage1_clock", self.stage1_clock, ("wall", "cpu"))
        if self.stage1_seconds is not None and not (isinstance(self.stage1_seconds, (int, float))
                                                    and not isinstance(self.stage1_seconds, bool)
                                                    and 0 < self.stage1_seconds < float("inf")):
            raise ValueError(f"stage1_seconds must be None or a positive number, got {self.stage1_seconds!r}")
        if self.fd_steps and self.fd_batch_size % 10:
            raise ValueError(f"fd_batch_size must be a multiple of the 10 classes, got {self.fd_batch_size}")

    @property
    def stage1_steps(self) -> int:
        """Stage 1's planned steps: ict_steps, or the method's STAGE1_STEPS (equal compute) when it is None."""
        return STAGE1_STEPS[self.method] if self.ict_steps is None else self.ict_steps


def check_preset(name: str) -> None:
    """The demo trains on digits and evaluates per class (CAS, class-balanced samples): it needs a 10-class
    conditional preset of 1x8x8 images."""
    from fastcm.models import PRESETS

    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    c = PRESETS[name]
    if (c.in_channels, c.img_resolution, c.num_classes) != (1, 8, 10):
        kind = f"{c.num_classes}-class conditional" if c.num_classes else "unconditional"
        raise ValueError(f"--preset {name} makes {kind} {c.in_channels}x{c.img_resolution}x{c.img_resolution} "
                         "images, but the demo trains on digits and scores samples per class: it needs a "
                         "10-class 1x8x8 preset such as 'digits'")
