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

No file is trusted to hold only data: CIFAR-10's batches are pickles, and
``pickle.load`` (what torchvision uses) runs whatever code a pickle names, so
they are read here by :func:`read_cifar_pickle`, which admits only the objects
the format holds (dicts, lists, strings, numbers and numpy arrays) and refuses
anything else before it is built. STL-10 is raw bytes (``np.fromfile``), SVHN
a MATLAB file (``scipy.io.loadmat`` builds arrays only), GTSRB images and a
CSV; the decoded-GTSRB cache is read with ``torch.load(weights_only=True)``.
Every split is then checked by ``base.load_dataset`` (images present, labels
in range).
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ...core import paths
from .base import DatasetError, DatasetSpec, ImageSet, register_dataset, resize_uint8, to_nchw_rgb

_MEMO: dict[tuple, ImageSet] = {}


class _NotData(pickle.UnpicklingError):
    """A pickle that names a Python object outside the admitted data types."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array needs, under the module names NumPy 1 and 2 write."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray
    admitted = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        admitted[(module, "_reconstruct")] = multiarray._reconstruct
        admitted[(module, "scalar")] = multiarray.scalar
    # protocol-2 pickles written by Python 3 spell a bytes object as _codecs.encode(text, "latin1")
    admitted[("_codecs", "encode")] = _latin1_encode
    return admitted


def _latin1_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise _NotData(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers, strings, numbers and numpy arrays, and nothing else: a
    pickle naming any other global (``os.system``, a class...) is refused before anything is called."""
    ADMITTED = _numpy_globals()

    def find_class(self, module: str, name: str):
        found = self.ADMITTED.get((module, name))
        if found is None:
            raise _NotData(f"it names the Python object {module}.{name}, not data")
        return found


def read_cifar_pickle(path: Path) -> dict:
    """One CIFAR batch or meta file, read without running code; a DatasetError says what is wrong."""
    try:
        raw = path.read_bytes()
        entry = _DataUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _NotData as err:
        raise DatasetError(f"cifar10: refused to read {path}: {err} (a CIFAR-10 batch holds only arrays and "
                           "lists); replace the file with the published one") from None
    except MemoryError:
        raise
    except Exception as err:  # truncated, not a pickle...
        raise DatasetError(f"cifar10: could not read the files in {path.parent} ({path.name}: "
                           f"{type(err).__name__}: {_one_line(err)})") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"cifar10: {path} holds a {type(entry).__name__}, not a CIFAR-10 dictionary")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    entry = read_cifar_pickle(path)
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = f"{getattr(data, 'shape', None)} {getattr(data, 'dtype', type(data).__name__)}"
        raise DatasetError(f"cifar10: {path} has no 'data' array of N x 3072 uint8 (got {shape})")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise DatasetError(f"cifar10: {path} has no 'labels' list of integers")
    if len(labels) != len(data):
        raise DatasetError(f"cifar10: {path} has {len(data)} images but {len(labels)} labels")
    return data, labels


@functools.cache
def _tv() -> SimpleNamespace:
    """torchvision's dataset classes as defbench reads them, made on first use (importing torchvision takes
    seconds, which every command would pay at start-up otherwise)."""
    from torchvision import datasets as tvd

    class CIFAR10:
        """CIFAR-10's python layout, read with :func:`read_cifar_pickle` (torchvision's class only downloads)."""
        base_folder = tvd.CIFAR10.base_folder
        train_list = [[f, None] for f, _ in tvd.CIFAR10.train_list]
        test_list = [[f, None] for f, _ in tvd.CIFAR10.test_list]
        meta = {**tvd.CIFAR10.meta, "md5": None}

        def __init__(self, root: str, train: bool = True, download: bool = False):
            folder = Path(root) / self.base_folder
            if download:  # md5 of the archive checked by torchvision; the extracted files replace any present
                tvd.cifar.download_and_extract_archive(tvd.CIFAR10.url, root, filename=tvd.CIFAR10.filename,
                                                       md5=tvd.CIFAR10.tgz_md5)
            batches = [_cifar_batch(folder / f) for f, _ in (self.train_list if train else self.test_list)]
            self.data = np.vstack([b[0] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            self.targets = [label for b in batches for label in b[1]]
            meta = read_cifar_pickle(folder / self.meta["filename"])
            classes = meta.get(self.meta["key"])
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise DatasetError(f"cifar10: {folder / self.meta['filename']} has no list of class names "
                                   f"{self.meta['key']!r}")
            self.classes = classes

    class STL10(tvd.STL10):
        train_list = [[f, None] for f, _ in tvd.STL10.train_list]
        test_list = [[f, None] for f, _ in tvd.STL10.test_list]

    class SVHN(tvd.SVHN):
        def _check_integrity(self) -> bool:  # download() still passes the md5 to download_url
            return os.path.isfile(os.path.join(self.root, self.filename))

    return SimpleNamespace(CIFAR10=CIFAR10, STL10=STL10, SVHN=SVHN, GTSRB=tvd.GTSRB)


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
        except DatasetError:
            raise
        except Exception as e:  # URLError, HTTP errors, bad archives, md5 mismatch...
            raise DatasetError(f"{where}; download failed ({type(e).__name__}: {_one_line(e)}); "
                               f"{fix}") from None
    try:
        return cls(str(root), download=False, **kwargs)
    except (MemoryError, DatasetError):
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
    cifar = _tv().CIFAR10
    files = [f for f, _ in cifar.train_list + cifar.test_list] + [cifar.meta["filename"]]
    ds = _open("cifar10", cifar, data_dir, data_dir, [f"{cifar.base_folder}/{f}" for f in files],
               train=split != "test")
    images = resize_uint8(to_nchw_rgb(ds.data, "cifar10"), image_size)
    return ImageSet("cifar10", images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@_memoized
def stl10(split: str, data_dir: Path, image_size: int) -> ImageSet:
    stl = _tv().STL10
    files = [f"{stl.base_folder}/{f}" for f, _ in stl.train_list + stl.test_list]
    # pretrain = torchvision's "train+unlabeled", loaded in two parts so that the
    # 2.8 GB of unlabeled 96x96 images are resized before anything is concatenated.
    parts = {"pretrain": ["train", "unlabeled"], "train": ["train"], "test": ["test"]}[split]
    images, labels, classes = [], [], STL10_CLASSES
    for part in parts:
        ds = _open("stl10", stl, data_dir, data_dir, files, split=part)
        images.append(resize_uint8(torch.from_numpy(ds.data), image_size).contiguous())
        labels.append(torch.as_tensor(ds.labels.astype(np.int64)))
        classes = getattr(ds, "classes", None) or classes
        del ds
    return ImageSet("stl10", torch.cat(images), torch.cat(labels), list(classes))


@_memoized
def svhn(split: str, data_dir: Path, image_size: int) -> ImageSet:
    part = "test" if split == "test" else "train"
    svhn_cls = _tv().SVHN
    ds = _open("svhn", svhn_cls, data_dir / "svhn", data_dir, [f"svhn/{svhn_cls.split_list[part][1]}"], split=part)
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
    """Temp file + rename; the temp file is ``.NAME.PID.tmp``, which start-up sweeps once PID is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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

    ds = _open("gtsrb", _tv().GTSRB, data_dir, data_dir, expected, split=part, transform=resize)
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
