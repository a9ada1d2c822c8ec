"""The suspect's pre-training set, for a defense registered with ``needs_pretrain_data``.

The defend stage's spec describes the clean pre-training split (``pretrain_data_spec``: dataset,
size cap, seed, image size) and the victim's recipe; the images themselves follow from the suspect:

- made by a data-poisoning attack (an attack registered without ``needs_clean_encoder``): the
  poisoned set that attack trained on, rebuilt through the ``pretraining_set`` builder it registered with, from
  the attack stage's own inputs, config and seed;
- anything else (a model-poisoning attack, the clean encoder, an imported checkpoint): the clean split.

The defense receives the set in a seeded random order; which images are poisons stays here, for the
stage's result. This module is a code root of exactly those defend stages (``stages.Stage.code``), so
editing it re-runs them and nothing else.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ...attacks import ATTACKS, trigger_from_description
from ...encoders import SimCLRConfig
from .inputs import attack_inputs, dataset_split, name_seed

MODULE = __name__
CLEAN_SOURCE = "clean pre-training set"
POISONED_SOURCE = "poisoned pre-training set of the suspect"


@dataclass
class SuspectPretraining:
    """What the harness knows: the images in the order the defense gets them, which are poisons, and why."""
    images: torch.Tensor
    poisoned: torch.Tensor  # bool, aligned with ``images``
    source: str
    recipe: SimCLRConfig

    def summary(self) -> dict:
        return {"source": self.source, "n_images": len(self.images), "n_poison": int(self.poisoned.sum()),
                "sha256": hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()}


def is_data_poisoning(stage) -> bool:
    return stage.kind == "attack" and not ATTACKS.get(stage.name).options.get("needs_clean_encoder", True)


def _poisoned_set(data_dir: Path, attack, learned_trigger: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    spec = attack.spec
    component = ATTACKS.get(spec["attack"])
    given = attack_inputs(data_dir, spec, None)
    if learned_trigger is not None:  # the trigger the attack learned (BLTO), not the plan's placeholder
        given = dataclasses.replace(given, trigger=trigger_from_description(learned_trigger))
    generator = torch.Generator().manual_seed(attack.seed())  # the attack's ctx.generator at its start
    images, poisoned = component.options.pretraining_set(given, component.config(**spec["config"]), generator)
    return images.cpu(), poisoned.cpu()


def suspect_pretraining(data_dir: Path, spec: dict, suspect, seed: int,
                        learned_trigger: dict | None = None) -> SuspectPretraining:
    """The pre-training set of the encoder made by stage ``suspect``, shuffled with ``seed``; ``learned_trigger``:
    the description of the trigger ``suspect`` learned while it ran (from its artefact), if it did."""
    recipe = SimCLRConfig(**spec["recipe"])
    if is_data_poisoning(suspect):
        images, poisoned = _poisoned_set(data_dir, suspect, learned_trigger)
        source = POISONED_SOURCE
    else:
        images = dataset_split(data_dir, spec["dataset"], "pretrain", spec["image_size"], spec["max_images"],
                               spec["seed"]).images
        poisoned, source = torch.zeros(len(images), dtype=torch.bool), CLEAN_SOURCE
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(name_seed("pretrain-order", seed)))
    return SuspectPretraining(images[order], poisoned[order], source, recipe)


def removal_summary(data: SuspectPretraining, removed) -> dict:
    """How many of the images a defense removed (indices into the set it got) were poisons."""
    index = torch.as_tensor(list(removed), dtype=torch.long)
    if len(index) and (index.min() < 0 or index.max() >= len(data.images)):
        raise ValueError(f"the removed indices must lie in [0, {len(data.images)}), got {index.min()}..{index.max()}")
    index = index.unique()
    hit = int(data.poisoned[index].sum()) if len(index) else 0
    return {"removed": len(index), "removed_poison": hit, "removed_clean": len(index) - hit}
