"""fastcm.data: every loader against an independent reading of the same files (numpy, pillow, scikit-learn)."""
import pickle
import warnings

import numpy as np
import pytest
import torch

from fastcm.data import (ArrayDataset, BatchLoader, load_cifar10, load_dataset, load_digits, load_image_folder,
                         load_npz, make_grid, save_grid)


# --------------------------------------------------------------------------------------------------------------
# digits

def test_digits_split_matches_sklearn():
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    b = sk_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(b.images, b.target, test_size=0.25, stratify=b.target, random_state=0)
    train, test, full = load_digits("train"), load_digits("test"), load_digits("all")
    assert (len(train), len(test), len(full)) == (1347, 450, 1797)
    assert train.image_shape == (1, 8, 8) and train.num_classes == 10
    x, y = train.get_batch(torch.arange(len(train)))
    torch.testing.assert_close(x[:, 0].double(), torch.from_numpy(x_tr) / 8 - 1, rtol=0, atol=1e-6)
    assert torch.equal(y, torch.from_numpy(y_tr))
    assert torch.equal(test.labels, torch.from_numpy(y_te))
    assert x.min() == -1 and x.max() == 1 and x.dtype == torch.float32
    # stratified: every class keeps ~25 % in test
    assert np.all(np.abs(np.bincount(y_te) - np.bincount(b.target) * 0.25) <= 1)
    with pytest.raises(ValueError, match="split"):
        load_digits("valid")


# --------------------------------------------------------------------------------------------------------------
# .npz and ArrayDataset

