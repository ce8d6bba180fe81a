"""Work counter and sanitizer for Triton kernels run by the interpreter (TRITON_INTERPRET=1).

The interpreter executes every ``tl.load``, ``tl.store``, ``tl.dot`` and atomic with concrete pointers and masks,
one program after another (triton/runtime/interpreter.py: ``InterpreterBuilder.create_masked_load``,
``create_masked_store``, ``create_dot``, ``create_atomic_rmw``, ``create_atomic_cas``; ``GridExecutor`` copies the
arguments to the host and loops over the grid with ``set_grid_idx``). While a :func:`probe` is active, thin
wrappers around those entry points record, for every launch (:class:`Launch`):

* work: bytes loaded and stored by active lanes, in the pointer's element type (so bf16 counts 2 bytes even where
  a launcher upcasts bf16 dot operands for the interpreter), bytes touched by atomics, and the FLOPs of each
  ``tl.dot`` (2 * M * N * K) by operand dtype;
* findings (``sanitize=True``): what compute-sanitizer's memcheck and racecheck report on a GPU, and the
  interpreter tolerates silently:
    - ``out-of-bounds``: an active address outside the byte span of every tensor argument of the launch (a view's
      own span, from its storage offset, sizes and strides);
    - ``write-write race``: two programs of one launch store to the same byte;
    - ``read-after-write race`` / ``write-after-read race``: a program loads a byte that another program of the
      same launch stores (the interpreter ran the store first / the load first; a GPU runs programs in no
      defined order, so either is a race).
  Atomics are checked for bounds and exempt from the race checks. Race tracking keeps the accessed addresses of a
  launch until it ends; past ``MAX_TRACKED`` addresses in one launch it keeps sampling every ``SAMPLE``-th program
  (``Launch.sampled``). Bounds are checked on every access of every launch.

Imports numpy, torch and triton only: kernels/ never imports fastcm.
"""
import contextlib
import dataclasses
import functools
import math
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

MAX_TRACKED = 1 << 24   # addresses kept for race checks per launch before sampling programs (~128 MB at most)
SAMPLE = 16             # past MAX_TRACKED, every SAMPLE-th program is still tracked


@dataclasses.dataclass
class Finding:
    """One sanitizer finding: the kernel, the kind, the first offending program (in launch order) and what it did."""
    kernel: str
    kind: str
    program: tuple
    detail: str

    def __str__(self) -> str:
        return f"{self.kernel}: {self.kind} in program {self.program}: {self.detail}"


@dataclasses.dataclass
class Launch:
    """What one interpreted launch did. Bytes count active lanes only; ``flops`` maps a dot operand dtype
    ("fp16", "fp32", ...) to 2 * M * N * K summed over the launch's ``tl.dot`` calls."""
    kernel: str
    grid: tuple = (1, 1, 1)
    loaded: int = 0
    stored: int = 0
    atomic: int = 0
    flops: Dict[str, int] = dataclasses.field(default_factory=dict)
    findings: List[Finding] = dataclasses.field(default_factory=list)
    sampled: bool = False

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def dot_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def bytes(self) -> int:
        return self.loaded + self.stored + self.atomic


class SanitizerError(AssertionError):
    """Raised by :meth:`Probe.check` when launches produced findings."""


class Probe:
    """Collects the launches (``count``) and findings (``sanitize``) of the interpreted kernels run while active."""

    def __init__(self, sanitize: bool = True, count: bool = True):
        self.sanitize, self.count = sanitize, count
        self.launches: List[Launch] = []
        self.findings: List[Finding] = []

    def check(self) -> None:
        if self.findings:
            raise SanitizerError(format_findings(self.findings))


def format_findings(findings: List[Finding], limit: int = 5) -> str:
    lines = [f"{len(findings)} sanitizer finding(s) in interpreted Triton launches:"]
    lines += [f"  {f}" for f in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"  ... and {len(findings) - limit} more")
    return "\n".join(lines)


