"""fastcm._io.atomic_write, the one writer of every file fastcm saves: temporaries no one can redirect (a planted
symlink at the old predictable name is never followed), write failures (a full disk) as one OSError naming the
target with the previous file left whole, no temporaries left behind. The full-disk case runs on a real 5 MB tmpfs
when this machine lets the test mount one (root), and with an injected ENOSPC everywhere."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcm._io import atomic_write, check_input_file, remove_stale_temporaries, write_error
from fastcm.data import save_grid
from fastcm.eval.report import save_samples_npz, write_json, write_text
from fastcm.fid import FeatureStats


def _stats(d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FeatureStats.from_features(torch.randn(20, d, generator=g, dtype=torch.float64), name="pixels")


def _digits_net_save(path: Path):
    from fastcm.fid.digits_net import SmallCNN, _atomic_save

    _atomic_save(SmallCNN(), path, path.with_suffix(".json"), {"key": "k"})


# name -> (writer of a file at path, reader proving the file is whole). Every file writer of fastcm outside train/.
WRITERS = {
    "stats.npz": (lambda p: _stats().save(p, overwrite=True), lambda p: FeatureStats.load(p).dim == 4),
    "stats.safetensors": (lambda p: _stats().save(p, overwrite=True), lambda p: FeatureStats.load(p).dim == 4),
    "report.json": (lambda p: write_json(p, {"a": 1}), lambda p: json.loads(p.read_text()) == {"a": 1}),
    "report.md": (lambda p: write_text(p, "# r\n"), lambda p: p.read_text() == "# r\n"),
    "samples.npz": (lambda p: save_samples_npz(p, torch.zeros(2, 1, 4, 4), torch.arange(2)),
                    lambda p: np.load(p)["x"].shape == (2, 1, 4, 4)),
    "grid.png": (lambda p: save_grid(torch.zeros(4, 1, 4, 4), p, overwrite=True),
                 lambda p: p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"),
    "net.safetensors": (_digits_net_save, lambda p: p.stat().st_size > 1000 and p.with_suffix(".json").is_file()),
}


def _leftovers(directory: Path):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_planted_symlink_at_the_old_temporary_name_is_not_followed(tmp_path, name):
    """The old writers used `.<name>.tmp-<pid>` (and `<name>.tmp<pid>`): a link planted there in a shared directory
    made them overwrite the link's target. The victim must stay untouched and the target be a regular file."""
    write, ok = WRITERS[name]
    victim = tmp_path / "victim"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / name
    pid = os.getpid()
    for planted in (f".{name}.tmp-{pid}", f"{name}.tmp{pid}", ".net.json.tmp-" + str(pid), f"net.json.tmp{pid}"):
        (shared / planted).symlink_to(victim)
    write(target)
    assert victim.read_text() == "precious"
    assert target.is_file() and not target.is_symlink() and ok(target)
    assert all((shared / p).is_symlink() for p in os.listdir(shared) if ".tmp" in p)  # the links, nothing new


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "r.json").symlink_to(victim)
    write_json(tmp_path / "r.json", {"a": 1})
    assert victim.read_text() == "precious" and not (tmp_path / "r.json").is_symlink()


def test_new_files_get_the_umask_mode_and_no_overwrite_is_atomic(tmp_path):
    old = os.umask(0o027)
    try:
        _stats().save(tmp_path / "s.safetensors")  # safetensors alone creates 0600 files
    finally:
        os.umask(old)
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o640

    def late_rival(tmp):  # another process creates the target while this one writes
        tmp.write_text("mine")
        (tmp_path / "x.txt").write_text("theirs")

    with pytest.raises(FileExistsError, match="nothing was replaced"):
        atomic_write(tmp_path / "x.txt", late_rival, overwrite=False)
    assert (tmp_path / "x.txt").read_text() == "theirs" and not _leftovers(tmp_path)


def _enospc_library_errors():
    from safetensors import SafetensorError

    return [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # numpy, pillow, json/text writers
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]


@pytest.mark.parametrize("make_error", range(2), ids=["OSError", "SafetensorError"])
def test_injected_enospc_is_one_oserror_naming_the_target(tmp_path, make_error):
    (tmp_path / "s.json").write_text("previous")
    err = _enospc_library_errors()[make_error]

    def half_written(tmp):
        tmp.write_bytes(b"half")
        raise err

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "s.json", half_written)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "s.json")
    assert "\n" not in str(e.value) and "No space left" in str(e.value)
    assert (tmp_path / "s.json").read_text() == "previous" and not _leftovers(tmp_path)
    bug = KeyError("k")
    assert write_error(bug, "x") is bug  # not a write failure: left for its traceback


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_injected_enospc_in_every_writer(tmp_path, monkeypatch, name):
    """ENOSPC as the kernel reports it at fsync (delayed allocation, network file systems) for every writer."""
    write, ok = WRITERS[name]
    target = tmp_path / name
    write(target)
    before = target.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as e:
        write(target)
    assert e.value.errno == errno.ENOSPC and Path(e.value.filename).name == name
    monkeypatch.undo()
    assert target.read_bytes() == before and ok(target) and not _leftovers(tmp_path)


@pytest.fixture
def full_tmpfs(tmp_path):
    """A real 5 MB tmpfs, filled up to its last 64 KiB (skipped where this process may not mount one)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _fill(mnt: Path, leave: int = 64 * 1024):
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_full_file_system_keeps_the_previous_file(full_tmpfs, suffix):
    target = full_tmpfs / f"s{suffix}"
    _stats().save(target)
    before = target.read_bytes()
    _fill(full_tmpfs)
    with pytest.raises(OSError) as e:
        _stats(d=200, seed=1).save(target, overwrite=True)  # a 320 KB covariance into 64 KiB
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target) and "\n" not in str(e.value)
    assert target.read_bytes() == before and FeatureStats.load(target).dim == 4 and not _leftovers(full_tmpfs)


def test_a_full_file_system_through_the_command_line(full_tmpfs):
    """`fastcm stats` onto a full disk: one line, exit status 2, no traceback, nothing left behind."""
    _fill(full_tmpfs, leave=8 * 1024)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "fastcm.cli", "stats", "digits:test", "--features", "pixels",
                           "--out", str(full_tmpfs / "s.npz")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
    assert "s.npz" in lines[0] and not (full_tmpfs / "s.npz").exists() and not _leftovers(full_tmpfs)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".r.json.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "r.json").write_text("half")
    alive = tmp_path / f".r.json.tmp-{os.getpid()}-xyz789"  # this process: maybe a write in flight
    alive.mkdir()
    write_json(tmp_path / "r.json", {"a": 1})  # a write of the same name cleans up first
    assert not stale.exists() and alive.exists()
    assert remove_stale_temporaries(tmp_path) == []


def test_input_files_that_are_not_regular_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="statistics file '.*missing.npz' does not exist"):
        FeatureStats.load(tmp_path / "missing.npz")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory; expected a .npz or"):
        FeatureStats.load(tmp_path / "dir.npz")
    os.mkfifo(tmp_path / "fifo.npz")  # opening it to read would block for ever
    with pytest.raises(ValueError, match="not a regular file"):
        FeatureStats.load(tmp_path / "fifo.npz")
    with pytest.raises(ValueError, match="npz dataset .* not a regular file"):
        from fastcm.data import load_npz

        load_npz(tmp_path / "fifo.npz")
    assert check_input_file(_stats().save(tmp_path / "s.npz"), "x").is_file()
