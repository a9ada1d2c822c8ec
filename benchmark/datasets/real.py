"""Real datasets, parsed from their published on-disk formats by torchvision.

Layouts under the data directory DATA (``--data-dir`` / ``DEFBENCH_DATA``):

- cifar10: DATA/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
- stl10:   DATA/stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin (+ class_names.txt)
- svhn:    DATA/svhn/{train_32x32,test_32x32}.mat  (torchvision's SVHN root is DATA/svhn)
- gtsrb:   DATA/gtsrb/GTSRB/Training/<00000..00042>/*.ppm,
           DATA/gtsrb/GTSRB/Final_Test/Images/*.ppm and DATA/gtsrb/GT-final_test.csv

Files that exist are accepted as they are (torchvision would md5 every file,
rejecting re-saved copies); md5 is only checked on the archives it downloads.
Downloads are tried only when files are missing and ``DEFBENCH_OFFLINE`` is not 1.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets as tvd

from .. import paths
from .base import DatasetError, DatasetSpec, ImageSet, register_dataset, resize_uint8, to_nchw_rgb

_MEMO: dict[tuple, ImageSet] = {}


class _CIFAR10(tvd.CIFAR10):
    # check_integrity(path, None) only tests that the file exists; tgz_md5 still guards downloads.
    train_list = [[f, None] for f, _ in tvd.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in tvd.CIFAR10.test_list]
    meta = {**tvd.CIFAR10.meta, "md5": None}


class _STL10(tvd.STL10):
    train_list = [[f, None] for f, _ in tvd.STL10.train_list]
    test_list = [[f, None] for f, _ in tvd.STL10.test_list]


class _SVHN(tvd.SVHN):
    def _check_integrity(self) -> bool:  # download() still passes the md5 to download_url
        return os.path.isfile(os.path.join(self.root, self.filename))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _open(name: str, cls, root: Path, base: Path, expected: list[str], **kwargs):
    """Instantiate a torchvision dataset on ``root``, downloading only what is missing.

    ``expected`` are paths relative to ``base`` (the data directory the user chose).
    """
    missing = [p for p in expected if not (base / p).exists()]
    if missing:
        where = f"{name}: not found in {base} (expected {', '.join(expected)}"
        where += ")" if len(missing) == len(expected) else f"; missing {', '.join(missing)})"
        fix = "put the files there, or pass --data-dir / set DEFBENCH_DATA"
        if os.environ.get("DEFBENCH_OFFLINE") == "1":
            raise DatasetError(f"{where}; DEFBENCH_OFFLINE=1 so no download was tried; {fix}")
        try:
            return cls(str(root), download=True, **kwargs)
        except Exception as e:  # URLError, HTTP errors, bad archives, md5 mismatch...
            raise DatasetError(f"{where}; download failed ({type(e).__name__}: {_one_line(e)}); "
                               f"{fix}") from None
    try:
        return cls(str(root), download=False, **kwargs)
    except MemoryError:
        raise
    except Exception as e:
        raise DatasetError(f"{name}: could not read the files in {base} "
                           f"({type(e).__name__}: {_one_line(e)})") from None


def _memoized(load):
    def wrapper(split: str, data_dir: Path, image_size: int) -> ImageSet:
        key = (load.__name__, split, image_size, str(Path(data_dir).resolve()))
        if key not in _MEMO:  # callers share the tensors: clone before modifying in place
            _MEMO[key] = load(split, Path(data_dir), image_size)
        return _MEMO[key]
    wrapper.__name__ = load.__name__
    return wrapper


@_memoized
def cifar10(split: str, data_dir: Path, image_size: int) -> ImageSet:
    files = [f for f, _ in _CIFAR10.train_list + _CIFAR10.test_list] + [_CIFAR10.meta["filename"]]
    ds = _open("cifar10", _CIFAR10, data_dir, data_dir, [f"{_CIFAR10.base_folder}/{f}" for f in files],
               train=split != "test")
    images = resize_uint8(to_nchw_rgb(ds.data, "cifar10"), image_size)
    return ImageSet("cifar10", images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@_memoized
def stl10(split: str, data_dir: Path, image_size: int) -> ImageSet:
    files = [f"{_STL10.base_folder}/{f}" for f, _ in _STL10.train_list + _STL10.test_list]
    # pretrain = torchvision's "train+unlabeled", loaded in two parts so that the
    # 2.8 GB of unlabeled 96x96 images are resized before anything is concatenated.
    parts = {"pretrain": ["train", "unlabeled"], "train": ["train"], "test": ["test"]}[split]
    images, labels, classes = [], [], STL10_CLASSES
    for part in parts:
        ds = _open("stl10", _STL10, data_dir, data_dir, files, split=part)
        images.append(resize_uint8(torch.from_numpy(ds.data), image_size).contiguous())
        labels.append(torch.as_tensor(ds.labels.astype(np.int64)))
        classes = getattr(ds, "classes", None) or classes
        del ds
    return ImageSet("stl10", torch.cat(images), torch.cat(labels), list(classes))


@_memoized
def svhn(split: str, data_dir: Path, image_size: int) -> ImageSet:
    part = "test" if split == "test" else "train"
    ds = _open("svhn", _SVHN, data_dir / "svhn", data_dir, [f"svhn/{_SVHN.split_list[part][1]}"], split=part)
    images = resize_uint8(torch.from_numpy(ds.data), image_size).contiguous()  # labels: 10 -> 0 by torchvision
    return ImageSet("svhn", images, torch.as_tensor(ds.labels, dtype=torch.int64), [str(d) for d in range(10)])


GTSRB_CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for trucks", "right of way at next intersection", "priority road", "yield", "stop",
    "no vehicles", "no trucks", "no entry", "general caution", "dangerous curve left",
    "dangerous curve right", "double curve", "bumpy road", "slippery road", "road narrows on the right",
    "road work", "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
    "beware of ice/snow", "wild animals crossing", "end of all limits", "turn right ahead",
    "turn left ahead", "ahead only", "go straight or right", "go straight or left", "keep right",
    "keep left", "roundabout mandatory", "end of no passing", "end of no passing for trucks",
]


def _gtsrb_cache(source: Path, part: str, image_size: int) -> Path:
    """Decoding ~40k PPMs is slow: the result is cached, keyed by the folder's path and mtime."""
    stamp = f"{source.resolve()}|{source.stat().st_mtime_ns}"
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    return paths.cache_dir() / "datasets" / f"gtsrb-{part}-{image_size}-{digest}.pt"


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@_memoized
def gtsrb(split: str, data_dir: Path, image_size: int) -> ImageSet:
    part = "test" if split == "test" else "train"
    expected = (["gtsrb/GTSRB/Training/"] if part == "train"
                else ["gtsrb/GTSRB/Final_Test/Images/", "gtsrb/GT-final_test.csv"])
    source = data_dir / expected[0]
    if source.is_dir():
        try:
            saved = torch.load(_gtsrb_cache(source, part, image_size), weights_only=True)
            return ImageSet("gtsrb", saved["images"], saved["labels"], list(GTSRB_CLASSES))
        except Exception:  # absent or unreadable: decode again
            pass

    def resize(img):  # PIL's bilinear resize antialiases when shrinking, like resize_uint8
        return np.asarray(img.resize((image_size, image_size), Image.Resampling.BILINEAR))

    ds = _open("gtsrb", tvd.GTSRB, data_dir, data_dir, expected, split=part, transform=resize)
    try:
        pairs = [ds[i] for i in range(len(ds))]
    except Exception as e:
        raise DatasetError(f"gtsrb: could not decode an image under {source} ({_one_line(e)})") from None
    if not pairs:
        raise DatasetError(f"gtsrb: no .ppm images under {source}")
    images = to_nchw_rgb(np.stack([p[0] for p in pairs]), "gtsrb")
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.int64)

    try:
        _save_atomic({"images": images, "labels": labels}, _gtsrb_cache(source, part, image_size))
    except OSError:  # an unwritable cache only costs time
        pass
    return ImageSet("gtsrb", images, labels, list(GTSRB_CLASSES))


register_dataset(DatasetSpec(
    "cifar10", "CIFAR-10, 50k/10k 32x32 images, 10 classes (torchvision layout under DATA/cifar-10-batches-py)",
    cifar10, default_target=0))
register_dataset(DatasetSpec(
    "stl10", "STL-10, 5k/8k 96x96 images + 100k unlabeled for pre-training, 10 classes "
             "(torchvision layout under DATA/stl10_binary)", stl10, default_target=9))
register_dataset(DatasetSpec(
    "svhn", "SVHN, 73k/26k 32x32 digit images, 10 classes (DATA/svhn/train_32x32.mat, test_32x32.mat)",
    svhn, default_target=1))
register_dataset(DatasetSpec(
    "gtsrb", "GTSRB, 39k/12.6k traffic signs of varying size, 43 classes "
             "(torchvision layout under DATA/gtsrb; decoded images cached)", gtsrb, default_target=12))
