"""The checkpoint file format: tensors in one safetensors file, everything else as JSON in its header.

``<dir>/ckpt_<step>.safetensors``: the safetensors metadata holds one key, ``fastcm``, whose value is a JSON document
(format, version and whatever the caller stores: fastcm.train.checkpoint describes what a training checkpoint
holds), the SHA-256 of the tensor data (``sha256``) and the SHA-256 of the whole document except that field itself
(``header_sha256``, canonical JSON: sorted keys, no spaces). The safetensors' own header (names, dtypes, shapes) is
part of the tensor digest, so every byte that means something is covered: truncation, corruption and an edited
header (a forged step or learning rate) are all refused. Files written before ``header_sha256`` existed load with
a one-line note. Writes go through fastcm._io.atomic_write (a private temporary, fsync, then a link that never
replaces an existing checkpoint): a crash mid-write leaves the previous checkpoint untouched, a full disk or an
unwritable directory is one OSError naming the file. Non-finite floating tensors are never written, and a file that
fails its check is evidence: it is never overwritten or deleted. This module knows nothing of models or methods.
"""
import datetime
import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from fastcm._checks import check_int, note
from fastcm._io import atomic_write, check_input_file, remove_stale_temporaries

FORMAT = "fastcm-checkpoint"
VERSION = 1
_META_KEY = "fastcm"
HEADER_KEY = "header_sha256"  # the SHA-256 of the JSON document without this field
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
    doc = {**dict(meta), "format": FORMAT, "version": VERSION, "sha256": _digest(flat)}
    doc.pop(HEADER_KEY, None)
    try:
        doc[HEADER_KEY] = header_digest(doc)
        header = json.dumps(doc, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be plain JSON (str/int/float/bool/None/list/dict, finite numbers): {e}") from e
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata={_META_KEY: header}),
                        overwrite=overwrite)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[Dict[str, Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: (tensors, meta). Raises CheckpointError if the file
    is missing, truncated, corrupted, or not a fastcm checkpoint."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"{path} is damaged ({e}); the previous checkpoint is still usable") from e
    if _digest(tensors) != meta["sha256"]:  # names, dtypes, shapes and bytes
        raise CheckpointError(f"{path} is corrupted (tensor data does not match its SHA-256)")
    return tensors, meta


def read_checkpoint_meta(path: PathLike) -> dict:
    """The JSON document of a checkpoint (header only; the tensor data is not read or verified)."""
    from safetensors import safe_open

    try:
        path = check_input_file(path, "checkpoint", "a .safetensors file written by fastcm")
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e).splitlines()[0]) from None
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
    _check_header(path, meta)
    return meta


def header_digest(doc: Mapping) -> str:
    """The SHA-256 of a checkpoint's JSON document without its ``header_sha256`` field (canonical JSON)."""
    body = {k: v for k, v in doc.items() if k != HEADER_KEY}
    text = json.dumps(body, allow_nan=False, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _check_header(path: Path, meta: dict) -> None:
    """Refuse a header that does not match its checksum; note a file from before the checksum existed."""
    saved = meta.get(HEADER_KEY)
    if saved is None:
        note(f"{path} was written by an older fastcm without a header checksum: its tensors are verified, its "
             "header (step, configs, optimizer settings) is not", stacklevel=4)
        return
    try:
        ok = isinstance(saved, str) and header_digest(meta) == saved
    except (TypeError, ValueError):  # NaN/inf in the header: never written by save_checkpoint
        ok = False
    if not ok:
        raise CheckpointError(f"{path} is corrupted (its header does not match its SHA-256)")


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


# ----------------------------------------------------------------------------------------------------------------

class CheckpointManager:
    """``ckpt_<step>.safetensors`` files in one directory: save with keep-last-k, find the newest one.

    Older checkpoints are deleted only after the new one is safely on disk. An existing file is never replaced, and
    :meth:`load_latest` refuses a damaged newest file instead of skipping it (see :func:`set_aside_run`).
    """

    _NAME = re.compile(r"^ckpt_(\d{8,})\.safetensors$")
    _TMP = re.compile(r"^\.ckpt_\d{8,}\.safetensors\.tmp-(\d+)$")

    def __init__(self, directory: PathLike, keep_last: Optional[int] = 3):
        keep_last = None if keep_last is None else check_int("keep_last", keep_last)  # None keeps all
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
        """Write the checkpoint of ``step`` (FileExistsError if that file exists), then prune to keep_last."""
        try:
            path = save_checkpoint(self.path(step), tensors, {**dict(meta), "step": int(step)})
        except FileExistsError:  # two processes training in one run directory (two --resume at once)
            # errno set (no filename: the message names it), so callers that rewrap OSErrors keep the message
            raise FileExistsError(errno.EEXIST, f"{self.path(step)} already exists: another process is training in "
                                  f"{self.directory.parent} (stop it, or give this run another --out / out_dir); "
                                  "nothing was replaced") from None
        if self.keep_last is not None:
            for _, old in self.checkpoints()[:-self.keep_last]:
                if old != path:
                    old.unlink(missing_ok=True)
        return path

    def latest(self) -> Optional[Path]:
        """The newest checkpoint, verified (CheckpointError if it is damaged), or None."""
        found = self.load_latest()
        return None if found is None else found[0]

    def load_latest(self, device: Union[str, torch.device] = "cpu"):
        """(path, tensors, meta) of the newest checkpoint, or None when there is none. A damaged newest file raises
        CheckpointError naming it: it is neither skipped (a later save or prune would destroy it) nor touched."""
        found = self.checkpoints()
        if not found:
            return None
        path = found[-1][1]
        try:
            return (path, *load_checkpoint(path, device))
        except CheckpointError as e:
            older = f"; the previous one is {found[-2][1].name}" if len(found) > 1 else ""
            raise CheckpointError(f"cannot resume: {e}. The file is left untouched{older}. Move it aside to resume "
                                  "from an older checkpoint, or start over with restart=True (fastcm train "
                                  "--restart), which moves the whole previous run aside") from e

    def remove_stale_temporaries(self) -> List[Path]:
        """Delete the temporaries left by a killed process (one whose pid no longer runs): fastcm._io's private
        directories and the ``.ckpt_*.tmp-<pid>`` files of older versions."""
        removed = remove_stale_temporaries(self.directory)
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                m = self._TMP.match(p.name)
                if m and not _pid_alive(int(m.group(1))):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a temporary of this process outside save_checkpoint is a leftover of an older process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def set_aside_run(out_dir: Path, names=("checkpoints", "metrics.jsonl", "config.json", "samples")) -> Optional[Path]:
    """Move a previous run's files into ``out_dir/previous-<UTC time>/`` (nothing is deleted); return that folder,
    or None when there was nothing to move."""
    present = [out_dir / n for n in names if (out_dir / n).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest, i = out_dir / f"previous-{stamp}", 1
    while dest.exists():
        dest, i = out_dir / f"previous-{stamp}-{i}", i + 1
    dest.mkdir()
    for p in present:
        os.replace(p, dest / p.name)
    return dest
