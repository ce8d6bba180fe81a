"""Checkpoints without pickle: tensors in one safetensors file, everything else as JSON in its header.

A checkpoint is ``<dir>/ckpt_<step>.safetensors``. Its safetensors metadata holds one key, ``fastcm``, whose value
is a JSON document (format, version, stage, step, configs, optimizer hyper-parameters, RNG seeds, counters) plus
the SHA-256 of the tensor data, so truncation and corruption are both detected. Writes go to a temporary file in
the same directory, are fsync'ed, then renamed over the target (atomic on POSIX): a crash mid-write leaves the
previous checkpoint untouched. Non-finite floating tensors are never written.
"""
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

FORMAT = "fastcm-checkpoint"
VERSION = 1
_META_KEY = "fastcm"
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file that is missing, truncated, corrupted or not a fastcm checkpoint."""


def save_checkpoint(path: PathLike, tensors: Mapping[str, Tensor], meta: Mapping, *,
                    overwrite: bool = False) -> Path:
    """Write ``tensors`` and the JSON-serialisable ``meta`` to ``path`` atomically; return the path.

    Raises FileExistsError if ``path`` exists and ``overwrite`` is False, ValueError if a floating tensor holds
    NaN/inf or ``meta`` is not plain JSON (no NaN, no objects).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(path)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    flat = _prepare_tensors(tensors)
    doc = {"format": FORMAT, "version": VERSION, "sha256": _digest(flat), **dict(meta)}
    try:
        header = json.dumps(doc, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be plain JSON (str/int/float/bool/None/list/dict, finite numbers): {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(flat, str(tmp), metadata={_META_KEY: header})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[Dict[str, Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: (tensors, meta). Raises CheckpointError if the file
    is missing, truncated, corrupted, or not a fastcm checkpoint."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"{path} is damaged ({e}); the previous checkpoint is still usable") from e
    if _digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"{path} is corrupted (tensor data does not match its SHA-256)")
    return tensors, meta


def read_checkpoint_meta(path: PathLike) -> dict:
    """The JSON document of a checkpoint (header only; the tensor data is not read or verified)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or a foreign file: "
                              f"{e})") from e
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a fastcm checkpoint (no '{_META_KEY}' "
                              "metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its fastcm metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta:
        raise CheckpointError(f"{path} is not a fastcm checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{path}: malformed fastcm metadata")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this fastcm reads {VERSION}")
    return meta


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> Tensor, got {type(tensors).__name__}")
    flat = {}
    for k, t in tensors.items():
        if not isinstance(k, str) or not isinstance(t, Tensor):
            raise TypeError(f"tensors must map str -> Tensor, got {k!r} -> {type(t).__name__}")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save non-finite values in {k!r} (NaN or inf)")
        # A private contiguous CPU copy: safetensors rejects shared storage (tied weights, views).
        flat[k] = t.detach().to("cpu", copy=True).contiguous()
    return flat


def _digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform/filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer state dicts without pickle: tensors go to safetensors, numbers and hyper-parameters to JSON.

def optimizer_to_flat(state_dict: Mapping, prefix: str = "optim/") -> Tuple[Dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``{prefix}{param}/{key}``) and a JSON document."""
    tensors, scalars = {}, {}
    for pid, st in state_dict["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}{pid}/{key}"] = v
            else:
                scalars.setdefault(str(pid), {})[key] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    for g in groups:
        bad = [k for k, v in g.items() if isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"optimizer param_group entries {bad} are tensors; use plain numbers for checkpoints")
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: Mapping[str, Tensor], doc: Mapping, prefix: str = "optim/") -> dict:
    """Rebuild the dict that ``optimizer.load_state_dict`` expects from :func:`optimizer_to_flat`'s output."""
    state: Dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[key] = t
    for pid, st in doc["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------------------

class CheckpointManager:
    """``ckpt_<step>.safetensors`` files in one directory: save with keep-last-k, find the newest usable one.

    Older checkpoints are deleted only after the new one is safely on disk, and :meth:`latest` skips a damaged
    newest file (with a warning) so the previous checkpoint is used.
    """

    _NAME = re.compile(r"^ckpt_(\d{8,})\.safetensors$")

    def __init__(self, directory: PathLike, keep_last: Optional[int] = 3):
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None (keep all), got {keep_last!r}")
        self.directory, self.keep_last = Path(directory), keep_last

    def path(self, step: int) -> Path:
        return self.directory / f"ckpt_{int(step):08d}.safetensors"

    def checkpoints(self) -> List[Tuple[int, Path]]:
        """(step, path) of every checkpoint file, oldest first (not verified)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._NAME.match(p.name))]
        return sorted(found)

    def save(self, step: int, tensors: Mapping[str, Tensor], meta: Mapping) -> Path:
        """Write the checkpoint of ``step`` (replacing a same-step file atomically), then prune to keep_last."""
        path = save_checkpoint(self.path(step), tensors, {**dict(meta), "step": int(step)}, overwrite=True)
        if self.keep_last is not None:
            for _, old in self.checkpoints()[:-self.keep_last]:
                if old != path:
                    old.unlink(missing_ok=True)
        return path

    def latest(self) -> Optional[Path]:
        """The newest checkpoint that reads back intact (full SHA-256 check), or None."""
        found = self.load_latest()
        return None if found is None else found[0]

    def load_latest(self, device: Union[str, torch.device] = "cpu"):
        """(path, tensors, meta) of the newest intact checkpoint, or None; damaged newer files are skipped with a
        RuntimeWarning."""
        for _, path in reversed(self.checkpoints()):
            try:
                tensors, meta = load_checkpoint(path, device)
            except CheckpointError as e:
                warnings.warn(f"skipping unusable checkpoint {path.name}: {e}", RuntimeWarning, stacklevel=2)
                continue
            return path, tensors, meta
        return None
