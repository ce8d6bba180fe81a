"""pytest plugin for ``benchmarks/diffusers_suite.py``: runs diffusers' own model tests on fastcm-patched models.

Loaded with ``-p diffusers_suite_plugin`` (benchmarks/ on PYTHONPATH). Environment:
  FASTCM_SUITE_IMPL      "none" (unpatched run), "torch" or "triton": the ``impl`` of ``fastcm.patch``.
  FASTCM_SUITE_RESULT    path of a JSON file this plugin writes: outcome counts, each test's outcome, the failing
                         node ids with their first error line and the skip reasons.
  FASTCM_SUITE_DEADLINE  seconds since the session start after which the remaining tests are skipped as "not reached".
  FASTCM_SUITE_TEST_CAP  seconds per test (SIGALRM): a test running longer fails as "over the per-test cap".

Every ``diffusers.ModelMixin`` is patched when its outermost ``__init__`` returns (models built by ``from_config``
and ``from_pretrained`` included: both construct through ``__init__``); the bare blocks of
``test_unet_2d_blocks.py`` are patched through their test class's ``block_class``.
"""
import functools
import json
import os
import signal
import threading
import time

IMPL = os.environ.get("FASTCM_SUITE_IMPL", "none")
if IMPL not in ("none", "torch", "triton"):
    raise ValueError(f"FASTCM_SUITE_IMPL must be none, torch or triton, got {IMPL!r}")
if IMPL == "triton":  # CPU-only machine: the interpreter must be on before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_local = threading.local()
_state = {"start": time.time(), "outcomes": {}, "failed": [], "patched_models": 0, "tests": {}, "skip_reasons": {},
          "selected": 0, "deselected": 0}


def _patch(module) -> None:
    import fastcm

    fastcm.patch(module, impl=IMPL)
    _state["patched_models"] += 1


def _wrap_init(cls) -> None:
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_fastcm_suite", False):
        return

    @functools.wraps(init)  # keeps the signature diffusers' ConfigMixin reads
    def __init__(self, *args, **kwargs):
        depth = getattr(_local, "depth", 0)
        _local.depth = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _local.depth = depth
        if depth == 0:
            _patch(self)

    __init__._fastcm_suite = True
    cls.__init__ = __init__


def _install() -> None:
    from diffusers.models.modeling_utils import ModelMixin

    seen, todo = set(), [ModelMixin]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            _wrap_init(cls)
            todo.extend(cls.__subclasses__())
    parent_hook = ModelMixin.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):  # classes imported later (diffusers' lazy modules, test files)
        if parent_hook is not None:
            parent_hook.__func__(cls, **kwargs)
        else:
            super(ModelMixin, cls).__init_subclass__(**kwargs)
        _wrap_init(cls)

    ModelMixin.__init_subclass__ = classmethod(__init_subclass__)


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)  # the same in all three runs; the machine is shared
    if IMPL != "none":
        _install()


def pytest_collection_modifyitems(session, config, items):
    if IMPL == "none":
        return
    for item in items:
        cls = getattr(item, "cls", None)
        block = getattr(cls, "block_class", None) if cls is not None else None
        if block is not None and not getattr(block, "_fastcm_suite", False):
            cls.block_class = staticmethod(_block_factory(block))


def pytest_deselected(items):
    _state["deselected"] += len(items)


def pytest_collection_finish(session):
    _state["selected"] = len(session.items)


def _block_factory(block_class):
    @functools.wraps(block_class, updated=())
    def build(*args, **kwargs):
        block = block_class(*args, **kwargs)
        _patch(block)
        return block

    build._fastcm_suite = True
    return build


def _on_alarm(signum, frame):
    raise TimeoutError(f"over the per-test cap of {os.environ['FASTCM_SUITE_TEST_CAP']} s")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = float(os.environ.get("FASTCM_SUITE_DEADLINE", "0") or 0)
    if deadline and time.time() - _state["start"] > deadline:
        pytest.skip("fastcm suite: not reached (run deadline)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    cap = int(float(os.environ.get("FASTCM_SUITE_TEST_CAP", "0") or 0))
    if cap:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(cap)
    try:
        return (yield)
    finally:
        if cap:
            signal.alarm(0)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        if report.when != "call" and report.outcome == "failed":
            kind = "error"
        elif report.outcome == "skipped" and "not reached" in str(report.longrepr):
            kind = "not reached"
        elif report.outcome == "failed" and "over the per-test cap" in str(report.longrepr):
            kind = "over cap"
        else:
            kind = report.outcome
        _state["outcomes"][kind] = _state["outcomes"].get(kind, 0) + 1
        _state["tests"][report.nodeid] = kind
        if kind == "skipped":
            why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            why = why.removeprefix("Skipped: ").splitlines()[0][:120] if why else ""
            _state["skip_reasons"][why] = _state["skip_reasons"].get(why, 0) + 1
        if kind in ("failed", "error", "over cap"):
            msg = getattr(report.longrepr, "reprcrash", None)
            _state["failed"].append([report.nodeid, kind, msg.message.splitlines()[0][:300] if msg else ""])


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FASTCM_SUITE_RESULT")
    if path:
        with open(path, "w") as f:
            json.dump(dict(_state, impl=IMPL, seconds=time.time() - _state["start"]), f, indent=1)
