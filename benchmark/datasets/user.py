"""The user's own images: ``npz:PATH`` and ``folder:PATH``.

- npz:PATH    a directory with train.npz and test.npz (+ optional train_unlabeled.npz for
              pre-training, the BadEncoder release layout), or one .npz file serving the
              pretrain and train splits. Arrays: ``x`` uint8 N x H x W x C (C in {1, 3}),
              ``y`` int labels (optional for pre-training).
- folder:PATH a directory with train/ and test/ class-folder trees (torchvision ImageFolder
              layout), or one class-folder tree serving the pretrain and train splits.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DatasetError, DatasetSpec, ImageSet, register_dataset, resize_uint8, to_nchw_rgb


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _split_source(kind: str, root: Path, split: str, files: dict[str, str], single_ok) -> Path:
    """The file or folder that serves ``split``: ``files`` maps split -> name inside a split layout."""
    name = f"{kind}:{root}"
    if not root.exists():
        single = "one .npz file" if kind == "npz" else "one folder of class folders"
        raise DatasetError(f"{name}: {root} does not exist (expected a directory holding {files['train']} "
                           f"and {files['test']}, or {single})")
    if single_ok(root):
        if split == "test":
            raise DatasetError(f"{name}: a single {kind} source serves only the pretrain and train splits; "
                               f"for test use a directory holding {files['train']} and {files['test']}")
        return root
    path = root / files[split]
    if not path.exists():
        raise DatasetError(f"{name}: {path} not found (a {kind} dataset directory holds "
                           f"{files['train']} and {files['test']})")
    return path


# ------------------------------------------------------------------------- npz

def _read_npz(path: Path, name: str, need_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DatasetError(f"{name}: {path} is not a valid .npz file ({_one_line(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{name}: {path} holds a single array, not an .npz archive; "
                           f"save with np.savez(path, x=images, y=labels)")
    with archive:
        if "x" not in archive.files:
            raise DatasetError(f"{name}: {path} has no array 'x' (it has {', '.join(archive.files) or 'none'}); "
                               f"save with np.savez(path, x=images, y=labels)")
        try:
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
        except Exception as e:  # object arrays need pickle, which is refused
            raise DatasetError(f"{name}: cannot read {path} without pickle ({_one_line(e)}); "
                               f"store plain uint8 / int arrays") from None
    if x.dtype != np.uint8:
        raise DatasetError(f"{name}: 'x' in {path} must be uint8, got {x.dtype}; convert with x.astype('uint8')")
    images = to_nchw_rgb(x, f"{name} ({path.name})")
    if y is None:
        if need_labels:
            raise DatasetError(f"{name}: {path} has no labels 'y'; the train and test splits need them")
        return images, torch.full((len(images),), -1, dtype=torch.int64)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{name}: 'y' in {path} must be N integer labels, got {y.shape} {y.dtype}")
    if len(y) != len(images):
        raise DatasetError(f"{name}: {path} has {len(images)} images in 'x' but {len(y)} labels in 'y'")
    return images, torch.as_tensor(y.astype(np.int64))


def load_npz(split: str, data_dir: Path, image_size: int) -> ImageSet:
    root, name = Path(data_dir), f"npz:{data_dir}"
    files = {"pretrain": "train.npz", "train": "train.npz", "test": "test.npz"}
    if split == "pretrain" and (root / "train_unlabeled.npz").is_file():
        files["pretrain"] = "train_unlabeled.npz"
    path = _split_source("npz", root, split, files, Path.is_file)
    images, labels = _read_npz(path, name, need_labels=split != "pretrain")
    return ImageSet(name, resize_uint8(images, image_size), labels)


# ---------------------------------------------------------------------- folder

def _class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_folder(split: str, data_dir: Path, image_size: int) -> ImageSet:
    root, name = Path(data_dir), f"folder:{data_dir}"
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{name}: {root} is not a directory")
    files = {"pretrain": "train", "train": "train", "test": "test"}
    source = _split_source("folder", root, split, files, lambda p: not (p / "train").is_dir())
    # the test split is labelled with the train split's class list, so indices agree
    classes = _class_folders(source if source == root else root / "train")
    extra = set(_class_folders(source)) - set(classes)
    if extra:
        raise DatasetError(f"{name}: {source} has class folders not in train/: {', '.join(sorted(extra))}")
    if not classes:
        raise DatasetError(f"{name}: no class folders in {source} (expected {source}/<class>/<image>)")
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # here: torchvision takes seconds to import
    samples = make_dataset(str(source), {c: i for i, c in enumerate(classes)},
                           extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DatasetError(f"{name}: no images ({', '.join(IMG_EXTENSIONS)}) found in the class folders "
                           f"of {source}")
    images = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as img:
                # PIL's bilinear resize antialiases when shrinking, like resize_uint8
                images[i] = np.asarray(img.convert("RGB").resize((image_size, image_size),
                                                                 Image.Resampling.BILINEAR))
        except Exception as e:
            raise DatasetError(f"{name}: cannot read image {path} ({_one_line(e)})") from None
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return ImageSet(name, to_nchw_rgb(images, name), labels, classes)


def fingerprint(name: str) -> str:
    """Size and modification time of the files (npz) or class folders (folder) behind ``npz:PATH`` /
    ``folder:PATH``: editing the data gives new stage keys instead of stale cached results."""
    root = Path(name.partition(":")[2]).expanduser()
    if not root.exists():
        return "missing"
    entries = [root] + (sorted(root.rglob("*.npz")) if name.startswith("npz:") else
                        sorted(p for p in root.rglob("*") if p.is_dir()))
    parts = [f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in entries if p.exists()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


register_dataset(DatasetSpec(
    "npz", "npz:PATH, your arrays x (uint8 N x H x W x C) and y: PATH/{train,test}.npz or one .npz file",
    load_npz, needs_data_dir=False, version=fingerprint))
register_dataset(DatasetSpec(
    "folder", "folder:PATH, your images in class folders: PATH/{train,test}/<class>/ or PATH/<class>/",
    load_folder, needs_data_dir=False, version=fingerprint))