_ACTIVE: List[Probe] = []
_TRACE = None     # the _Trace of the launch being interpreted, if a probe is active
_SAVED = {}       # original interpreter entry points while hooks are installed


@contextlib.contextmanager
def probe(sanitize: bool = True, count: bool = True) -> Iterator[Probe]:
    """Record every interpreted launch inside the block. Findings go to the innermost sanitizing probe only (so a
    test that expects findings inside its own probe does not fail an outer one); launches go to every counting
    probe. Needs TRITON_INTERPRET=1 set before triton was imported."""
    p = Probe(sanitize, count)
    if not _ACTIVE:
        _install()
    _ACTIVE.append(p)
    try:
        yield p
    finally:
        _ACTIVE.remove(p)
        if not _ACTIVE:
            _uninstall()


def summarize(launches: List[Launch]) -> Dict[str, Launch]:
    """Launches added up per kernel name (grid: of the last launch), in first-launch order."""
    out: Dict[str, Launch] = {}
    for r in launches:
        s = out.setdefault(r.kernel, Launch(r.kernel))
        s.grid, s.loaded, s.stored, s.atomic = r.grid, s.loaded + r.loaded, s.stored + r.stored, s.atomic + r.atomic
        for k, v in r.flops.items():
            s.flops[k] = s.flops.get(k, 0) + v
        s.findings += r.findings
        s.sampled |= r.sampled
    return out


# ---------------------------------------------------------------------------------------------------------------
# One launch: argument spans, accesses, race check at the end.

def _spans(name, value, out):
    """(lo, hi, name, tensor) byte spans of the tensors in one launch argument (tuples and descriptors included)."""
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            _spans(f"{name}[{i}]", v, out)
        return
    base = getattr(value, "base", None)  # TensorWrapper (a dtype reinterpretation) or TensorDescriptor
    t = value if isinstance(value, torch.Tensor) else base if isinstance(base, torch.Tensor) else None
    if t is None or t.numel() == 0:
        return
    size = t.element_size()
    lo = sum(st * (n - 1) for st, n in zip(t.stride(), t.shape) if st < 0)
    hi = sum(st * (n - 1) for st, n in zip(t.stride(), t.shape) if st > 0)
    ptr = t.data_ptr()
    out.append((ptr + lo * size, ptr + (hi + 1) * size, name, t))


