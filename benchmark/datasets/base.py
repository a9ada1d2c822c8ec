"""In-memory labelled image sets and the dataset registry.

Every dataset, real or generated, arrives as an :class:`ImageSet`: uint8
images N x 3 x H x W at the profile's image size plus int64 labels. Whole
sets stay in memory (CIFAR-10 is 150 MB as uint8), which keeps batching a
matter of tensor indexing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ...core import Registry, UserError

SPLITS = ("pretrain", "train", "test")
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a larger label is a stray value, not a class


class DatasetError(UserError):
    """A dataset that cannot be loaded; the message names what is missing and what to do."""


@dataclass
class ImageSet:
    name: str
    images: torch.Tensor  # uint8, N x 3 x H x W
    labels: torch.Tensor  # int64, N (-1 where a split carries no labels)
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DatasetError(f"{self.name}: images must be uint8 N x 3 x H x W, got "
                               f"{tuple(self.images.shape)} {self.images.dtype}")
        if len(self.labels) != len(self.images):
            raise DatasetError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(self.labels.max().item()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.name, self.images[index], self.labels[index], self.classes)

    def of_class(self, label: int) -> torch.Tensor:
        return torch.nonzero(self.labels == label).flatten()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    load: Callable[..., ImageSet]  # load(split, data_dir, image_size) -> ImageSet
    default_target: int = 0
    needs_data_dir: bool = True
    # what the stage keys record about the data: a string, or a function of the full name (npz:PATH)
    version: str | Callable[[str], str] = "1"


DATASETS: Registry[DatasetSpec] = Registry("dataset", extra_names=("npz:PATH", "folder:PATH"))

# pre-training set -> [(downstream task, target class)], the paper's pairs and
# their embedded counterparts.
FAMILIES: dict[str, list[tuple[str, int]]] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.add(spec.name, spec)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize of uint8 N x 3 x H x W images (no-op when already ``size``)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(2048):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def to_nchw_rgb(array, name: str) -> torch.Tensor:
    """N x H x W (x C) uint8 array with C in {1, 3} -> N x 3 x H x W tensor."""
    x = torch.as_tensor(array)
    if x.dtype != torch.uint8:
        raise DatasetError(f"{name}: images must be uint8, got {x.dtype}; convert with x.astype('uint8')")
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DatasetError(f"{name}: images must be N x H x W x C with C in {{1, 3}}, got {tuple(x.shape)}")
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.permute(0, 3, 1, 2).contiguous()


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset name; ``npz:PATH`` and ``folder:PATH`` name the ``npz``/``folder`` loaders."""
    prefix, sep, _ = name.partition(":")
    if sep and prefix in DATASETS:
        return DATASETS.get(prefix)
    return DATASETS.get(name)


def data_version(name: str) -> str:
    """The dataset's version for cache keys: a stage that reads changed data must not hit the cache."""
    version = get_spec(name).version
    return version(name) if callable(version) else version


def load_dataset(name: str, split: str, data_dir: str | Path, image_size: int) -> ImageSet:
    """One split of a dataset, checked: images present, labels integers in range (see :func:`check_labels`)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    spec = get_spec(name)
    _, sep, path = name.partition(":")
    if sep and spec.name in ("npz", "folder"):
        data = spec.load(split=split, data_dir=Path(path), image_size=image_size)
    else:
        data = spec.load(split=split, data_dir=Path(data_dir), image_size=image_size)
    check_labels(data, split)
    return data


def check_labels(data: ImageSet, split: str) -> None:
    """A split with images whose labels are integers in 0..classes-1 (-1, "no label", only for pre-training)."""
    where = f"{data.name} ({split} split)"
    if len(data) == 0:
        raise DatasetError(f"{where}: holds no images")
    labels = data.labels
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise DatasetError(f"{where}: labels must be N integers, got {tuple(labels.shape)} {labels.dtype}")
    lowest, highest = int(labels.min()), int(labels.max())
    floor = -1 if split == "pretrain" else 0
    if lowest < floor:
        need = "" if split == "pretrain" else " (every train and test image needs one)"
        raise DatasetError(f"{where}: has label {lowest}; labels must be class indices 0, 1, ...{need}")
    if data.classes and highest >= len(data.classes):
        raise DatasetError(f"{where}: has label {highest} but only {len(data.classes)} classes "
                           f"(0..{len(data.classes) - 1})")
    if highest >= MAX_CLASSES:  # the probe gets one output per class index up to the largest
        raise DatasetError(f"{where}: has label {highest}; labels must be class indices 0..K-1 with K at most "
                           f"{MAX_CLASSES:,} (renumber them)")