def test_npz_layouts_and_scaling(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(5, 5, 6, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "a.npz", x=nhwc, y=y)
    ds = load_npz(tmp_path / "a.npz")
    x, labels = ds.get_batch(torch.arange(5))
    expect = nhwc.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1
    torch.testing.assert_close(x.double(), torch.from_numpy(expect), rtol=0, atol=1e-6)
    assert ds.num_classes == 3 and torch.equal(labels, torch.from_numpy(y))
    grey = rng.uniform(-1, 1, size=(3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "g.npz", x=grey)
    g = load_npz(tmp_path / "g.npz")
    assert g.image_shape == (1, 8, 8) and g.num_classes is None and g.labels is None
    assert torch.equal(g.get_batch(torch.tensor([2]))[0][0, 0], torch.from_numpy(grey[2]))
    assert g[1][1].item() == -1  # unlabelled item


@pytest.mark.parametrize("arrays, match", [
    (dict(y=np.zeros(3)), "array named 'x'"),
    (dict(x=np.full((3, 1, 4, 4), 2.0)), r"\[-1, 1\]"),
    (dict(x=np.zeros((3, 5, 4, 2))), "shape"),
    (dict(x=np.zeros((3, 1, 4, 4)), y=np.array([0, 1])), "labels must have shape"),
    (dict(x=np.zeros((3, 1, 4, 4)), y=np.array([0, -1, 1])), r"labels must lie in"),
    (dict(x=np.zeros((3, 1, 4, 4)), y=np.array([0.5, 1, 1])), "integers"),
    (dict(x=np.array([None, 1, 2], dtype=object)), "object arrays"),
])
def test_npz_malformed(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises((ValueError, TypeError), match=match):
        load_npz(tmp_path / "bad.npz")


def test_npz_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a .npz"):
        load_npz(tmp_path / "nope.npz")
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 1, 4, 4), np.uint8))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(tmp_path / "cut.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    with pytest.raises(ValueError, match="not a .npz file"):
        load_npz(tmp_path / "plain.npz")


def test_array_dataset_validation():
    with pytest.raises(ValueError, match="NaN"):
        ArrayDataset(torch.full((2, 1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="no labels"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), num_classes=3)
    with pytest.raises(TypeError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="numpy array"):
        ArrayDataset([[0.0]])


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches (fake, in the real format: a dict with bytes keys, data uint8 (N, 3072), labels list)

def _write_cifar(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    expect = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        expect[name] = (data, labels)
    return expect


def test_cifar10_reads_batches(tmp_path):
    expect = _write_cifar(tmp_path / "cifar-10-batches-py")
    train = load_cifar10(tmp_path)  # the parent directory works too
    test = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", split="test")
    data = np.concatenate([expect[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert len(train) == 30 and len(test) == 6 and train.image_shape == (3, 32, 32) and train.num_classes == 10
    assert torch.equal(train.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == sum((expect[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # channel-major layout: the first 1024 bytes of a row are the red plane
    assert torch.equal(test.images[0, 0].flatten(), torch.from_numpy(expect["test_batch"][0][0, :1024]))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/fastcm_pwned_by_pickle",))


def test_cifar10_refuses_foreign_pickles(tmp_path):
    import os
    root = tmp_path / "c"
    _write_cifar(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle posix.system"):
        load_cifar10(root)
    assert not os.path.exists("/tmp/fastcm_pwned_by_pickle")
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        load_cifar10(root)
    (root / "data_batch_3").write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_cifar10(root)
    (root / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="missing test_batch"):
        load_cifar10(root, "test")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path / "absent")


# --------------------------------------------------------------------------------------------------------------
# image folders

def _write_folder(root, size=(6, 5)):
    from PIL import Image

    rng = np.random.default_rng(1)
    arrays = {}
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.png")
            arrays[(c, i)] = a
    Image.fromarray(arrays[("dog", 0)]).save(root / "dog" / "3.JPG", quality=95)
    return arrays


def test_image_folder(tmp_path):
    from PIL import Image

    arrays = _write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path / "imgs")
    assert len(ds) == 7 and ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and ds.image_shape == (3, 5, 6)
    assert torch.equal(ds.images[4], torch.from_numpy(arrays[("dog", 1)].transpose(2, 0, 1)))  # PNG is lossless
    jpeg = np.array(Image.open(tmp_path / "imgs" / "dog" / "3.JPG").convert("RGB"))  # files sort by name
    assert torch.equal(ds.images[6], torch.from_numpy(jpeg.transpose(2, 0, 1)))
    # resize: centre crop 6x5 -> 5x5 (columns 0..4), Lanczos to 4x4, grey
    small = load_image_folder(tmp_path / "imgs", resolution=4, channels=1)
    ref = Image.fromarray(arrays[("cat", 0)]).convert("L").crop((0, 0, 5, 5)).resize((4, 4), Image.Resampling.LANCZOS)
    assert small.image_shape == (1, 4, 4) and torch.equal(small.images[0, 0], torch.from_numpy(np.array(ref)))


def test_image_folder_errors(tmp_path):
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="one subfolder per class"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg"):
        load_image_folder(tmp_path / "empty")
    root = tmp_path / "mixed"
    _write_folder(root)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "cat" / "big.png")
    with pytest.raises(ValueError, match="different sizes.*resolution"):
        load_image_folder(root)
    (root / "cat" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match="cannot read image .*big.png"):
        load_image_folder(root)
    (root / "cat" / "big.png").unlink()
    (root / "bird").mkdir()
    with pytest.raises(ValueError, match="without .png/.jpg/.jpeg images: bird"):
        load_image_folder(root)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(flat / "a.png")
    assert load_image_folder(flat, channels=1).num_classes is None


def test_load_dataset_specs(tmp_path):
    assert len(load_dataset("digits", split="test")) == 450
    assert len(load_dataset("digits:test")) == 450 and len(load_dataset("digits:all", split="test")) == 1797
    assert len(load_dataset("digits:train", split="test")) == 1347  # the string's own split wins
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 4, 4), np.uint8))
    assert len(load_dataset(str(tmp_path / "d.npz"))) == 2
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="val")


def test_one_grammar_parses_every_form():
    from fastcm.data import FORMS, DatasetSpec, parse_dataset

    assert parse_dataset("digits") == DatasetSpec("digits", None, None)
    assert parse_dataset("digits:test") == DatasetSpec("digits", None, "test")
    assert parse_dataset("cifar10:/data/c") == DatasetSpec("cifar10", "/data/c", None)
    assert parse_dataset("cifar10:/data/c:test") == DatasetSpec("cifar10", "/data/c", "test")
    assert parse_dataset("cifar10:/data/c:x") == DatasetSpec("cifar10", "/data/c:x", None)  # ':x' is no split
    assert parse_dataset("folder:imgs") == DatasetSpec("folder", "imgs", None)
    assert parse_dataset("a/b.NPZ") == DatasetSpec("npz", "a/b.NPZ", None)
    for bad in ("digits:val", "cifar10:", "folder:", "x.npy", "imgs", ""):
        with pytest.raises(ValueError) as e:
            parse_dataset(bad)
        assert str(e.value) == f"unknown dataset {bad!r}: expected one of {FORMS}"
    with pytest.raises(TypeError, match="a dataset must be a string"):
        parse_dataset(3)


def test_train_test_datasets_hold_out_a_stratified_share(tmp_path):
    from fastcm.data import train_test_datasets

    train, test, how = train_test_datasets("digits")
    assert (len(train), len(test)) == (1347, 450) and "test split" in how
    train, test, how = train_test_datasets("digits:test")
    assert len(train) + len(test) == 450 and "25% hold-out" in how
    for c in range(10):  # every class is split about 3:1
        n_c = int((load_digits("test").labels == c).sum())
        assert int((test.labels == c).sum()) == round(0.25 * n_c)
    assert torch.equal(train_test_datasets("digits:test")[1].images, test.images)  # seeded: the same split again
    np.savez(tmp_path / "u.npz", x=np.zeros((8, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no class labels"):
        train_test_datasets(str(tmp_path / "u.npz"))


def test_image_folder_channels_follow_the_files_when_not_given(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "a" / "0.png")
    assert load_dataset(f"folder:{tmp_path}").image_shape == (1, 4, 4)
    assert load_image_folder(tmp_path).image_shape == (3, 4, 4)  # the loader's own default stays RGB


# --------------------------------------------------------------------------------------------------------------
# batches

def _toy(n=40, labelled=True):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 3) / n
    x = x + torch.tensor([0.0, 0.001, 0.002]).view(1, 1, 1, 3)  # asymmetric rows, so flips are visible
    return ArrayDataset(x.contiguous(), torch.arange(n) % 4 if labelled else None)


def test_batches_cover_epochs_and_ranks():
    ds = _toy(41)
    loaders = [BatchLoader(ds, 5, seed=3, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].steps_per_epoch == 4  # 20 per rank, 4 batches of 5
    for epoch in range(2):
        seen = torch.cat([ld.indices(epoch * 4 + b) for ld in loaders for b in range(4)])
        assert len(seen) == 40 and len(set(seen.tolist())) == 40  # disjoint across ranks, nothing repeated
    assert not torch.equal(loaders[0].indices(0), loaders[0].indices(4))  # reshuffled each epoch
    x, y = loaders[1].batch(6)
    idx = loaders[1].indices(6)
    assert torch.equal(y, idx % 4) and torch.equal(x, ds.get_batch(idx)[0])


def test_batches_resume_flips_and_generic_dataset():
    ds = _toy()
    loader = BatchLoader(ds, 8, seed=1, hflip=True)
    it = loader.iterate(0)
    first = [next(it) for _ in range(12)]
    it7 = BatchLoader(ds, 8, seed=1, hflip=True).iterate(7)  # a fresh loader resumed at step 7
    for s in range(7, 12):
        xa, ya = next(it7)
        assert torch.equal(xa, first[s][0]) and torch.equal(ya, first[s][1])
    x, _ = first[0]
    plain = ds.get_batch(loader.indices(0))[0]
    flipped = (x == plain.flip(-1)).flatten(1).all(1)
    same = (x == plain).flatten(1).all(1)
    assert torch.all(flipped ^ same)  # each image either untouched or mirrored
    nflip = sum(int(((b[0] == ds.get_batch(loader.indices(s))[0].flip(-1)).flatten(1).all(1)).sum())
                for s, b in enumerate(first))
    assert 0.3 < nflip / 96 < 0.7

    class Plain(torch.utils.data.Dataset):  # no get_batch: the per-item path and worker processes
        num_classes = 4

        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    for workers in (0, 1):
        it2 = BatchLoader(Plain(), 8, seed=1, hflip=True, num_workers=workers).iterate(3)
        for s in range(3, 8):  # crosses the epoch boundary at step 5
            xb, yb = next(it2)
            assert torch.equal(xb, first[s][0]) and torch.equal(yb, first[s][1])


def test_batches_validation():
    with pytest.raises(ValueError, match="too small"):
        BatchLoader(_toy(10), 8, world_size=2)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        BatchLoader(_toy(10), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(_toy(10), 0)
    assert BatchLoader(_toy(10, labelled=False), 2).batch(0)[1] is None


# --------------------------------------------------------------------------------------------------------------
# grids

def test_make_and_save_grid(tmp_path):
    from PIL import Image

    x = torch.rand(5, 3, 2, 3) * 2 - 1
    g = make_grid(x, nrow=2, padding=1)
    assert g.shape == (3 * 3 + 1, 2 * 4 + 1, 3) and g.dtype == np.uint8
    cell = ((x[3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(g[4:6, 5:8], cell)  # image 3 = row 1, column 1
    assert g[0].max() == 0 and g[7:9, 5:8].max() == 0  # padding and the empty sixth cell stay black
    p = save_grid(x, tmp_path / "s.png", nrow=2, scale=2)
    back = np.asarray(Image.open(p))
    assert np.array_equal(back, make_grid(x, nrow=2, scale=2))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_grid(x, p)
    save_grid(-x, p, overwrite=True)
    assert not np.array_equal(np.asarray(Image.open(p)), back)
    assert np.asarray(Image.open(save_grid(x[:, :1], tmp_path / "g.png"))).ndim == 2  # grey, auto scale 16
    with pytest.raises(ValueError, match="NaN"):
        make_grid(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=".png"):
        save_grid(x, tmp_path / "s.jpg")


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    """A 0..63000 16-bit gradient, which pillow's convert("L") clips to 255 almost everywhere: every value must be
    round(v / 257), the exact 16 -> 8 bit map (65535 -> 255, 257 * k -> k)."""
    from PIL import Image

    v = np.linspace(0, 63000, 64).astype(np.uint16).reshape(8, 8)
    v[0, :3] = (0, 257 * 100, 65535)
    Image.fromarray(v).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    for channels in (1, 3, None):
        ds = load_image_folder(tmp_path, channels=channels)
        want = np.floor(v / 257 + 0.5).astype(np.uint8)
        assert torch.equal(ds.images[0, 0], torch.from_numpy(want)), channels
    assert ds.images[0, 0, 0, :3].tolist() == [0, 100, 255] and (ds.images == 255).sum() == 1
    assert ds.image_shape == (1, 8, 8)  # grey by majority
    small = load_image_folder(tmp_path, channels=1, resolution=4)  # scaled before the resize, too
    ref = Image.fromarray(np.floor(v / 257 + 0.5).astype(np.uint8)).resize((4, 4), Image.Resampling.LANCZOS)
    assert torch.equal(small.images[0, 0], torch.from_numpy(np.array(ref)))


def _grey_and_red(root, n_grey, n_red):
    from PIL import Image

    root.mkdir()
    for i in range(n_grey):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / f"a{i}.png")
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    for i in range(n_red):
        Image.fromarray(red).save(root / f"b{i}.png")
    return red


def test_channels_follow_the_majority_of_the_files_with_a_note_of_the_counts(tmp_path):
    from fastcm._checks import FastcmNote

    red = _grey_and_red(tmp_path / "mostly-red", 1, 3)  # the first file in sorted order is the grey one
    with pytest.warns(FastcmNote, match=r"1 grey and 3 colour images; converting the 1 grey one\(s\) to colour"):
        ds = load_dataset(f"folder:{tmp_path / 'mostly-red'}")
    assert ds.image_shape == (3, 8, 8)
    assert all(torch.equal(ds.images[i], torch.from_numpy(red.transpose(2, 0, 1))) for i in (1, 2, 3))
    assert torch.equal(ds.images[0], torch.full((3, 8, 8), 100, dtype=torch.uint8))
    _grey_and_red(tmp_path / "mostly-grey", 3, 1)
    with pytest.warns(FastcmNote, match=r"3 grey and 1 colour images; converting the 1 colour one\(s\) to grey"):
        assert load_dataset(f"folder:{tmp_path / 'mostly-grey'}").image_shape == (1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit mode is the caller's choice: no note
        assert load_image_folder(tmp_path / "mostly-red", channels=1).image_shape == (1, 8, 8)
        assert load_image_folder(tmp_path / "mostly-grey", channels=3).image_shape == (3, 8, 8)


def test_dropped_alpha_channels_and_skipped_formats_are_noted(tmp_path):
    from PIL import Image

    from fastcm._checks import FastcmNote

    Image.fromarray(np.zeros((4, 4, 4), np.uint8), mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.bmp")
    with pytest.warns(FastcmNote) as notes:
        assert len(load_image_folder(tmp_path)) == 1
    text = " | ".join(str(n.message) for n in notes)
    assert "alpha channel of 1 image(s) (1 RGBA)" in text and "skipped 1 image file(s)" in text and "b.bmp" in text


def test_images_beside_class_folders_are_refused_not_dropped(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "1.png")
    with pytest.raises(ValueError, match=r"holds both images \(5, e.g. 0.png\) and class subfolders \(a\)") as e:
        load_image_folder(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "a" / "deeper").mkdir()
    for i in range(5):
        (tmp_path / f"{i}.png").unlink()
    with pytest.raises(ValueError, match=r"class folder .*a holds subfolders \(deeper\)"):
        load_image_folder(tmp_path)
