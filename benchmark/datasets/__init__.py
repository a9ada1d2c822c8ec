"""Datasets: real ones through torchvision, users' own (npz, image folders) and the embedded default."""
from .base import (DATASETS, FAMILIES, DatasetError, DatasetSpec, ImageSet, data_version, get_spec,
                   load_dataset, register_dataset, resize_uint8)
from . import real, synthetic, user  # noqa: F401,E402  (register the datasets)

# pre-training set -> its downstream tasks and their target classes (the paper's pairs)
FAMILIES.update({
    "cifar10": [("gtsrb", 12), ("svhn", 1), ("stl10", 9)],
    "stl10": [("gtsrb", 12), ("svhn", 1), ("cifar10", 0)],
    "synth-cifar10": [("synth-gtsrb", 12), ("synth-svhn", 1), ("synth-stl10", 9)],
    "synth-stl10": [("synth-gtsrb", 12), ("synth-svhn", 1), ("synth-cifar10", 0)],
})

__all__ = ["DATASETS", "FAMILIES", "DatasetError", "DatasetSpec", "ImageSet", "data_version", "get_spec",
           "load_dataset",
           "register_dataset", "resize_uint8"]
