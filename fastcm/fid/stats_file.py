"""Statistics files, the reader and writer behind FeatureStats.save / FeatureStats.load.

Two forms of one content: ``mu`` (d,) and ``sigma`` (d, d) in fp64, ``n`` the sample count (-1 when unknown) and
the name of the feature space (``features``: "digits", "pixels", "inception" …).

    .npz           pytorch-fid's layout (zip members mu.npy, sigma.npy; fastcm adds n.npy and features.npy); the zip
                   CRC-32 of every member detects a damaged file
    .safetensors   tensors mu, sigma, n; metadata format, dim, features and sha256, the SHA-256 of the metadata and
                   the tensors, so one flipped bit anywhere is refused. A file written before the checksum existed
                   loads with a one-line note (a FastcmNote warning).

Reading is bounded and typed. Before any array is decompressed, its declared size (zip member header, .npy array
header, safetensors header) must fit ``max_bytes`` (default MAX_STATS_BYTES = 512 MiB: a 8192-d covariance in fp64;
the caller may raise it), and only the four members above are read, so a small archive cannot unpack to gigabytes.
mu and sigma must be real floating-point arrays (bool, integer and complex arrays are refused, never cast), n one
integer (>= 2, or -1), features a string; each mistake is one ValueError naming the file and the field.
"""
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from fastcm._checks import check_int, note
from fastcm._io import atomic_write, check_input_file

MAX_STATS_BYTES = 512 * 2 ** 20
SUFFIXES = (".npz", ".safetensors")
FORMAT = "fastcm.FeatureStats"
_FIELDS = ("mu", "sigma", "n", "features")
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1}


def check_suffix(path) -> Path:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"statistics files must end in {' or '.join(SUFFIXES)}, got {path.name!r}")
    return path


def write_stats(path, mu: np.ndarray, sigma: np.ndarray, n: Optional[int], features: Optional[str], *,
                overwrite: bool = False) -> Path:
    """Write one statistics file atomically (fastcm._io.atomic_write); FileExistsError unless ``overwrite``."""
    path = check_suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    mu, sigma = np.ascontiguousarray(mu, np.float64), np.ascontiguousarray(sigma, np.float64)
    count = -1 if n is None else int(n)
    if path.suffix == ".npz":
        extra = {} if features is None else {"features": np.array(features)}

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to some names
                np.savez(f, mu=mu, sigma=sigma, n=np.int64(count), **extra)
    else:
        from safetensors.numpy import save_file

        arrays = {"mu": mu, "sigma": sigma, "n": np.array([count], dtype=np.int64)}
        meta = {"format": FORMAT, "dim": str(mu.shape[0]), "features": features or ""}
        meta["sha256"] = _digest(arrays, meta)

        def write(tmp):
            save_file(arrays, str(tmp), metadata=meta)
    return atomic_write(path, write, overwrite=overwrite)


def read_stats(path, max_bytes: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, Optional[int], Optional[str]]:
    """(mu, sigma, n or None, features or None) of a statistics file, every field checked (module docstring)."""
    path = check_input_file(check_suffix(path), "statistics file", "a .npz or .safetensors file of mu and sigma")
    limit = MAX_STATS_BYTES if max_bytes is None else max_bytes
    limit = check_int("max_bytes", limit)
    try:
        arrays, features, unverified = (_read_npz if path.suffix == ".npz" else _read_safetensors)(path, limit)
    except _Refused as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # zip, .npy header and safetensors errors all mean "not a statistics file"
        raise ValueError(f"{path} is not a readable {path.suffix} file ({type(e).__name__}: {e})") from e
    if unverified:
        note(f"{path} has no checksum (written by fastcm before statistics files carried one); its values cannot "
             "be verified: rewrite it with FeatureStats.save to add one")
    mu, sigma = (_real_array(path, k, arrays[k]) for k in ("mu", "sigma"))
    n = _count(path, arrays["n"]) if "n" in arrays else None
    return mu, sigma, n, features


class _Refused(ValueError):
    """A readable file whose content breaks the rules (message without the path, which read_stats adds)."""


