"""Statistics files refuse what would make a Fréchet distance silently wrong: a flipped bit (SHA-256 of the
safetensors form; zip CRC of the .npz), fields of the wrong kind (bool/complex/integer moments, a sample count that
is empty, fractional or too small), statistics of another feature space, a non-finite distance, and archives that
declare more bytes than the bound, refused before anything is decompressed."""
import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch

from fastcm._checks import FastcmNote
from fastcm.fid import FeatureStats, PixelFeatures, fid, frechet_distance
from fastcm.fid.stats import MAX_STATS_BYTES

F64 = torch.float64


def _stats(d=6, n=40, seed=0, name="pixels"):
    g = torch.Generator().manual_seed(seed)
    return FeatureStats.from_features(torch.randn(n, d, generator=g, dtype=F64), name=name)


def _flip(path, value: float, bit: int):
    """Flip one bit of the first stored float64 equal to ``value``."""
    data = bytearray(path.read_bytes())
    i = data.find(struct.pack("<d", value))
    assert i >= 0
    data[i + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


# -- item 3: integrity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bit", [0, 62], ids=["mantissa", "exponent"])
def test_a_flipped_bit_in_a_safetensors_file_is_refused(tmp_path, bit):
    stats = _stats()
    path = stats.save(tmp_path / "s.safetensors")
    _flip(path, stats.mu[2].item(), bit)
    with pytest.raises(ValueError, match=r"s.safetensors: the file is corrupted.*SHA-256"):
        FeatureStats.load(path)
    with pytest.raises(ValueError, match="corrupted"):
        fid(path, stats)


def test_the_checksum_covers_the_metadata_and_the_npz_has_its_crc(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    path = _stats().save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(tmp_path / "relabelled.safetensors"), metadata={**meta, "features": "digits"})
    with pytest.raises(ValueError, match="corrupted"):
        FeatureStats.load(tmp_path / "relabelled.safetensors")
    stats = _stats()
    npz = stats.save(tmp_path / "s.npz")
    _flip(npz, stats.mu[2].item(), 0)
    with pytest.raises(ValueError, match="Bad CRC-32"):
        FeatureStats.load(npz)


def test_an_old_safetensors_file_without_a_checksum_loads_with_a_one_line_note(tmp_path):
    from safetensors.numpy import save_file

    stats = _stats()
    save_file({"mu": stats.mu.numpy(), "sigma": stats.sigma.numpy(), "n": np.array([40])},
              str(tmp_path / "old.safetensors"), metadata={"format": "fastcm.FeatureStats", "dim": "6",
                                                          "features": "pixels"})
    with pytest.warns(FastcmNote) as notes:
        loaded = FeatureStats.load(tmp_path / "old.safetensors")
    assert loaded.n == 40 and loaded.features == "pixels" and torch.equal(loaded.mu, stats.mu)
    (msg,) = [str(w.message) for w in notes]
    assert "no checksum" in msg and "old.safetensors" in msg and "\n" not in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file this fastcm wrote needs no note
        FeatureStats.load(stats.save(tmp_path / "new.safetensors"))


def test_fid_refuses_a_distance_that_is_not_finite_naming_the_statistics(tmp_path):
    huge = FeatureStats.from_moments(torch.full((6,), 1e200, dtype=F64), torch.eye(6, dtype=F64), n=10,
                                     features="pixels")
    path = huge.save(tmp_path / "huge.npz")
    with pytest.raises(ValueError) as e:
        fid(_stats(), path)
    msg = str(e.value)
    assert "not finite" in msg and "b ('" in msg and "huge.npz" in msg and "1e+200" in msg and "\n" not in msg
    assert "a:" not in msg  # only the culprit is named


# -- item 7: feature spaces ----------------------------------------------------------------------------------------

def test_fid_refuses_statistics_of_different_feature_spaces(tmp_path):
    pixels, digits = _stats(d=64, name="pixels"), _stats(d=64, seed=1, name="digits")
    with pytest.raises(ValueError, match="'pixels' statistics but b holds 'digits'"):
        fid(pixels, digits)
    path = digits.save(tmp_path / "digits.npz")
    images = torch.rand(30, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match=r"a holds 'pixels' statistics but b \('.*digits.npz'\) holds 'digits'"):
        fid(images, path, features=PixelFeatures())  # the extractor names its space
    unnamed = FeatureStats.from_moments(digits.mu, digits.sigma)  # pytorch-fid files name no space: compared
    expected = frechet_distance(pixels.mu, pixels.sigma, digits.mu, digits.sigma).item()
    assert fid(pixels, unnamed) == pytest.approx(expected, rel=1e-12)


# -- item 8: the kind of every field -------------------------------------------------------------------------------

def _write(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


MU, SIGMA = np.zeros(3), np.eye(3)


@pytest.mark.parametrize("arrays, match", [
    (dict(mu=MU, sigma=SIGMA, n=np.array([])), r"n must be one integer .*shape \(0,\)"),
    (dict(mu=MU, sigma=SIGMA, n=np.float64(2.7)), r"n must be one integer .*float64.*2\.7"),
    (dict(mu=MU, sigma=SIGMA, n=np.array([5, 6])), r"n must be one integer"),
    (dict(mu=MU, sigma=SIGMA, n=np.int64(1)), r"n must be the number of samples, an integer >= 2"),
    (dict(mu=MU, sigma=SIGMA, n=np.bool_(True)), r"n must be one integer .*bool"),
    (dict(mu=MU + 1j, sigma=SIGMA), r"mu must be a real floating-point array, got complex"),
    (dict(mu=MU.astype(bool), sigma=SIGMA), r"mu must be a real floating-point array, got bool"),
    (dict(mu=MU, sigma=SIGMA.astype(bool)), r"sigma must be a real floating-point array, got bool"),
    (dict(mu=MU.astype(np.int64), sigma=SIGMA), r"mu must be a real floating-point array, got integer"),
    (dict(mu=np.zeros((2, 2)), sigma=np.eye(4)), r"mu must be \(d,\) and sigma \(d, d\)"),
    (dict(mu=MU, sigma=SIGMA, features=np.array([1, 2])), r"features must be the feature space's name"),
])
def test_fields_of_the_wrong_kind_are_refused_in_one_line(tmp_path, arrays, match):
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match) as e:
        FeatureStats.load(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_safetensors_fields_are_checked_the_same_way(tmp_path):
    from safetensors.numpy import save_file

    for name, arrays, match in (("bool", {"mu": MU, "sigma": SIGMA.astype(bool)}, "sigma must be a real"),
                                ("count", {"mu": MU, "sigma": SIGMA, "n": np.array([2.7])}, "n must be one integer")):
        save_file(arrays, str(tmp_path / f"{name}.safetensors"))
        with pytest.warns(FastcmNote), pytest.raises(ValueError, match=match):
            FeatureStats.load(tmp_path / f"{name}.safetensors")
    assert FeatureStats.load(_write(tmp_path / "unknown.npz", mu=MU, sigma=SIGMA, n=np.int64(-1))).n is None


# -- item 14: bounded reading --------------------------------------------------------------------------------------

def _npy_header(shape, descr="<f8") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def test_a_statistics_archive_declaring_gigabytes_is_refused_before_decompressing(tmp_path, monkeypatch):
    """A tiny archive whose sigma.npy declares a 20,000-d covariance (3.2 GB): refused from the headers alone."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mu.npy", _npy_header((20000,)) + bytes(8 * 20000))
        z.writestr("sigma.npy", _npy_header((20000, 20000)) + bytes(1 << 20))  # the rest would follow
    assert path.stat().st_size < 100_000

    def never(*a, **k):
        raise AssertionError("an array was read before the size check")

    monkeypatch.setattr(np.lib.format, "read_array", never)
    with pytest.raises(ValueError, match=r"bomb.npz: its arrays declare 3,200,160,000 bytes \(d = 20,000\), above "
                                         r"the bound of 536,870,912 bytes; pass max_bytes"):
        FeatureStats.load(path)


def test_the_bound_is_documented_and_the_caller_can_raise_it(tmp_path):
    assert MAX_STATS_BYTES == 512 * 2 ** 20  # = a 8192-d covariance in float64
    stats = _stats(d=64, n=100)
    for suffix in (".npz", ".safetensors"):
        path = stats.save(tmp_path / f"s{suffix}")
        with pytest.raises(ValueError, match="above the bound of 20,000 bytes"):
            FeatureStats.load(path, max_bytes=20_000)  # 64 * 65 * 8 + 8 = 33,288 bytes declared
        assert FeatureStats.load(path, max_bytes=40_000).dim == 64
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 1"):
        FeatureStats.load(path, max_bytes=0)


def test_only_the_statistics_members_are_read(tmp_path, monkeypatch):
    """An extra member (a decompression bomb riding along) is never decompressed."""
    path = _write(tmp_path / "extra.npz", mu=MU, sigma=SIGMA, junk=np.zeros(10))
    real = np.lib.format.read_array
    read = []
    monkeypatch.setattr(np.lib.format, "read_array", lambda f, **k: read.append(f.name) or real(f, **k))
    FeatureStats.load(path)
    assert sorted(read) == ["mu.npy", "sigma.npy"]
