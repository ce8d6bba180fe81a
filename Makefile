# fastcm: `make test` and `make demo` do their own set-up on a fresh machine.
#
# CPU set-up (default): a .venv with torch 2.13.0 (CPU wheel) and triton 3.7.0, whose interpreter
# (TRITON_INTERPRET=1) runs the kernels in the tests. With your own CUDA torch, reuse its environment and keep its
# triton:  make test VENV=/path/to/env CPU_STACK=0   (or VENV=$$CONDA_PREFIX)
PYTHON ?= python3
VENV ?= .venv
CPU_STACK ?= 1
TORCH_VERSION := 2.13.0
TRITON_VERSION := 3.7.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastcm-installed
PYTEST_ARGS ?=

.PHONY: setup test demo compare bench clean gpu-compile gpu-check kernel-report diffusers-suite compat

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(CPU_STACK),1)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) triton==$(TRITON_VERSION)
endif
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The embedded digits demo (about 10 minutes on 2 CPU cores): writes runs/demo-<time>/ with report.md.
# Options go through DEMO_ARGS, e.g. make demo DEMO_ARGS="--out runs/mine --steps 2000"
demo: $(STAMP)
	$(PY) -m fastcm.cli demo $(DEMO_ARGS)

# iCT, sCT and MeanFlow on digits at an equal stage-1 budget (240 CPU-seconds per thread each), each evaluated one-
# and two-step and after the FD stage: runs/compare-<time>/compare.md and compare.json (<= 30 minutes on 2 CPU cores).
compare: $(STAMP)
	$(PY) -m fastcm.cli demo --compare $(DEMO_ARGS)

# Benchmark suites (pytest-benchmark) and the report in benchmarks/results/<device>.md and .csv.
bench: $(STAMP)
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks -q -o addopts= -p no:cacheprovider --benchmark-enable --benchmark-save-data \
		--benchmark-json=.benchmarks/last-run.json $(BENCH_ARGS)
	$(PY) benchmarks/report.py .benchmarks/last-run.json

# Every Triton kernel compiled for sm_80 and sm_90 at the launch configs the launchers pick for the presets (no GPU
# needed): writes benchmarks/results/gpu-compile.md. `make test` runs a representative subset (tests/test_gpu_compile.py).
gpu-compile: $(STAMP)
	$(PY) benchmarks/gpu_compile.py

# Bytes and FLOPs of every op's Triton route at the presets' shapes (interpreter probe, no GPU) against the op's
# declared minimum, with H100/H200 floor times and the eager reference's traffic: benchmarks/results/kernel-work.md
# and .csv. KERNEL_REPORT_ARGS="--dtypes fp16,bf16,fp32" adds bf16 (counts equal fp16's, tests/test_kernel_work.py).
kernel-report: $(STAMP)
	$(PY) benchmarks/kernel_report.py $(KERNEL_REPORT_ARGS)

# diffusers' own model tests (from a diffusers checkout, e.g. tag v0.40.0) unpatched, fastcm.patch(impl="torch")
# and impl="triton" (interpreted subset, capped): benchmarks/results/diffusers-suite.md (about 15 min on 2 CPU cores).
# Needs the tests' extras: pip install accelerate parameterized requests-mock transformers peft. Not part of make test.
diffusers-suite: $(STAMP)
	test -n "$(DIFFUSERS_TESTS)" || { echo "set DIFFUSERS_TESTS=<a diffusers checkout's tests/ folder>"; exit 2; }
	$(PY) benchmarks/diffusers_suite.py $(DIFFUSERS_TESTS) $(DIFFUSERS_SUITE_ARGS)

# The first command to run on a GPU (with your CUDA torch: make gpu-check VENV=/path/to/env CPU_STACK=0): the compile
# gate, the gpu-marked tests, every op vs its reference in fp16/bf16/fp32, a cifar10-small training step Triton vs
# torch and a short benchmark subset -> benchmarks/results/gpu-check-<device>.md (< 10 min). Without CUDA: the gate only.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# Throwaway environments under .compat/ for torch:triton pairs, each running the compile-gate subset plus the
# interpreted kernel and patch tests: benchmarks/results/compat.md (15-40 min a pair on 2 CPU cores: a CUDA torch is
# ~3 GB to fetch and unpack). Not part of make test. Default: torch 2.10.0 + triton 3.6.0 (numpy 2.3.5) and 2.14.1 +
# 3.9.0. COMPAT_ARGS="--pairs 2.13.0:3.6.0,2.14.1:3.9.0 --keep" (TORCH:TRITON[:NUMPY]; --keep reuses environments)
compat:
	OMP_NUM_THREADS=1 nice -n 5 $(PYTHON) benchmarks/compat.py $(COMPAT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
