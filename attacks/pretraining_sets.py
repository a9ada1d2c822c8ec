"""The pre-training set a data-poisoning attack's victim trained on, rebuilt for the defenses that receive it.

A defense registered with ``needs_pretrain_data`` (PatchSearch) gets the suspect's pre-training set;
for a data-poisoning attack that set is the poisoned one. Rather than store every poisoned set,
the harness rebuilds it: ``builder(inputs, config, generator) -> (images, poisoned)`` receives the
attack stage's own :class:`~defbench.attacks.base.AttackInputs` and config and a generator seeded as
the attack's ``ctx.generator`` was (and, for a trigger the attack learned, that trigger as ``inputs.trigger``,
read from the attack's artefact), and repeats the attack's poisoning -- the same functions, in the
same order of random draws -- up to the set it hands to ``train_simclr``. ``poisoned`` (bool, one
per image) is for the harness's records only; the defense never sees it.

A new data-poisoning attack registers its builder with ``@register_pretraining_set("name")``;
``tests/test_pretrain_data.py`` checks every built-in builder against the set the attack really
trains on.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core import Registry
from .bassl import BASSLConfig, poison_set
from .base import AttackInputs
from .blto import BLTOConfig, poison_slots, poisoned_set
from .corruptencoder import CorruptEncoderConfig, make_poisons
from .ctrl import CTRLConfig, poison_pretraining_set

PRETRAINING_SETS: Registry[Callable] = Registry("poisoned pre-training set")


def register_pretraining_set(attack: str) -> Callable:
    return PRETRAINING_SETS.register(attack)


def _appended(clean: torch.Tensor, poisons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    poisoned = torch.zeros(len(clean) + len(poisons), dtype=torch.bool)
    poisoned[len(clean):] = True
    return torch.cat([clean, poisons]), poisoned


@register_pretraining_set("bassl")
def bassl_set(inputs: AttackInputs, cfg: BASSLConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    return _appended(inputs.pretrain_images, poison_set(inputs, cfg.poison_fraction, cfg.max_poison, generator))


@register_pretraining_set("ctrl")
def ctrl_set(inputs: AttackInputs, cfg: CTRLConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    data, slots, _ = poison_pretraining_set(inputs, cfg.poison_ratio, generator)
    poisoned = torch.zeros(len(data), dtype=torch.bool)
    poisoned[slots.cpu()] = True
    return data, poisoned


@register_pretraining_set("corruptencoder")
def corruptencoder_set(inputs: AttackInputs, cfg: CorruptEncoderConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    poisons, _ = make_poisons(inputs, cfg, generator)
    return _appended(inputs.pretrain_images, poisons)


@register_pretraining_set("blto")
def blto_set(inputs: AttackInputs, cfg: BLTOConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    slots, picks = poison_slots(len(inputs.pretrain_images), len(inputs.target_images), cfg.poison_ratio, generator)
    poisoned = torch.zeros(len(inputs.pretrain_images), dtype=torch.bool)
    poisoned[slots] = True
    return poisoned_set(inputs.pretrain_images, inputs.target_images, inputs.trigger, slots, picks), poisoned
