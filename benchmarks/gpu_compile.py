"""The compile gate (`make gpu-compile`): every Triton kernel compiled for sm_80 and sm_90 without a GPU.

A thin entry point for fastcm.perf.gate, which iterates over the ops registry (each op describes its own launches:
``OpSpec.aot_jobs``):

    python benchmarks/gpu_compile.py                  # full matrix -> benchmarks/results/gpu-compile.md
    python benchmarks/gpu_compile.py --subset --json F  # the representative subset tests/test_gpu_compile.py runs
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcm.perf import gate  # noqa: E402

if __name__ == "__main__":
    sys.exit(gate.main())
