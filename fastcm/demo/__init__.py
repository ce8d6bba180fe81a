"""The embedded digits demo (``make demo`` → ``fastcm demo``): the whole mission on a plain CPU in about 10 minutes.

1. iCT (Song & Dhariwal 2023) trains a class-conditional consistency model (``digits`` preset) on scikit-learn's
   digits (train split, 1,347 images);
2. one-step and two-step samples (σ = 80, then 0.821), ``per_class`` per class → .npz + PNG grids;
3. evaluation against the real *test* split: Fréchet distance in the 64-d feature space of a small digits CNN
   (trained once on the train split, cached) and in raw pixel space (a space no network defines), and the
   Classification Accuracy Score (a judge trained only on the samples) beside the same judge on the real train split;
4. a second stage fine-tunes with the FD loss (one-step samples → CNN features → FD to the train-split statistics)
   and the same evaluation runs again; the CAS protocol (real / synthetic / real + synthetic) runs on its samples;
5. report.json, report.md and training_curves.png go to ``out``; both stages evaluate FID while training
   (``eval_every``: digits features of the EMA model's one- and two-step samples against the test split, whose
   statistics are written to ``out/eval-reference-digits-test.npz``) and keep their best checkpoint.

``method`` ("ict" by default, "sct" or "meanflow") picks stage 1's method: sampling, evaluation and the FD stage then
use that method's one- and two-step samplers and one-step generator. Each method gets the compute of iCT's 4,000
steps (:data:`STAGE1_STEPS`), so every method demo keeps the demo's time. :func:`run_compare`
(``fastcm demo --compare``) runs stage 1 .. 4 for all three methods at an equal budget of stage 1 and writes one
table. The defaults follow measurements on this project's 2-core CPU for iCT (4,000 steps, batch 64, RAdam 2e-4, no
EMA; the FD stage 150 steps of batch 250 at Adam 5e-5).

Modules: ``config`` (DemoConfig, quality goals, per-method steps), ``pipeline`` (the public stages every run
shares), ``run`` (``run_demo``: one run and its report), ``compare`` (``run_compare``). ``fastcm.demo_compare`` is
the old name of ``fastcm.demo.compare``.
"""
from .compare import COMPARE_METHODS, COMPARE_SECONDS, run_compare
from .config import ICT_STEPS, METHOD_LABELS, QUALITY, STAGE1_STEPS, STEP_COST, DemoConfig, check_preset
from .pipeline import Clock, DemoSetup, clear_stage_runs, demo_threads, environment, run_pipeline, setup
from .run import run_demo

__all__ = ["COMPARE_METHODS", "COMPARE_SECONDS", "ICT_STEPS", "METHOD_LABELS", "QUALITY", "STAGE1_STEPS", "STEP_COST",
           "Clock", "DemoConfig", "DemoSetup", "check_preset", "clear_stage_runs", "demo_threads", "environment",
           "run_compare", "run_demo", "run_pipeline", "setup"]
