"""Dataset readers and build_dataset (torchsphere.data), on small files the tests write in the standard formats."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchsphere.data import (DatasetNotFoundError, build_dataset, list_datasets, read_cifar10, read_cifar100,
                              read_idx, read_image_folder, stratified_split)
from torchsphere.data import registry

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_FASHION = all((FASHION_DIR / f"{stem}-ubyte.gz").is_file()
                   for stem in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"))


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


def _normalized(raw: np.ndarray) -> torch.Tensor:
    """The official normalization in float64 numpy: (x - 127.5) / 128."""
    return torch.from_numpy((raw.astype(np.float64) - 127.5) / 128.0)


# ---------------------------------------------------------------- IDX

def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, gz: bool = False) -> Path:
    """Writes ``array`` as IDX: magic 0x00 0x00 <type> <ndim>, big-endian uint32 sizes, big-endian data."""
    be = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    payload = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=be).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)
    return path


def write_mnist_dir(directory: Path, n_train: int, n_test: int, gz: bool, rng: np.random.Generator,
                    size: tuple[int, int] = (28, 28), dotted: bool = False) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        write_idx(directory / (name + (".gz" if gz else "")), arr, gz=gz)
    return arrays


def test_idx_magic_numbers_of_written_files(tmp_path):
    arrays = write_mnist_dir(tmp_path, 3, 2, gz=False, rng=np.random.default_rng(0))
    assert (tmp_path / "train-images-idx3-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x03"  # 2051
    assert (tmp_path / "train-labels-idx1-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x01"  # 2049
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"])
    assert torch.equal(read_idx(tmp_path / "train-images-idx3-ubyte"), expected)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_every_type_big_endian(tmp_path, gz, code, dtype):
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal((2, 3, 4)) * 100).astype(dtype)
    out = read_idx(write_idx(tmp_path / "x.idx", arr, code, gz))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out.numpy(), arr)


def test_read_idx_rejects_malformed_files(tmp_path):
    (tmp_path / "bad_magic").write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad_magic")
    (tmp_path / "bad_type").write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="unknown IDX element type 0x07"):
        read_idx(tmp_path / "bad_type")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="needs 5 data bytes; the file has 2"):
        read_idx(tmp_path / "short")
    (tmp_path / "header").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(tmp_path / "header")


@pytest.mark.parametrize("gz,dotted", [(False, False), (True, False), (False, True)])
def test_mnist_from_idx_files(tmp_path, gz, dotted):
    arrays = write_mnist_dir(tmp_path, 40, 12, gz=gz, rng=np.random.default_rng(1), size=(6, 5), dotted=dotted)
    splits = build_dataset("mnist", tmp_path, val_fraction=0.25, seed=0)
    assert splits.source == str(tmp_path)
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (1, (6, 5), 10)
    assert splits.classes == [str(i) for i in range(10)]
    assert splits.train_x.dtype == torch.float32 and splits.train_y.dtype == torch.int64
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (30, 10, 12)
    # test set: every image, in file order, normalized as (x - 127.5) / 128
    torch.testing.assert_close(splits.test_x, _normalized(arrays["t10k-images-idx3-ubyte"])[:, None].float())
    assert torch.equal(splits.test_y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    # train + val together are exactly the training file (as a set of (image, label) rows)
    full = _normalized(arrays["train-images-idx3-ubyte"]).float().flatten(1)
    both = torch.cat([splits.train_x, splits.val_x]).flatten(1)
    labels = torch.cat([splits.train_y, splits.val_y])
    match = (both[:, None, :] == full[None, :, :]).all(-1)  # (40, 40)
    assert bool((match.sum(1) == 1).all()) and bool((match.sum(0) == 1).all())
    assert torch.equal(labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()[match.float().argmax(1)])


def test_gz_and_raw_files_give_the_same_dataset(tmp_path):
    write_mnist_dir(tmp_path / "raw", 20, 10, gz=False, rng=np.random.default_rng(2))
    write_mnist_dir(tmp_path / "gz", 20, 10, gz=True, rng=np.random.default_rng(2))
    a = build_dataset("mnist", tmp_path / "raw", seed=4)
    b = build_dataset("mnist", tmp_path / "gz", seed=4)
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_idx_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "system"))
    write_mnist_dir(tmp_path / "system", 10, 10, gz=True, rng=np.random.default_rng(0))
    write_mnist_dir(tmp_path / "env" / "fashion-mnist", 10, 10, gz=True, rng=np.random.default_rng(0))
    write_mnist_dir(tmp_path / "given", 10, 10, gz=False, rng=np.random.default_rng(0))
    assert build_dataset("fashion-mnist").source == str(tmp_path / "system")
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path / "env"))  # a subfolder named like the dataset is searched
    assert build_dataset("fashion-mnist").source == str(tmp_path / "env" / "fashion-mnist")
    assert build_dataset("fashion-mnist", tmp_path / "given").source == str(tmp_path / "given")
    # an explicit data_dir without the files is an error naming it, not a silent read of another folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"(?s)Looked in:\n  - .*empty\n.*searched alone") as info:
        build_dataset("fashion-mnist", tmp_path / "empty")
    looked = str(info.value).split("Looked in:")[1].split("(pass data_dir")[0]
    assert str(tmp_path / "env") not in looked and str(tmp_path / "system") not in looked


def test_missing_fashion_mnist_lists_every_place_and_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "system"))
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "given").mkdir()
    write_idx(tmp_path / "given" / "train-images-idx3-ubyte", np.zeros((1, 2, 2), np.uint8))  # incomplete set
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("fashion-mnist", tmp_path / "given")
    msg = str(info.value)
    for place in ("given", "given/fashion-mnist"):
        assert str(tmp_path / place) in msg
    with pytest.raises(DatasetNotFoundError) as info:  # without data_dir: the environment folder, then the system
        build_dataset("fashion-mnist")
    for place in ("env", "env/fashion-mnist", "system"):
        assert str(tmp_path / place) in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "TORCHSPHERE_DATA" in msg
    assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------- CIFAR

def write_cifar_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the archives were written by Python 2's cPickle


def write_cifar10(directory: Path, per_batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True)
    data, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data[name] = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels[name] = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_cifar_pickle(directory / name, {b"batch_label": name.encode(), b"labels": labels[name],
                                              b"data": data[name], b"filenames": [b"x.png"] * per_batch})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_cifar_pickle(directory / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch,
                                                    b"num_vis": 3072})
    train = np.concatenate([data[f"data_batch_{i}"] for i in range(1, 6)])
    train_y = np.concatenate([labels[f"data_batch_{i}"] for i in range(1, 6)])
    return {"train": train, "train_y": train_y, "test": data["test_batch"], "test_y": np.array(labels["test_batch"])}


def test_cifar10_pickles(tmp_path):
    ref = write_cifar10(tmp_path / "cifar-10-batches-py", 4, np.random.default_rng(0))
    train_x, train_y, test_x, test_y, classes = read_cifar10(tmp_path / "cifar-10-batches-py")
    assert train_x.shape == (20, 3, 32, 32) and test_x.shape == (4, 3, 32, 32) and train_x.dtype == torch.uint8
    # row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    for n, c, i, j in [(0, 0, 0, 0), (3, 1, 5, 7), (19, 2, 31, 31), (7, 2, 0, 31)]:
        assert int(train_x[n, c, i, j]) == int(ref["train"][n, c * 1024 + i * 32 + j])
    assert torch.equal(train_y, torch.from_numpy(ref["train_y"]).long())
    assert torch.equal(test_y, torch.from_numpy(ref["test_y"]).long())
    assert classes[0] == "airplane" and classes[9] == "truck"
    splits = build_dataset("cifar10", tmp_path, val_fraction=0.0)  # found in the standard subfolder
    assert splits.source == str(tmp_path / "cifar-10-batches-py")
    assert (splits.in_channels, splits.image_size, splits.num_classes, splits.augment) == (3, (32, 32), 10, "flip")
    assert splits.val_x.shape == (0, 3, 32, 32) and splits.val_y.shape == (0,)
    torch.testing.assert_close(splits.train_x, _normalized(ref["train"].reshape(-1, 3, 32, 32)).float())
    torch.testing.assert_close(splits.test_x, _normalized(ref["test"].reshape(-1, 3, 32, 32)).float())


def test_cifar100_pickles_fine_and_coarse(tmp_path):
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    rng = np.random.default_rng(1)
    data = {s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in (("train", 30), ("test", 10))}
    fine = {s: [int(v) for v in rng.integers(0, 100, len(data[s]))] for s in data}
    for s in data:
        write_cifar_pickle(directory / s, {b"filenames": [b"a"] * len(data[s]), b"batch_label": s.encode(),
                                           b"fine_labels": fine[s], b"coarse_labels": [v // 5 for v in fine[s]],
                                           b"data": data[s]})
    write_cifar_pickle(directory / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                            b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    train_x, train_y, test_x, test_y, classes = read_cifar100(directory)
    assert train_x.shape == (30, 3, 32, 32) and len(classes) == 100 and classes[42] == "f42"
    assert train_y.tolist() == fine["train"] and test_y.tolist() == fine["test"]
    assert int(test_x[9, 2, 31, 0]) == int(data["test"][9, 2048 + 31 * 32])
    splits = build_dataset("cifar100", directory, label_mode="coarse", val_fraction=0.0)
    assert splits.num_classes == 20 and splits.classes[3] == "c3" and splits.augment == "cifar10+"
    assert splits.train_y.tolist() == [v // 5 for v in fine["train"]]
    with pytest.raises(ValueError, match="label_mode must be one of \\['fine', 'coarse'\\]; got 'medium'"):
        build_dataset("cifar100", directory, label_mode="medium")


def test_cifar_pickle_cannot_run_code(tmp_path):
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(target),)

    for s in ("train", "test"):
        with open(directory / s, "wb") as f:
            pickle.dump({b"data": Payload(), b"fine_labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="global posix.makedirs is not allowed|global os.makedirs is not allowed"):
        build_dataset("cifar100", tmp_path)
    assert not target.exists()


def test_cifar_malformed_and_missing(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory, 2, np.random.default_rng(0))
    write_cifar_pickle(directory / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="data_batch_3.*expected \\(N, 3072\\)"):
        read_cifar10(directory)
    write_cifar_pickle(directory / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ValueError, match="key b'labels' missing"):
        read_cifar10(directory)
    write_cifar_pickle(directory / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})
    with pytest.raises(ValueError, match="train labels span \\[0, 12\\]; expected \\[0, 9\\]"):
        build_dataset("cifar10", directory)
    (directory / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        read_cifar10(directory)
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("cifar10", tmp_path)
    msg = str(info.value)
    assert str(directory) in msg and "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py/" in msg


# ---------------------------------------------------------------- digits, synthetic

def test_digits():
    splits = build_dataset("digits", val_fraction=0.1, seed=0)
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (1, (8, 8), 10)
    assert len(splits.train_y) + len(splits.val_y) + len(splits.test_y) == 1797
    assert splits.source == "sklearn.datasets.load_digits" and splits.augment == "none"
    # 0..16 scaled to 0..255, then (x - 127.5) / 128: the extremes are (0 - 127.5)/128 and (255 - 127.5)/128
    torch.testing.assert_close(splits.test_x.min(), torch.tensor(-127.5 / 128))
    torch.testing.assert_close(splits.test_x.max(), torch.tensor(127.5 / 128))
    big = build_dataset("digits", image_size=16, seed=0)
    assert big.image_size == (16, 16) and torch.equal(big.test_y, splits.test_y)  # the test split ignores the seed
    assert torch.equal(build_dataset("digits", seed=1).test_y, splits.test_y)
    with pytest.raises(ValueError, match="image_size must be a positive int; got 0"):
        build_dataset("digits", image_size=0)


def test_synthetic_is_deterministic_and_learnable(device):
    a = build_dataset("synthetic", seed=0)
    b = build_dataset("synthetic", seed=0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape[1:] == (1, 8, 8) and a.num_classes == 4
    # nearest class mean, fitted on train, classifies the test set: the classes are separable
    means = torch.stack([a.train_x[a.train_y == k].mean(0) for k in range(a.num_classes)]).flatten(1)
    pred = torch.cdist(a.test_x.flatten(1), means).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.9
    c = build_dataset("synthetic", num_classes=3, channels=3, image_size=12, train_size=30, test_size=9,
                      val_fraction=0.2)
    assert c.train_x.shape[1:] == (3, 12, 12) and len(c.train_y) + len(c.val_y) == 30 and len(c.test_y) == 9
    assert c.train_x.abs().max() <= 1.0
    moved = c.to(device)
    assert moved.train_x.device.type == device.type and moved.test_y.device.type == device.type
    assert torch.equal(moved.val_x.cpu(), c.val_x) and moved.classes == c.classes
    assert repr(c).startswith("DatasetSplits(synthetic: train 24, val 6, test 9, 3x12x12, 3 classes")
    with pytest.raises(TypeError, match="unknown options \\['colour'\\]; it accepts .*num_classes"):
        build_dataset("synthetic", colour=3)
    with pytest.raises(ValueError, match="synthetic num_classes must be an int >= 2; got 1"):
        build_dataset("synthetic", num_classes=1)


# ---------------------------------------------------------------- splits and arguments

def test_val_split_is_seeded_stratified_and_disjoint():
    y = torch.arange(200) % 4
    keep, held = stratified_split(y, 0.25, seed=0)
    assert len(held) == 50 and sorted(torch.bincount(y[held]).tolist()) == [12, 12, 13, 13]  # 12.5 per class
    assert torch.equal(torch.cat([keep, held]).sort().values, torch.arange(200))
    assert torch.equal(stratified_split(y, 0.25, seed=0)[1], held)
    assert not torch.equal(stratified_split(y, 0.25, seed=1)[1], held)
    singles = [stratified_split(torch.arange(10), 0.1, seed=s) for s in range(20)]  # ten one-example classes
    assert all(len(h) == 1 and len(k) == 9 for k, h in singles)  # still round(0.1 * 10) = 1 held out
    assert len({int(h) for _, h in singles}) > 1  # and not always the same class
    a = build_dataset("synthetic", seed=0, val_fraction=0.25)
    b = build_dataset("synthetic", seed=1, val_fraction=0.25)
    assert not torch.equal(a.val_x, b.val_x) and torch.equal(a.test_x, b.test_x)


def test_limits(tmp_path):
    write_mnist_dir(tmp_path, 100, 50, gz=True, rng=np.random.default_rng(3))
    a = build_dataset("mnist", tmp_path, limit_train=20, limit_test=7, val_fraction=0.2, seed=0)
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (16, 4, 7)
    b = build_dataset("mnist", tmp_path, limit_train=20, limit_test=7, val_fraction=0.2, seed=1)
    assert torch.equal(a.test_x, b.test_x)  # the test subset does not depend on the run seed
    assert not torch.equal(torch.cat([a.train_x, a.val_x]).sum(0), torch.cat([b.train_x, b.val_x]).sum(0))
    assert len(build_dataset("mnist", tmp_path, limit_train=1000).train_y) == 90  # a limit above N keeps all


def test_build_dataset_bad_arguments(tmp_path):
    assert list_datasets() == ["fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "imagefolder", "synthetic",
                               "subset"]
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose from .*'cifar10'.*'synthetic'"):
        build_dataset("cifar")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"val_fraction must be in \\[0, 1\\); got {bad}"):
            build_dataset("synthetic", val_fraction=bad)
    with pytest.raises(TypeError, match="val_fraction must be a float"):
        build_dataset("synthetic", val_fraction="0.1")
    with pytest.raises(ValueError, match="limit_train must be >= 1 .*got 0"):
        build_dataset("synthetic", limit_train=0)
    with pytest.raises(TypeError, match="limit_test must be None or a positive int; got float 2.5"):
        build_dataset("synthetic", limit_test=2.5)
    with pytest.raises(TypeError, match="seed must be an int; got str"):
        build_dataset("synthetic", seed="0")
    with pytest.raises(DatasetNotFoundError, match="nowhere: no data_dir was given"):
        build_dataset("cifar100")


# ---------------------------------------------------------------- image folders

def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


HAVE_PIL = True
try:
    import PIL  # noqa: F401
except ImportError:
    HAVE_PIL = False


@pytest.mark.skipif(not HAVE_PIL, reason="Pillow (torchsphere[vision]) is not installed")
def test_image_folder_train_test_layout(tmp_path):
    colors = {"cat": (200, 10, 30), "dog": (5, 250, 128)}
    for split, n in (("train", 3), ("val", 2)):
        for name, rgb in colors.items():
            for i in range(n):
                _write_png(tmp_path / split / name / f"{i}.png", np.full((6, 6, 3), rgb, np.uint8))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    splits = build_dataset("imagefolder", tmp_path, image_size=6, val_fraction=0.0)
    assert splits.classes == ["cat", "dog"] and splits.image_size == (6, 6) and splits.in_channels == 3
    assert (len(splits.train_y), len(splits.test_y)) == (6, 4)
    for x, y in zip(splits.train_x, splits.train_y):  # exact pixels at native size: no resampling
        expected = _normalized(np.array(colors[splits.classes[int(y)]], np.uint8)).float()
        torch.testing.assert_close(x, expected[:, None, None].expand(3, 6, 6))
    grey = build_dataset("imagefolder", tmp_path, image_size=4, channels=1, val_fraction=0.0)
    assert grey.train_x.shape == (6, 1, 4, 4)
    for f in (tmp_path / "val" / "dog").iterdir():  # a test folder may lack a class
        f.unlink()
    assert build_dataset("imagefolder", tmp_path, image_size=6).test_y.tolist() == [0, 0]
    _write_png(tmp_path / "val" / "bird" / "0.png", np.zeros((6, 6, 3), np.uint8))  # but has no unknown class
    with pytest.raises(ValueError, match="class folders \\['bird'\\] are not among the training classes"):
        build_dataset("imagefolder", tmp_path, image_size=6)


@pytest.mark.skipif(not HAVE_PIL, reason="Pillow (torchsphere[vision]) is not installed")
def test_image_folder_flat_layout_resize_and_lazy_decode(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        for i in range(5):
            _write_png(tmp_path / name / f"{i}.png", rng.integers(0, 256, (10, 16, 3), dtype=np.uint8))
    train_x, train_y, test_x, test_y, classes = read_image_folder(tmp_path, image_size=8)
    assert classes == ["a", "b", "c"] and len(train_x) == 12 and len(test_x) == 3  # one per class held out
    assert sorted(test_y.tolist()) == [0, 1, 2]
    img = train_x[torch.tensor([0, 1])]
    assert img.shape == (2, 3, 8, 8) and img.dtype == torch.uint8  # shorter side resized, centre crop
    from torchsphere.data.folder import ImageFiles
    calls = []
    decode = ImageFiles.decode
    monkeypatch.setattr(ImageFiles, "decode", lambda self, p: calls.append(p) or decode(self, p))
    build_dataset("imagefolder", tmp_path, limit_train=4, limit_test=2, image_size=8)
    assert len(calls) == 6  # only the selected files are decoded


def test_image_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="needs a folder"):
        build_dataset("imagefolder")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build_dataset("imagefolder", tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not importable
    with pytest.raises(ImportError, match='pip install "torchsphere\\[vision\\]"'):
        build_dataset("imagefolder", tmp_path)


@pytest.mark.skipif(not HAVE_PIL, reason="Pillow (torchsphere[vision]) is not installed")
def test_image_folder_bad_layout(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images with a suffix"):
        build_dataset("imagefolder", tmp_path)
    with pytest.raises(ValueError, match="channels must be 1 or 3; got 2"):
        build_dataset("imagefolder", tmp_path, channels=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        build_dataset("imagefolder", tmp_path / "empty")


# ---------------------------------------------------------------- real Fashion-MNIST

@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {FASHION_DIR} "
                                             "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(monkeypatch):
    splits = build_dataset("fashion-mnist", FASHION_DIR, val_fraction=0.1, seed=0)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (54_000, 6_000, 10_000)
    assert splits.train_x.shape[1:] == (1, 28, 28) and splits.classes[9] == "Ankle boot"
    assert torch.equal(torch.bincount(splits.test_y), torch.full((10,), 1000))
    assert torch.equal(torch.bincount(splits.val_y), torch.full((10,), 600))  # stratified
    assert -1.0 < float(splits.train_x.min()) < float(splits.train_x.max()) < 1.0
