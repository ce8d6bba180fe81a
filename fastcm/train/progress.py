"""Progress of a run (rank 0 only): a tqdm bar, ``metrics.jsonl`` records, and callbacks for the caller.

A callback is either a plain callable, called as ``fn(record)`` with every metrics record (so a demo can collect
curves with ``records.append``), or an object with some of :class:`Callback`'s methods (``on_log``,
``on_sample``, ``on_checkpoint``, ``on_end``), each invoked at the matching event.
"""
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch


class Callback:
    """Override any of these; every call happens on rank 0 only."""

    def on_log(self, record: dict) -> None:
        """A metrics record (``step``, ``loss``, ``img_per_s`` …), as appended to metrics.jsonl."""

    def on_sample(self, step: int, images: torch.Tensor) -> None:
        """One-step samples (n, C, H, W) in [-1, 1] from the EMA weights at ``step``."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint was written."""

    def on_end(self, result) -> None:
        """Training finished; ``result`` is the TrainResult."""


CallbackLike = Union[Callback, Callable[[dict], None]]


_HOOKS = ("on_log", "on_sample", "on_checkpoint", "on_end")


class _Adapter(Callback):
    """Any object with some of the hook methods (missing ones do nothing), or a plain callable as on_log."""

    def __init__(self, obj):
        if any(callable(getattr(obj, h, None)) for h in _HOOKS):
            for h in _HOOKS:
                if callable(getattr(obj, h, None)):
                    setattr(self, h, getattr(obj, h))
        else:
            self.on_log = obj


def _as_callbacks(callbacks: Optional[Sequence[CallbackLike]]):
    out = []
    for cb in callbacks or ():
        if isinstance(cb, Callback):
            out.append(cb)
        elif callable(cb) or any(callable(getattr(cb, h, None)) for h in _HOOKS):
            out.append(_Adapter(cb))
        else:
            raise TypeError(f"callbacks must be callables or objects with on_log/on_sample/on_checkpoint/on_end "
                            f"methods, got {type(cb).__name__}")
    return out


class RunLogger:
    """metrics.jsonl (append-only; on resume, records after the resumed step are dropped), tqdm bar, callbacks."""

    def __init__(self, out_dir: Optional[Path], start_step: int, total_steps: int, enabled: bool,
                 progress: bool, callbacks: Optional[Sequence[CallbackLike]], desc: str):
        self.enabled = enabled
        self.callbacks = _as_callbacks(callbacks) if enabled else []
        self.path = out_dir / "metrics.jsonl" if (out_dir is not None and enabled) else None
        self.records = []
        self.postfix, self.eval_postfix = {}, {}  # the bar shows the last training record and the last evaluation
        if self.path is not None:
            _truncate_after(self.path, start_step)
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, unit="step")

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=False) + "\n")
        if self.bar is not None:
            if "eval_seconds" in record:
                self.eval_postfix = eval_postfix(record)
            else:
                self.postfix = bar_postfix(record)
            self.bar.set_postfix({**self.postfix, **self.eval_postfix}, refresh=False)
        for cb in self.callbacks:
            cb.on_log(record)

    def warn(self, message: str) -> None:
        """One line on stderr (above the bar), rank 0 only."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def event(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(*args)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LogInterval:
    """Sums of the logged values since the last record: 0-d tensors are summed (then averaged over the finite steps
    and the ranks), numbers keep their last value."""

    def __init__(self):
        self.t_run = time.perf_counter()
        self.reset(self.t_run)

    def reset(self, now: float) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.last: Dict[str, float] = {}
        self.count, self.t_start = 0, now

    def add(self, values: dict, finite: bool) -> None:
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
            else:
                self.last[k] = v
        self.sums["finite_steps"] = self.sums.get("finite_steps", 0.0) + torch.tensor(float(finite)).double()
        self.count += 1

    def means(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Each summed value over the interval's finite steps (NaN if none), then the numbers' last values.
        ``reduce_sum`` sums a float64 vector over the ranks (identity when alone)."""
        keys = sorted(self.sums)
        vec = reduce_sum(torch.stack([self.sums[k].reshape(()).double().cpu() for k in keys]))
        total = dict(zip(keys, vec.tolist()))
        good = total.pop("finite_steps")
        return {**{k: (v / good if good else float("nan")) for k, v in total.items()}, **self.last}


def bar_postfix(record: dict) -> dict:
    """What the progress bar shows: the FD itself in the FD stage (its loss may be the normalised FD, ~1 by
    construction; the total with an iCT term), the loss and N(k) in the iCT stage, and the throughput."""
    fmt = lambda v: "nan" if v is None else f"{v:.4g}"  # noqa: E731
    if "fd" in record:
        post = {"fd": fmt(record["fd"])}
        if "ict" in record:
            post.update(ict=fmt(record["ict"]), loss=fmt(record.get("loss")))
    else:
        post = {"loss": fmt(record.get("loss"))}
        if "N" in record:
            post["N"] = record["N"]
    post["img/s"] = f"{record.get('img_per_s', 0):.1f}"
    return post


def eval_postfix(record: dict) -> dict:
    """The last evaluation on the bar: fid1 / fid2 ... (``fid_<k>step``), or "failed"."""
    if "eval_error" in record:
        return {"fid": "failed"}
    return {f"fid{k[4:-4]}": f"{v:.4g}" for k, v in record.items()
            if k.startswith("fid_") and k.endswith("step") and v is not None}


def _truncate_after(path: Path, step: int) -> None:
    """Drop records with step > ``step`` (a crashed run logged past its last checkpoint); atomic rewrite."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line from a crash
    if len(keep) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)
