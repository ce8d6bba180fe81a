"""Atomic file writes: the one way fastcm puts a file on disk (statistics, reports, samples, grids, the cached
digits network, checkpoints).

    atomic_write(path, write, overwrite=...)    ``write(tmp)`` fills a temporary file; it is fsync'ed and renamed
                                                onto ``path``, so a reader finds the old file or the new one, whole
    write_error(err, path)                      any write failure (OSError, safetensors' SafetensorError) as one
                                                OSError naming ``path``, with its errno (ENOSPC, EACCES, EROFS …)
    remove_stale_temporaries(directory)         temporaries left behind by killed processes
    check_input_file(path, what)                a file to read: one line when it is missing, a directory or not a
                                                regular file (a FIFO would block the reader)

Where the temporary lives. Each write makes a fresh private directory ``.<name>.tmp-<pid>-<random>`` beside the
target with ``tempfile.mkdtemp``: mkdir(2) is exclusive and never follows a symlink, the name cannot be guessed and
the directory is owner-only (0700), so in a shared (1777) directory nobody can plant a link where the writer opens
its file. That holds for writers that take a file name (safetensors, numpy, pillow, matplotlib) as well as for
file objects. The file is then given the mode the umask allows (safetensors creates 0600 files), fsync'ed, and
renamed onto the target: rename(2) replaces a symlink at the target itself, never the file it points to. Without
``overwrite`` the file is linked into place instead (link(2) fails when the name exists), so a file another process
created meanwhile is never replaced. The private directory is removed in every case; one left by a killed process
is removed by the next write of the same name (or by :func:`remove_stale_temporaries`).
"""
import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Union

PathLike = Union[str, os.PathLike]
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_OS_ERROR_CODE = re.compile(r"os error (\d+)")


def atomic_write(path: PathLike, write: Callable[[Path], None], *, overwrite: bool = True,
                 fsync: bool = True) -> Path:
    """Write ``path`` through ``write(tmp)``, which must create the file ``tmp`` (a path in a private directory,
    ending in ``path``'s own name, so suffix-sniffing writers pick the right format). Returns ``path``.

    ``overwrite=False`` refuses (FileExistsError) a ``path`` that exists when the new file is ready. Any failure to
    write (a full disk, no permission, a read-only file system) raises one OSError naming ``path`` (see
    :func:`write_error`) and leaves whatever was at ``path`` untouched; no temporary stays behind.
    """
    path = Path(path)
    parent = path.parent
    prefix = f".{path.name}.tmp-{os.getpid()}-"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, path.name)
        private = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise write_error(e, path, parent / prefix) from e
    try:
        tmp = private / path.name
        write(tmp)
        _finish(tmp, fsync)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        if fsync:
            fsync_dir(parent)
    except FileExistsError:
        raise
    except Exception as e:
        mapped = write_error(e, path, private)
        if mapped is e:
            raise
        raise mapped from e
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return path


def write_error(err: BaseException, path: PathLike, private: Optional[PathLike] = None):
    """``err`` (raised while writing ``path``) as an OSError naming ``path``: OSError keeps its errno and message
    (and its own file name, unless that is a temporary inside ``private``); safetensors' SafetensorError (not an
    OSError) is read for its "os error N". Other errors (a bug, a bad argument) are returned unchanged."""
    path = os.fspath(path)
    if isinstance(err, OSError):
        if err.errno is None:
            return err
        name = err.filename
        if name is None or (private is not None and os.fspath(name).startswith(os.fspath(private))):
            name = path
        return OSError(err.errno, err.strerror or str(err), name)  # the matching subclass (PermissionError …)
    if type(err).__name__ == "SafetensorError":
        m = _OS_ERROR_CODE.search(str(err))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code), path)
        return OSError(errno.EIO, f"cannot write the file ({str(err).splitlines()[0]})", path)
    return err


def _finish(tmp: Path, fsync: bool) -> None:
    """Give the new file the umask's mode and flush it to disk (O_NOFOLLOW: the writer must have made a file)."""
    if not tmp.is_file() or tmp.is_symlink():
        raise RuntimeError(f"the writer did not create the file {tmp.name}")
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fchmod(fd, 0o666 & ~umask())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if ``path`` does not exist (atomically where hard links work)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise FileExistsError(f"{path} exists (created while this file was being written); nothing was replaced") \
            from None
    except OSError as e:  # no hard links on this file system (FAT, some network mounts): check, then rename
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists (created while this file was being written); nothing was replaced")
    os.replace(tmp, path)


def fsync_dir(directory: PathLike) -> None:
    """fsync a directory so a rename in it survives a crash (a no-op where the platform cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by a set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(directory: PathLike, name: Optional[str] = None) -> List[Path]:
    """Remove the private temporary directories of :func:`atomic_write` in ``directory`` (for target ``name``
    only, when given) whose process no longer runs; only directories this user owns, never following links."""
    directory, removed = Path(directory), []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        if entry.is_dir(follow_symlinks=False) and mine and not pid_alive(int(m.group("pid"))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def check_input_file(path: PathLike, what: str = "file", expected: str = "a file") -> Path:
    """``path`` as a Path when it is an existing regular file; else FileNotFoundError / IsADirectoryError /
    ValueError (a FIFO, socket or device) / OSError (no permission …), each one line naming ``what``, the path and
    what was ``expected``."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (expected {expected})") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot open the {what} ({e.strerror})", str(path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory; expected {expected}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {str(path)!r} is not a regular file (a FIFO, socket or device); expected {expected}")
    return path
