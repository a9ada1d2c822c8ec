"""Real-dataset and user-data loaders, fed small files written in the genuine on-disk formats."""
from __future__ import annotations

import csv
import os
import pickle
import urllib.error

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from defbench.benchmark.datasets import DATASETS, DatasetError, load_dataset, real

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEFBENCH_OFFLINE", "1")
    real._MEMO.clear()
    yield
    real._MEMO.clear()


def pattern(n: int, h: int, w: int) -> np.ndarray:
    """N x H x W x 3 uint8: red top quarter, green left quarter, blue = 10 * index."""
    x = np.zeros((n, h, w, 3), np.uint8)
    x[:, : h // 4, :, 0] = 255
    x[:, :, : w // 4, 1] = 200
    x[:, :, :, 2] = (10 * np.arange(n, dtype=np.uint8))[:, None, None]
    return x


def assert_pattern(images: torch.Tensor, index: int = 0, blue: int | None = None):
    """The pattern of ``pattern`` survived (resized, not transposed, channels in order)."""
    img = images[index].int()
    q = img.shape[-1] // 4
    assert img[0, : q - 1].min() > 200 and img[0, q + 2:].max() < 30  # red rows on top
    assert img[1, :, : q - 1].min() > 150 and img[1, :, q + 2:].max() < 30  # green columns on the left
    if blue is not None:
        assert (img[2] - blue).abs().max() <= 1


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ CIFAR-10

def write_cifar(root, n=4, n_test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(path, first_label, count):
        x = pattern(count, 32, 32)
        entry = {"batch_label": f"batch {path.name}", "labels": [(first_label + i) % 10 for i in range(count)],
                 "data": x.transpose(0, 3, 1, 2).reshape(count, 3072),  # rows of R, G, B planes
                 "filenames": [f"img_{i}.png" for i in range(count)]}
        path.write_bytes(pickle.dumps(entry, protocol=2))

    for k in range(1, 6):
        batch(folder / f"data_batch_{k}", k, n)
    batch(folder / "test_batch", 7, n_test)
    meta = {"num_cases_per_batch": n, "label_names": CIFAR_CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar10(tmp_path):
    write_cifar(tmp_path)
    train = load_dataset("cifar10", "train", tmp_path, 32)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [(k + i) % 10 for k in range(1, 6) for i in range(4)]
    assert train.classes == CIFAR_CLASSES and train.num_classes == 10
    assert_pattern(train.images, 3, blue=30)
    assert load_dataset("cifar10", "pretrain", tmp_path, 32).images.shape == (20, 3, 32, 32)
    assert load_dataset("cifar10", "train", tmp_path, 32) is train  # in-process cache

    test = load_dataset("cifar10", "test", tmp_path, 64)
    assert test.images.shape == (3, 3, 64, 64)
    assert test.labels.tolist() == [7, 8, 9]
    assert_pattern(test.images, 2, blue=20)
    assert DATASETS["cifar10"].default_target == 0


# -------------------------------------------------------------------- STL-10

def stl_bytes(x: np.ndarray) -> bytes:
    return x.transpose(0, 3, 2, 1).tobytes()  # each channel stored column-major


def write_stl(root):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "train_X.bin").write_bytes(stl_bytes(pattern(3, 96, 96)))
    (folder / "train_y.bin").write_bytes(bytes([1, 5, 10]))  # 1-based on disk
    (folder / "test_X.bin").write_bytes(stl_bytes(pattern(2, 96, 96)))
    (folder / "test_y.bin").write_bytes(bytes([10, 2]))
    (folder / "unlabeled_X.bin").write_bytes(stl_bytes(pattern(4, 96, 96)))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")


def test_stl10(tmp_path):
    write_stl(tmp_path)
    train = load_dataset("stl10", "train", tmp_path, 32)
    assert train.images.shape == (3, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 4, 9]
    assert train.classes[9] == "truck" and DATASETS["stl10"].default_target == 9
    assert_pattern(train.images, 2, blue=20)

    pre = load_dataset("stl10", "pretrain", tmp_path, 32)
    assert pre.images.shape == (7, 3, 32, 32)
    assert pre.labels.tolist() == [0, 4, 9, -1, -1, -1, -1]
    assert_pattern(pre.images, 6, blue=30)

    test = load_dataset("stl10", "test", tmp_path, 96)
    assert test.labels.tolist() == [9, 1]
    assert torch.equal(test.images, torch.from_numpy(pattern(2, 96, 96)).permute(0, 3, 1, 2))


# ---------------------------------------------------------------------- SVHN

def write_svhn(root, split, labels):
    x = pattern(len(labels), 32, 32)
    (root / "svhn").mkdir(exist_ok=True)
    scipy.io.savemat(root / "svhn" / f"{split}_32x32.mat",
                     {"X": x.transpose(1, 2, 3, 0), "y": np.array(labels, np.uint8)[:, None]})


def test_svhn(tmp_path):
    write_svhn(tmp_path, "train", [1, 10, 3, 10])
    write_svhn(tmp_path, "test", [2, 10])
    train = load_dataset("svhn", "train", tmp_path, 32)
    assert train.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == [1, 0, 3, 0]  # label 10 is the digit 0
    assert_pattern(train.images, 3, blue=30)
    test = load_dataset("svhn", "test", tmp_path, 16)
    assert test.images.shape == (2, 3, 16, 16) and test.labels.tolist() == [2, 0]
    assert_pattern(test.images, 1, blue=10)


def test_svhn_test_split_needs_only_its_file(tmp_path):
    write_svhn(tmp_path, "train", [4])
    with pytest.raises(DatasetError) as err:
        load_dataset("svhn", "test", tmp_path, 32)
    msg = one_line(err)
    assert "svhn/test_32x32.mat" in msg and "train_32x32" not in msg


# --------------------------------------------------------------------- GTSRB

def write_gtsrb(root, rng):
    base = root / "gtsrb"
    for label in range(43):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        (folder / f"GT-{label:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
        for k in range(2 if label == 12 else 1):
            h, w = rng.integers(25, 70, size=2)
            Image.fromarray(pattern(1, h, w)[0]).save(folder / f"00000_{k:05d}.ppm")
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        out = csv.writer(f, delimiter=";")
        out.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for i, label in enumerate([12, 0, 42]):
            x = pattern(i + 1, 40 + 7 * i, 33 + 11 * i)[i]
            Image.fromarray(x).save(images / f"{i:05d}.ppm")
            out.writerow([f"{i:05d}.ppm", x.shape[1], x.shape[0], 5, 5, x.shape[1] - 5, x.shape[0] - 5, label])


def test_gtsrb_decodes_resizes_and_caches(tmp_path):
    write_gtsrb(tmp_path, np.random.default_rng(0))
    train = load_dataset("gtsrb", "train", tmp_path, 32)
    assert train.images.shape == (44, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [1] * 12 + [2] + [1] * 30
    assert len(train.classes) == 43 and train.classes[12] == "priority road"
    assert DATASETS["gtsrb"].default_target == 12
    for i in range(44):
        assert_pattern(train.images, i, blue=0)

    test = load_dataset("gtsrb", "test", tmp_path, 32)
    assert test.labels.tolist() == [12, 0, 42]
    assert_pattern(test.images, 2, blue=20)

    cached = sorted(p.name for p in (tmp_path / "home" / "cache" / "datasets").iterdir())
    assert len(cached) == 2 and cached[0].startswith("gtsrb-test-32-") and cached[1].startswith("gtsrb-train-32-")

    # rewriting a file leaves the folder's mtime alone: the decoded cache is reused ...
    training = tmp_path / "gtsrb" / "GTSRB" / "Training"
    Image.fromarray(np.full((30, 30, 3), 77, np.uint8)).save(training / "00000" / "00000_00000.ppm")
    real._MEMO.clear()
    assert torch.equal(load_dataset("gtsrb", "pretrain", tmp_path, 32).images, train.images)
    # ... until the folder changes
    stat = training.stat()
    os.utime(training, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    real._MEMO.clear()
    again = load_dataset("gtsrb", "train", tmp_path, 32)
    assert (again.images[0] == 77).all() and torch.equal(again.images[1:], train.images[1:])


# ------------------------------------------------------------ missing files

def _record_downloads(monkeypatch, error=None):
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if error is not None:
            raise error

    import torchvision.datasets as tvd
    for module in (tvd.cifar, tvd.stl10, tvd.gtsrb):
        monkeypatch.setattr(module, "download_and_extract_archive", fake)
    monkeypatch.setattr(tvd.svhn, "download_url", fake)
    return calls


@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch",
                 "cifar-10-batches-py/batches.meta"]),
    ("stl10", ["stl10_binary/train_X.bin", "stl10_binary/unlabeled_X.bin", "stl10_binary/test_y.bin"]),
    ("svhn", ["svhn/train_32x32.mat"]),
    ("gtsrb", ["gtsrb/GTSRB/Training/"]),
])
def test_missing_dataset_offline(tmp_path, monkeypatch, name, expected):
    calls = _record_downloads(monkeypatch)
    with pytest.raises(DatasetError) as err:
        load_dataset(name, "train", tmp_path / "data", 32)
    msg = one_line(err)
    assert msg.startswith(f"{name}: ") and str(tmp_path / "data") in msg
    assert all(e in msg for e in expected), msg
    assert "DEFBENCH_OFFLINE=1" in msg and "--data-dir" in msg and "DEFBENCH_DATA" in msg
    assert calls == []


def test_missing_dataset_download_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFBENCH_OFFLINE")
    calls = _record_downloads(monkeypatch, urllib.error.URLError("no route to host"))
    for name in ("cifar10", "svhn", "gtsrb"):
        with pytest.raises(DatasetError) as err:
            load_dataset(name, "test", tmp_path, 32)
        msg = one_line(err)
        assert "download failed" in msg and "URLError" in msg and "no route to host" in msg
        assert str(tmp_path) in msg and "DEFBENCH_DATA" in msg
    assert len(calls) == 3
    assert "gtsrb/GT-final_test.csv" in msg


def test_partially_missing_cifar_names_the_missing_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", "train", tmp_path, 32)
    assert "missing cifar-10-batches-py/test_batch)" in one_line(err)


def test_corrupt_file_is_a_one_line_error(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", "train", tmp_path, 32)
    assert "could not read" in one_line(err)


# ----------------------------------------------------------------------- npz

def test_npz_directory_layout(tmp_path):
    np.savez(tmp_path / "train.npz", x=pattern(5, 16, 16), y=np.array([0, 1, 2, 1, 0]))
    np.savez(tmp_path / "test.npz", x=pattern(2, 16, 16), y=np.array([[2], [1]]))  # N x 1 labels too
    name = f"npz:{tmp_path}"
    train = load_dataset(name, "train", "ignored", 32)
    assert train.images.shape == (5, 3, 32, 32) and train.labels.tolist() == [0, 1, 2, 1, 0]
    assert train.num_classes == 3
    assert_pattern(train.images, 4, blue=40)
    assert load_dataset(name, "test", "ignored", 32).labels.tolist() == [2, 1]
    assert len(load_dataset(name, "pretrain", "ignored", 32)) == 5  # no train_unlabeled.npz

    np.savez(tmp_path / "train_unlabeled.npz", x=pattern(7, 16, 16))
    pre = load_dataset(name, "pretrain", "ignored", 32)
    assert pre.images.shape == (7, 3, 32, 32) and (pre.labels == -1).all()


def test_npz_single_file_and_grey(tmp_path):
    grey = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8, 1)
    np.savez(tmp_path / "mine.npz", x=grey)
    pre = load_dataset(f"npz:{tmp_path / 'mine.npz'}", "pretrain", "", 8)
    assert pre.images.shape == (3, 3, 8, 8) and (pre.labels == -1).all()
    assert torch.equal(pre.images[:, 0], torch.from_numpy(grey[..., 0]))
    assert torch.equal(pre.images[:, 0], pre.images[:, 2])
    with pytest.raises(DatasetError, match="need them"):  # train needs labels
        load_dataset(f"npz:{tmp_path / 'mine.npz'}", "train", "", 8)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"npz:{tmp_path / 'mine.npz'}", "test", "", 8)
    assert "test.npz" in one_line(err)


@pytest.mark.parametrize("arrays, expect", [
    (dict(x=np.zeros((2, 8, 8, 3), np.float32), y=np.zeros(2, int)), "must be uint8"),
    (dict(x=np.zeros((2, 8, 8, 2), np.uint8), y=np.zeros(2, int)), "C with C in"),
    (dict(x=np.zeros((3, 8, 8, 3), np.uint8), y=np.zeros(2, int)), "3 images in 'x' but 2 labels"),
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8)), "no array 'x' (it has images)"),
    (dict(x=np.array([None, {"a": 1}], dtype=object), y=np.zeros(2, int)), "without pickle"),
    (dict(x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(2, np.float32)), "integer labels"),
])
def test_npz_bad_contents(tmp_path, arrays, expect):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", "train", "", 32)
    assert expect in one_line(err)


