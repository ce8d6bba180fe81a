"""Gather a pytest-benchmark JSON run into benchmarks/results/<device>.md and .csv (fastcm.perf.bench_report).

    python benchmarks/report.py RUN.json [--out benchmarks/results]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcm.perf.bench_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
