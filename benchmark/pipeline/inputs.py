"""What each stage reads: the seeded subsets and inputs drawn from the datasets.

This is the harness code that decides *which* images a stage sees (the random,
seeded pre-training subset, the defender's clean set, the attacker's target
images, the downstream splits). It is part of every stage's code version
(``stages.Stage.code``): editing it re-keys every artifact, while the rest of the
harness (scheduling, storing, reporting) never does.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ...attacks import AttackInputs, trigger_from_description
from ...encoders import Encoder, SimCLRConfig, build_encoder
from ..datasets import DatasetError, ImageSet, load_dataset


def subsample(n: int, cap: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random ``cap``-subset of ``range(n)`` (all when ``cap`` is 0 or >= n)."""
    if not cap or cap >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def name_seed(name: str, seed: int) -> int:
    return (int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) + seed) % (2**31)


def dataset_split(data_dir: Path, name: str, split: str, image_size: int, cap: int, seed: int) -> ImageSet:
    data = load_dataset(name, split, data_dir, image_size)
    return data.subset(subsample(len(data), cap, name_seed(f"{name}/{split}", seed)))


def clean_subset(data_dir: Path, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean images (random, seeded) and their indices in the pre-training split."""
    data = load_dataset(spec["dataset"], "pretrain", data_dir, spec["image_size"])
    n = max(1, round(spec["fraction"] * len(data)))
    if spec.get("max_images"):
        n = min(n, spec["max_images"])
    gen = torch.Generator().manual_seed(name_seed(f"clean/{spec['dataset']}", spec["seed"]))
    index = torch.randperm(len(data), generator=gen)[:n].sort().values
    images = data.images[index]
    if spec.get("poison_ratio"):  # robustness study: a share of the "clean" set carries the trigger
        poisoned = torch.randperm(n, generator=gen)[:round(spec["poison_ratio"] * n)]
        images = images.clone()
        images[poisoned] = trigger_from_description(spec["trigger"]).apply(images[poisoned])
    return images, index


def pretrain_images(data_dir: Path, spec: dict) -> torch.Tensor:
    return dataset_split(data_dir, spec["dataset"], "pretrain", spec["encoder"]["image_size"], spec["max_images"],
                         spec["seed"]).images


def attack_inputs(data_dir: Path, spec: dict, clean_encoder: Encoder | None) -> AttackInputs:
    """What the attacker holds: shadow/pre-training images, the target class's downstream images, the trigger."""
    size = spec["encoder"]["image_size"]
    shadow = dataset_split(data_dir, spec["pretrain"], "pretrain", size, spec["max_images"], spec["seed"])
    task = load_dataset(spec["downstream"], "train", data_dir, size)
    targets = task.images[task.of_class(spec["target"])]
    if len(targets) == 0:
        raise DatasetError(f"{spec['downstream']} has no training images of target class {spec['target']}; "
                         "set attack.target to a class it has")
    return AttackInputs(encoder_config=build_encoder(spec["encoder"]).config, pretrain_images=shadow.images,
                        target_images=targets, trigger=trigger_from_description(spec["trigger"]),
                        pretrain_recipe=SimCLRConfig(**spec["recipe"]), clean_encoder=clean_encoder)


def evaluation_splits(data_dir: Path, spec: dict, max_train: int, max_test: int) -> dict[str, tuple[ImageSet, str]]:
    """The probe's training and test splits, each with an id naming the subset (for the feature cache)."""
    out = {}
    for part, cap in (("train", max_train), ("test", max_test)):
        data = dataset_split(data_dir, spec["downstream"], part, spec["image_size"], cap, spec["seed"])
        out[part] = (data, f"{spec['downstream']}/{part}/{cap}/{spec['seed']}")
    return out