def test_npz_bad_files(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DatasetError, match="not a valid .npz"):
        load_dataset(f"npz:{tmp_path / 'text.npz'}", "train", "", 32)
    np.save(tmp_path / "array.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="single array"):
        load_dataset(f"npz:{tmp_path / 'array.npy'}", "train", "", 32)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}", "train", "", 32)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"npz:{tmp_path}", "train", "", 32)
    assert "train.npz not found" in one_line(err)


# -------------------------------------------------------------------- folder

def write_folder(root, classes, sizes):
    for c, colour in classes.items():
        (root / c).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(root / c / f"{i}.png")


def test_folder_split_layout(tmp_path):
    write_folder(tmp_path / "train", {"dog": (0, 0, 255), "cat": (255, 0, 0), "ant": (0, 255, 0)},
                 [(20, 30), (64, 64)])
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    write_folder(tmp_path / "test", {"dog": (0, 0, 255)}, [(50, 40)])
    name = f"folder:{tmp_path}"
    train = load_dataset(name, "train", "", 32)
    assert train.classes == ["ant", "cat", "dog"]
    assert train.images.shape == (6, 3, 32, 32) and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert (train.images[2, 0] == 255).all() and (train.images[2, 1:] == 0).all()  # cat is red
    test = load_dataset(name, "test", "", 32)
    assert test.labels.tolist() == [2] and test.classes == train.classes  # indexed by train's classes
    assert (test.images[0, 2] == 255).all()
    assert len(load_dataset(name, "pretrain", "", 32)) == 6