class _Trace:
    def __init__(self, kernel: str, sanitize: bool):
        self.record = Launch(kernel)
        self.sanitize = sanitize
        self.args = []                   # (lo, hi, name, tensor)
        self.lo = self.hi = np.zeros(0, np.int64)
        self.loads: Dict[int, list] = {}   # merged interval -> [(addresses, size, program)]
        self.stores: Dict[int, list] = {}
        self.tracked = 0
        self.oob_seen = False

    def set_args(self, names, args_hst, kwargs_hst) -> None:
        spans = []
        for name, value in zip(names, args_hst):
            _spans(name, value, spans)
        for name, value in kwargs_hst.items():
            _spans(name, value, spans)
        self.args = spans
        merged = []
        for lo, hi, _, _ in sorted(spans, key=lambda s: s[0]):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.lo = np.array([m[0] for m in merged], np.int64)
        self.hi = np.array([m[1] for m in merged], np.int64)

    def access(self, kind: str, ptrs, mask) -> None:
        element = ptrs.get_element_ty()
        size = max(1, element.primitive_bitwidth // 8)
        addr = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        n = int(addr.size)
        r = self.record
        if kind == "load":
            r.loaded += n * size
        elif kind == "store":
            r.stored += n * size
        else:
            r.atomic += n * size
        if not self.sanitize or n == 0:
            return
        a = addr.reshape(-1).astype(np.int64)
        iv = np.searchsorted(self.lo, a, side="right") - 1
        inside = (iv >= 0) & (a + size <= self.hi[np.maximum(iv, 0)]) if len(self.lo) else np.zeros(n, bool)
        if not self.oob_seen and not inside.all():
            self.oob_seen = True
            self._out_of_bounds(kind, int(a[~inside][0]), size)
        if kind == "atomic":
            return
        pid = self._program()
        if self.tracked > MAX_TRACKED and pid % SAMPLE:
            r.sampled = True
            return
        self.tracked += n
        table = self.loads if kind == "load" else self.stores
        a, iv = a[inside], iv[inside]
        lo, hi = (int(iv.min()), int(iv.max())) if iv.size else (0, -1)
        for j in range(lo, hi + 1):
            part = a if lo == hi else a[iv == j]
            if part.size:
                table.setdefault(j, []).append((part, size, pid))

    def _program(self) -> int:
        from triton.runtime.interpreter import interpreter_builder as b
        x, y, z = b.grid_idx
        return (x * b.grid_dim[1] + y) * b.grid_dim[2] + z

    def _coords(self, pid: int) -> tuple:
        nx, ny, nz = self.record.grid
        return (pid // (ny * nz), (pid // nz) % ny, pid % nz)

    def _where(self, address: int) -> str:
        """The argument holding ``address`` (or the nearest one) and the offset into its span."""
        if not self.args:
            return "the launch has no tensor argument"
        def dist(s):
            return 0 if s[0] <= address < s[1] else min(abs(address - s[0]), abs(address - (s[1] - 1)))
        lo, hi, name, t = min(self.args, key=dist)
        where = f"argument `{name}` (shape {tuple(t.shape)}, strides {tuple(t.stride())}, {hi - lo} B span)"
        if address < lo:
            return f"{lo - address} B before {where}"
        if address >= hi:
            return f"{address - hi} B past the end of {where}"
        return f"byte {address - lo} of {where}"

    def _finding(self, kind: str, pid: int, detail: str) -> None:
        self.record.findings.append(Finding(self.record.kernel, kind, self._coords(pid), detail))

    def _out_of_bounds(self, kind: str, address: int, size: int) -> None:
        self.record.grid = _grid()
        verb = {"load": "loads", "store": "stores", "atomic": "atomically updates"}[kind]
        self._finding("out-of-bounds", self._program(),
                      f"{verb} {size} B at address {address:#x}, {self._where(address)}")

    def finish(self) -> Launch:
        self.record.grid = _grid()
        for j in sorted(self.stores):
            if self._races(self.stores[j], self.loads.get(j, [])):
                break  # one race finding per launch: the first offending program names it
        self.loads = self.stores = {}
        return self.record

    def _races(self, stores, loads) -> bool:
        unit = functools.reduce(math.gcd, [s for _, s, _ in stores + loads])
        if any(int((a % unit).any()) for a, _, _ in stores + loads):
            unit = 1
        su, sp = _units(stores, unit)
        order = np.lexsort((sp, su))
        su, sp = su[order], sp[order]
        ww = np.flatnonzero((su[1:] == su[:-1]) & (sp[1:] != sp[:-1]))
        if ww.size:  # the first offending program: the earliest second writer of a byte
            i = ww[np.argmin(sp[ww + 1])]
            self._finding("write-write race", int(sp[i + 1]),
                          f"stores {unit} B at address {int(su[i]):#x} ({self._where(int(su[i]))}), which program "
                          f"{self._coords(int(sp[i]))} also stores")
            return True
        if not loads:
            return False
        lu, lp = _units(loads, unit)
        idx = np.minimum(np.searchsorted(su, lu), su.size - 1)
        hit = np.flatnonzero((su[idx] == lu) & (sp[idx] != lp))
        if not hit.size:
            return False
        owner, loader = sp[idx[hit]], lp[hit]
        k = hit[np.argmin(np.maximum(owner, loader))]
        a, q, p = int(lu[k]), int(sp[idx[k]]), int(lp[k])
        where = f"address {a:#x} ({self._where(a)})"
        if q < p:
            self._finding("read-after-write race", p, f"loads {where}, which program {self._coords(q)} stored")
        else:
            self._finding("write-after-read race", q, f"stores {where}, which program {self._coords(p)} loaded")
        return True


def _units(entries, unit: int):
    """(address unit, program) of every access in a list of (addresses, access size, program)."""
    us, ps = [], []
    for a, size, pid in entries:
        if size > unit:
            a = (a[:, None] + np.arange(0, size, unit, dtype=np.int64)[None, :]).reshape(-1)
        us.append(a)
        ps.append(np.full(a.size, pid, np.int64))
    return np.concatenate(us), np.concatenate(ps)


def _grid() -> tuple:
    from triton.runtime.interpreter import interpreter_builder as b
    return tuple(int(v) for v in b.grid_dim)


# ---------------------------------------------------------------------------------------------------------------
# Hooks: instance attributes on the interpreter's one builder, and two GridExecutor methods.

def _on_access(kind: str, ptr_pos: int, mask_pos: Optional[int]):
    def wrap(orig):
        @functools.wraps(orig)
        def hooked(*args, **kwargs):
            out = orig(*args, **kwargs)
            if _TRACE is not None:
                mask = args[mask_pos] if mask_pos is not None and mask_pos < len(args) else kwargs.get("mask")
                _TRACE.access(kind, args[ptr_pos], mask)
            return out
        return hooked
    return wrap


def _on_dot(orig):
    @functools.wraps(orig)
    def hooked(a, b, *args, **kwargs):
        if _TRACE is not None:
            flops = _TRACE.record.flops
            key = str(a.dtype.scalar if hasattr(a.dtype, "scalar") else a.dtype)
            flops[key] = flops.get(key, 0) + 2 * int(a.data.size) * int(b.data.shape[-1])
        return orig(a, b, *args, **kwargs)
    return hooked


def _on_launch(orig):
    @functools.wraps(orig)
    def hooked(self, *args, **kwargs):
        global _TRACE
        sanitize = any(p.sanitize for p in _ACTIVE)
        trace, outer = _Trace(getattr(self.fn, "__name__", "kernel"), sanitize), _TRACE
        _TRACE = trace
        try:
            return orig(self, *args, **kwargs)
        finally:
            _TRACE = outer
            _deliver(trace.finish())
    return hooked


def _on_args(orig):
    @functools.wraps(orig)
    def hooked(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig(self, args_dev, kwargs)
        if _TRACE is not None:
            _TRACE.set_args(self.arg_names, args_hst, kwargs_hst)
        return args_hst, kwargs_hst
    return hooked


def _deliver(record: Launch) -> None:
    for p in _ACTIVE:
        if p.count:
            p.launches.append(record)
    sanitizing = [p for p in _ACTIVE if p.sanitize]
    if sanitizing and record.findings:
        sanitizing[-1].findings += record.findings


# (builder method, wrapper): positions are those of the interpreter's signatures, stable from triton 3.0 to 3.9:
# create_masked_load(ptrs, mask, other, ...), create_masked_store(ptrs, value, mask, ...),
# create_atomic_rmw(rmwOp, ptr, val, mask, ...), create_atomic_cas(ptr, cmp, val, ...), create_dot(a, b, d, ...).
_BUILDER_HOOKS = {
    "create_masked_load": _on_access("load", 0, 1),
    "create_masked_store": _on_access("store", 0, 2),
    "create_atomic_rmw": _on_access("atomic", 1, 3),
    "create_atomic_cas": _on_access("atomic", 0, None),
    "create_dot": _on_dot,
}


def _install() -> None:
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    for name, wrap in _BUILDER_HOOKS.items():
        setattr(builder, name, wrap(getattr(type(builder), name).__get__(builder)))
    executor = interpreter.GridExecutor
    _SAVED["__call__"], _SAVED["_init_args_hst"] = executor.__call__, executor._init_args_hst
    executor.__call__ = _on_launch(executor.__call__)
    executor._init_args_hst = _on_args(executor._init_args_hst)


def _uninstall() -> None:
    from triton.runtime import interpreter

    for name in _BUILDER_HOOKS:
        interpreter.interpreter_builder.__dict__.pop(name, None)
    for name, fn in _SAVED.items():
        setattr(interpreter.GridExecutor, name, fn)
    _SAVED.clear()
