"""The old name of :mod:`fastcm.demo.compare` (``fastcm demo --compare``); its names are the same objects."""
from fastcm.demo.compare import COMPARE_METHODS, COMPARE_SECONDS, run_compare  # noqa: F401

__all__ = ["COMPARE_METHODS", "COMPARE_SECONDS", "run_compare"]