def test_folder_class_root_and_errors(tmp_path):
    write_folder(tmp_path / "imgs", {"a": (1, 2, 3), "b": (4, 5, 6)}, [(10, 10)])
    pre = load_dataset(f"folder:{tmp_path / 'imgs'}", "pretrain", "", 16)
    assert pre.images.shape == (2, 3, 16, 16) and pre.classes == ["a", "b"]
    with pytest.raises(DatasetError, match="train and test"):
        load_dataset(f"folder:{tmp_path / 'imgs'}", "test", "", 16)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}", "train", "", 16)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}", "train", "", 16)
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(f"folder:{tmp_path / 'flat'}", "train", "", 16)
    write_folder(tmp_path / "split" / "train", {"a": (0, 0, 0)}, [(8, 8)])
    write_folder(tmp_path / "split" / "test", {"z": (0, 0, 0)}, [(8, 8)])
    with pytest.raises(DatasetError, match="not in train/: z"):
        load_dataset(f"folder:{tmp_path / 'split'}", "test", "", 16)
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read image"):
        load_dataset(f"folder:{tmp_path / 'imgs'}", "train", "", 16)


# ------------------------------------------------------- files that are not just data

class _RunsCode:
    """Unpickling this would run a shell command creating ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
def test_a_cifar_file_that_would_run_code_is_refused_and_never_runs(tmp_path, target):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    entry = ({"labels": [1, 2], "data": _RunsCode(marker)} if target != "batches.meta"
             else {"label_names": _RunsCode(marker)})
    (tmp_path / "cifar-10-batches-py" / target).write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", "train", tmp_path, 32)
    msg = one_line(err)
    assert "refused to read" in msg and target in msg and "system" in msg, msg
    assert not marker.exists(), "the pickle ran its code"


def test_cifar_pickles_written_by_numpy_1_and_python_2_layouts_still_load(tmp_path):
    """The published files name numpy.core.multiarray (NumPy 1); keys may be bytes; labels a numpy array."""
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    entry = {b"labels": np.array([3, 4, 5, 6]), b"data": pattern(4, 32, 32).transpose(0, 3, 1, 2).reshape(4, 3072)}
    raw = pickle.dumps(entry, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in raw
    path.write_bytes(raw)
    train = load_dataset("cifar10", "train", tmp_path, 32)
    assert train.labels.tolist()[4:8] == [3, 4, 5, 6]
    assert_pattern(train.images, 5, blue=10)


@pytest.mark.parametrize("entry, expect", [
    ({"labels": [0, 1], "data": np.zeros((2, 3072), np.float32)}, "uint8"),
    ({"labels": [0, 1], "data": np.zeros((2, 100), np.uint8)}, "N x 3072"),
    ({"labels": [0, 1, 2], "data": np.zeros((2, 3072), np.uint8)}, "2 images but 3 labels"),
    ({"labels": ["a", "b"], "data": np.zeros((2, 3072), np.uint8)}, "list of integers"),
    ([1, 2, 3], "not a CIFAR-10 dictionary"),
    ({"labels": [0, 99], "data": np.zeros((2, 3072), np.uint8)}, "has label 99 but only 10 classes"),
])
def test_cifar_batches_of_the_wrong_shape_are_one_line_errors(tmp_path, entry, expect):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", "train", tmp_path, 32)
    assert expect in one_line(err)


def test_stl10_labels_outside_the_classes_are_refused(tmp_path):
    write_stl(tmp_path)
    (tmp_path / "stl10_binary" / "train_y.bin").write_bytes(bytes([1, 5, 0]))  # 0 on disk: label 255 after -1
    with pytest.raises(DatasetError) as err:
        load_dataset("stl10", "train", tmp_path, 32)
    assert "has label 255 but only 10 classes" in one_line(err)


@pytest.mark.parametrize("y, split, expect", [
    (np.array([0, -1, 1]), "train", "has label -1"),
    (np.array([0, -5, 1]), "pretrain", "has label -5"),
    (np.array([0, 10**6, 1]), "train", "at most 100,000"),
])
def test_npz_labels_out_of_range_are_refused(tmp_path, y, split, expect):
    np.savez(tmp_path / "d.npz", x=pattern(3, 8, 8), y=y)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"npz:{tmp_path / 'd.npz'}", split, "", 8)
    assert expect in one_line(err)


def test_an_empty_split_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 8, 8, 3), np.uint8), y=np.zeros(0, np.int64))
    with pytest.raises(DatasetError) as err:
        load_dataset(f"npz:{tmp_path / 'd.npz'}", "train", "", 8)
    assert "holds no images" in one_line(err)
