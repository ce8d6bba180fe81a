"""`make gpu-check`: what a user with one NVIDIA GPU runs first (fastcm.perf.gpu_check; see its docstring)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcm.perf.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
