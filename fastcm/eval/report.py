"""Run directories and report writers: the --out safety rule, atomic JSON/markdown/npz files, training-curve plots.

Nothing a user saved is ever silently overwritten: an existing, non-empty output directory is refused unless the
caller passes ``overwrite=True``; each file is written atomically (fastcm._io.atomic_write: a private temporary,
fsync'ed and renamed into place).
"""
import datetime
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fastcm._io import atomic_write


def prepare_out_dir(out: Optional[str], overwrite: bool = False, *, root: str = "runs", prefix: str = "run") -> Path:
    """The directory a command writes into, created if needed.

    ``out=None`` → a new directory ``<root>/<prefix>-YYYYmmdd-HHMMSS`` (with a numeric suffix if that exists).
    An existing directory that is not empty is refused unless ``overwrite`` (then files of the same name are
    replaced, other files are left alone); an existing *file* is always refused.
    """
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(root) / f"{prefix}-{stamp}"
        path, i = base, 1
        while path.exists():
            path, i = base.with_name(f"{base.name}-{i}"), i + 1
    else:
        path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {str(path)!r} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {str(path)!r} exists and is not empty; choose a new directory or pass "
                              "--overwrite to replace the files this command writes there")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_new_file(path, overwrite: bool = False, *, suffix: Optional[str] = None, what: str = "--out") -> Path:
    """Validate an output *file* path: the right suffix, and not an existing file unless ``overwrite``."""
    path = Path(path).expanduser()
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{what} must end in {suffix}, got {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory; give a file path ending in {suffix or ''}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} exists; choose another path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def to_jsonable(obj):
    """Numbers, arrays and paths as plain JSON values; non-finite floats become null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # 0-d torch tensors
        return to_jsonable(obj.item())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def write_json(path, obj) -> Path:
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def save_samples_npz(path, x, y=None, **extra) -> Path:
    """Samples as ``x`` (N, C, H, W) float32 in [-1, 1] and ``y`` (N,) int64 class labels (omitted when None), the
    format `fastcm cas/fid/stats` read; ``extra`` arrays are stored beside them."""
    as_np = lambda a: a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)  # noqa: E731
    x = as_np(x).astype(np.float32)
    arrays = {"x": np.clip(x, -1.0, 1.0)}
    if y is not None:
        arrays["y"] = as_np(y).astype(np.int64)
        if arrays["y"].shape != (x.shape[0],):
            raise ValueError(f"y must be (N,) = ({x.shape[0]},), got {arrays['y'].shape}")
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got {x.shape}")
    arrays.update({k: as_np(v) for k, v in extra.items()})

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats with 4 significant digits, None as an em dash."""
    def cell(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "—"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _fid_keys(records) -> list:
    """The ``fid_<k>step`` keys of the evaluation records (FID while training), in sampler order."""
    keys = {k for r in records for k in r if k.startswith("fid_") and k.endswith("step")}
    return sorted(keys, key=lambda k: int(k[4:-4]) if k[4:-4].isdigit() else 0)


def _plot_fid(ax, records, keys, title: str, xlabel: str) -> None:
    """FID-while-training curves (log scale), one line per sampler, the lowest point of the first marked."""
    colors = ("tab:red", "tab:purple", "tab:brown", "tab:gray")
    for i, key in enumerate(keys):
        s, v = _series(records, key)
        ax.plot(s, v, color=colors[i % len(colors)], marker="." if len(s) < 30 else None,
                label=f"{key[4:-4]}-step")
        if i == 0 and v:
            j = min(range(len(v)), key=v.__getitem__)
            ax.scatter([s[j]], [v[j]], color=colors[0], marker="*", s=90, zorder=3,
                       label=f"lowest {key[4:-4]}-step")
    if any(v > 0 for key in keys for v in _series(records, key)[1]):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (eval features, EMA model)")
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_training_curves(path, ict_records: Sequence[dict], fd_records: Sequence[dict] = (),
                         fd_key: str = "fd") -> Path:
    """PNG of the training curves: iCT loss (log scale) and N(k) over steps; the FID-while-training curves
    (``fid_1step``, ``fid_2step`` records of ``eval_every``) of stage 1; FD over the fine-tune steps (its
    ``fid_<k>step`` evaluations when the stage logged them, else ``fd_key``).

    Records are the metrics.jsonl dicts of fastcm.train (``step``, ``loss``, ``N``; ``fd`` for the FD stage).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    stage1_fid = _fid_keys(ict_records)
    ncols = 1 + bool(stage1_fid) + bool(fd_records)
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), squeeze=False)
    ax = axes[0, 0]
    steps, loss = _series(ict_records, "loss")
    ax.plot(steps, loss, color="tab:blue", label="iCT loss")
    if loss and min(loss) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("iCT step")
    ax.set_ylabel("loss (λ-weighted Pseudo-Huber)", color="tab:blue")
    n_steps, n_vals = _series(ict_records, "N")
    if n_vals:
        ax2 = ax.twinx()
        ax2.step(n_steps, n_vals, where="post", color="tab:orange", label="N(k)")
        ax2.set_ylabel("N(k) discretization steps", color="tab:orange")
    ax.set_title("stage 1: iCT")
    if stage1_fid:
        _plot_fid(axes[0, 1], ict_records, stage1_fid, "stage 1: FID while training", "training step")
    if fd_records:
        ax = axes[0, ncols - 1]
        fd_fid = _fid_keys(fd_records)
        if fd_fid:
            _plot_fid(ax, fd_records, fd_fid, "stage 2: FD-loss fine-tune", "fine-tune step")
        else:
            s, v = _series(fd_records, fd_key)
            ax.plot(s, v, color="tab:green", marker="." if len(s) < 30 else None)
            ax.set_xlabel("fine-tune step")
            ax.set_ylabel("classifier-feature FD to the test split" if fd_key == "fd_test" else "Fréchet distance")
            ax.set_title("stage 2: FD-loss fine-tune")
    fig.tight_layout()

    def write(tmp):
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=110)

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)
