"""fastcm: fast, exact, tested consistency models (Triton kernels + compact CM / U-Net library)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "fastcm" / "__init__.py").read_text()).group(1)

# kernels/ is installed as the subpackage fastcm.kernels: a top-level `kernels` import would collide with the
# `kernels` package on PyPI.
packages = find_packages(include=["fastcm", "fastcm.*"]) + ["fastcm.kernels"]

setup(
    name="fastcm",
    version=VERSION,
    description="Consistency models that are fast, exact and tested: Triton kernels, iCT, FID as a loss",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastcm.kernels": "kernels"},
    install_requires=[
        "torch>=2.10",  # the oldest torch `make compat` tested (README, Versions)
        "numpy",
        "einops",
        "safetensors",
        "tqdm",
        "pillow",
        "scipy",  # LAPACK dsygst for the Fréchet distance (a torch fallback exists, ~15% slower)
        # A CUDA torch brings its own matching triton; a floor without a cap keeps that one (3.6 is the oldest
        # triton `make compat` tested; torch 2.10 brings it).
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        # diffusers: fastcm.patch's tests and the scheduler cross-checks (0.42.1 is the oldest version tested)
        "test": ["pytest", "pytest-benchmark", "scipy", "scikit-learn", "matplotlib", "diffusers>=0.42.1"],
        "demo": ["scikit-learn", "matplotlib"],
        "diffusers": ["diffusers>=0.42.1"],  # fastcm.patch for diffusers U-Nets
    },
    entry_points={"console_scripts": ["fastcm = fastcm.cli:main"]},
)
