"""Ahead-of-time compilation of the launchers' real launches for NVIDIA targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) never type-checks loop-carried variables, nor sees shared memory, registers or
spills. This module runs a launcher on ``meta`` tensors (shapes, strides and storage offsets, no data) with its
kernels swapped for recorders, then compiles every recorded launch the way Triton's JIT would on a GPU of the
chosen architecture: the same binder (``native_specialize_impl``: pointers divisible by 16 when their byte offset
is, ints equal to 1 folded to constants, ints divisible by 16 marked so), the same heuristics, and for autotuned
kernels each config the launcher's prune hook keeps. ptxas from the triton wheel gives registers and spills.

Needs TRITON_INTERPRET unset (jit kernels, not interpreted ones) and no CUDA driver. Imports torch and triton only.
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
from typing import Callable, Iterator, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import _utils

# Largest dynamic shared memory one block may opt in to (CUDA C Programming Guide, "Compute Capabilities" table).
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
_MMA = re.compile(r"\b(mma\.sync|wgmma\.mma_async)\S*")


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call of a launcher."""
    name: str
    kernel: object     # the module attribute: Autotuner, Heuristics or JITFunction
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Compiled:
    """Resources of one compiled (kernel, config, target)."""
    kernel: str
    arch: int
    config: str
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    mma: tuple = ()         # distinct MMA instruction kinds in the PTX, e.g. ("mma.sync.aligned.m16n8k16...",)
    error: Optional[str] = None
    kwargs: dict = dataclasses.field(default_factory=dict)  # the constexprs and options compiled with

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


class _Recorder:
    def __init__(self, name, kernel, calls):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(Launch(self.name, self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def recording(module, arch: int) -> Iterator[List[Launch]]:
    """Swap every kernel of ``module`` for a recorder and make the launchers' shared-memory queries answer for
    ``arch``; yields the list of recorded launches."""
    calls: List[Launch] = []
    kernels = {k: v for k, v in vars(module).items() if isinstance(v, (Autotuner, Heuristics, JITFunction))}
    token = _utils.TARGET_SHARED_MEMORY.set(SHARED_MEMORY_LIMIT[arch])
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _Recorder(name, kernel, calls))
        yield calls
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
        _utils.TARGET_SHARED_MEMORY.reset(token)


def kernels_of(module) -> List[str]:
    """Names of the module's @triton.jit kernels that a launcher can launch (jit helpers excluded: they are
    compiled inside the kernels that call them)."""
    out = []
    for name, v in vars(module).items():
        if isinstance(v, (Autotuner, Heuristics)) or (isinstance(v, JITFunction) and name.endswith("_kernel")):
            out.append(name)
    return out


def configs_of(launch: Launch, arch: int, pick: Callable = None) -> List[dict]:
    """Keyword sets (constexprs + num_warps/num_stages) of every config the launch may run: for an autotuned
    kernel, the configs its prune hook keeps for these arguments on ``arch`` (``pick`` may select among them)."""
    kernel = launch.kernel
    if not isinstance(kernel, Autotuner):
        return [dict(launch.kwargs)]
    nargs = dict(zip(kernel.arg_names, launch.args))
    token = _utils.TARGET_SHARED_MEMORY.set(SHARED_MEMORY_LIMIT[arch])
    try:
        kept = kernel.early_config_prune(kernel.configs, nargs, **launch.kwargs) if kernel.early_config_prune \
            else kernel.configs
    finally:
        _utils.TARGET_SHARED_MEMORY.reset(token)
    kept = pick(kept) if pick else kept
    return [{**launch.kwargs, **c.all_kwargs()} for c in kept]


def _jit_fn(kernel, args, kwargs):
    """Apply heuristics down to the JITFunction, as Heuristics.run does."""
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Heuristics):
            for v, heur in kernel.values.items():
                kwargs[v] = heur({**dict(zip(kernel.arg_names, args)), **kwargs})
        kernel = kernel.fn
    return kernel, kwargs


def compile_launch(launch: Launch, kwargs: dict, arch: int) -> Compiled:
    """Compile one launch with config keywords ``kwargs`` for sm_<arch>, binding arguments as the JIT does."""
    fn, kwargs = _jit_fn(launch.kernel, launch.args, dict(kwargs))
    config = _describe(kwargs)
    out = Compiled(launch.name, arch, config, kwargs=kwargs)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        launched = {**_utils.LAUNCH_OPTIONS, **kwargs}  # the options every launch pins (FP contraction)
        bound, specialization, options = binder(*launch.args, **launched)
        options, signature, constexprs, attrs = fn._pack_args(backend, launched, bound, specialization, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _ptxas_log():  # ptxas -v output of a cold compile (no second run)
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - the gate reports every failure, whatever its type
        out.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return out
    out.shared = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    out.mma = tuple(sorted(set(m.group(0) for m in _MMA.finditer(ptx))))
    out.registers, out.spill_stores, out.spill_loads = ptxas_usage(compiled, arch, log.getvalue())
    return out


def _describe(kwargs: dict) -> str:
    parts = []
    for k, v in kwargs.items():
        if isinstance(v, triton.language.dtype):
            v = str(v).replace("triton.language.", "")
        elif hasattr(v, "__name__"):
            v = v.__name__
        parts.append(f"{k}={v}")
    return " ".join(parts)


@contextlib.contextmanager
def _ptxas_log():
    """Make triton print ptxas -v's log (registers, spills) when it runs ptxas."""
    from triton import knobs
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = saved


def _parse_ptxas(log: str):
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)), int(spill.group(1)), int(spill.group(2))) if spill else (int(regs.group(1)), 0, 0)


def ptxas_usage(compiled, arch: int, log: str = ""):
    """(registers per thread, spill-store bytes, spill-load bytes) from ``ptxas -v``: the log of this compile when
    it ran ptxas, else cached beside the compiled artifacts in the Triton cache, else ptxas run once more."""
    meta_dir = os.path.dirname(next(p for k, p in compiled.metadata_group.items() if k.endswith(".json")))
    cache = os.path.join(meta_dir, "ptxas-usage.json")
    usage = _parse_ptxas(log)
    if usage is None and os.path.exists(cache):
        with open(cache) as f:
            return tuple(json.load(f))
    if usage is None:
        import tempfile

        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(compiled.asm["ptx"])
            usage = _parse_ptxas(subprocess.run(
                [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
                 src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr)
    with open(cache, "w") as f:
        json.dump(usage, f)
    return usage