def _check_layout(shapes: Dict[str, tuple], nbytes: Dict[str, int], limit: int, found) -> None:
    missing = {"mu", "sigma"} - set(shapes)
    if missing:
        raise _Refused(f"not a statistics file: missing {sorted(missing)}, found {sorted(found)}")
    mu, sigma = shapes["mu"], shapes["sigma"]
    if len(mu) != 1 or mu[0] == 0 or sigma != (mu[0], mu[0]):
        raise _Refused(f"mu must be (d,) and sigma (d, d), got {mu} and {sigma}")
    total = sum(nbytes.values())
    if total > limit:
        raise _Refused(f"its arrays declare {total:,} bytes (d = {mu[0]:,}), above the bound of {limit:,} bytes; "
                       "pass max_bytes=<larger> to FeatureStats.load if the file is trusted")


def _read_npz(path: Path, limit: int):
    with zipfile.ZipFile(path) as z:
        members = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")}
        wanted = [k for k in _FIELDS if k in members]
        shapes, nbytes = {}, {}
        for k in wanted:
            if members[k].file_size > limit:
                raise _Refused(f"member {k}.npy unpacks to {members[k].file_size:,} bytes, above the bound of "
                               f"{limit:,} bytes; pass max_bytes=<larger> to FeatureStats.load if the file is trusted")
            with z.open(members[k]) as f:
                shapes[k], dtype = _npy_header(f, k)
            nbytes[k] = math.prod(shapes[k]) * dtype.itemsize
        _check_layout(shapes, nbytes, limit, members)
        arrays = {}
        for k in wanted:
            with z.open(members[k]) as f:
                arrays[k] = np.lib.format.read_array(f, allow_pickle=False)
                if f.read(1):  # reading to the end also makes zipfile check the member's CRC-32
                    raise _Refused(f"member {k}.npy holds data past its array")
    features = _name(arrays.pop("features")) if "features" in arrays else None
    return arrays, features, False  # the zip CRC-32 of each member was checked


def _npy_header(f, name: str):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise _Refused(f"member {name}.npy has .npy format version {version}, expected 1.0 or 2.0")
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise _Refused(f"{name} is an object array (pickled Python objects are not accepted)")
    return tuple(int(s) for s in shape), dtype


def _read_safetensors(path: Path, limit: int):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        found = set(f.keys())
        wanted = [k for k in ("mu", "sigma", "n") if k in found]
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in wanted}
        nbytes = {k: math.prod(shapes[k]) * _ST_ITEMSIZE.get(f.get_slice(k).get_dtype(), 8) for k in wanted}
        _check_layout(shapes, nbytes, limit, found)
        arrays = {k: f.get_tensor(k) for k in wanted}
    if "sha256" in meta and _digest(arrays, meta) != meta["sha256"]:
        raise _Refused("the file is corrupted: its statistics do not match the SHA-256 stored in it")
    return arrays, meta.get("features") or None, "sha256" not in meta


def _digest(arrays: Dict[str, np.ndarray], meta: Dict[str, str]) -> str:
    """SHA-256 of the metadata (all but the checksum itself) and of each array's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"|{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _real_array(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind != "f":
        kind = {"b": "bool", "c": "complex", "i": "integer", "u": "integer"}.get(a.dtype.kind, "non-numeric")
        raise ValueError(f"{path}: {name} must be a real floating-point array, got {kind} dtype {a.dtype} (a "
                         "statistics file stores float64 moments; nothing is cast)")
    return a


def _count(path: Path, a: np.ndarray) -> Optional[int]:
    if a.dtype.kind not in "iu" or a.size != 1:
        raise ValueError(f"{path}: n must be one integer (the sample count, or -1 when unknown), got "
                         f"{a.dtype} of shape {a.shape}" + (f" = {a.reshape(-1)[0]!r}" if a.size == 1 else ""))
    n = int(a.reshape(-1)[0])
    if n == -1:
        return None
    if n < 2:
        raise ValueError(f"{path}: n must be the number of samples, an integer >= 2 (or -1 when unknown), got {n}")
    return n


def _name(a: np.ndarray) -> Optional[str]:
    if a.dtype.kind != "U" or a.ndim != 0 or len(str(a)) > 200:
        raise _Refused(f"features must be the feature space's name (a string), got {a.dtype} of shape {a.shape}")
    return str(a) or None


def is_stats_file(path) -> bool:
    """True when ``path`` is an existing .npz / .safetensors file holding ``mu`` and ``sigma`` (an .npz of images
    holds ``x`` instead)."""
    path = Path(os.fspath(path))
    if path.suffix not in SUFFIXES or not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return {"mu.npy", "sigma.npy"} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):  # not a zip archive: read_stats says what is wrong with it
        return False
