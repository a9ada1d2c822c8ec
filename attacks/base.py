"""The attack contract and registry.

An attack is registered with ``@register_attack(name, config=..., summary=...,
needs_clean_encoder=...)`` on a function ``attack(inputs, config, ctx) ->
Encoder``. Model-poisoning attacks (BadEncoder) start from the clean
pre-trained encoder; data-poisoning attacks (BASSL, CTRL) poison the
pre-training set and pre-train from scratch with the victim's recipe, and
register with ``pretraining_set=builder``: how their poisoned set is rebuilt
for the defenses that receive the pre-training data (see ``PretrainingSet``).
The config class must provide ``target`` and ``make_trigger(image_size)``
(inherit :class:`~defbench.attacks.triggers.TriggerSettings` for the patch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..encoders import Encoder, EncoderConfig, SimCLRConfig
from ..core import ComponentRegistry
from ..core import RegistryError
from ..core.registry import Options

# ``builder(inputs, config, generator) -> (images, poisoned)``: a data-poisoning attack's pre-training set, rebuilt.
# It receives the attack stage's own AttackInputs and config and a generator seeded as the attack's
# ``ctx.generator`` was (and, for a trigger the attack learned, that trigger as ``inputs.trigger``), and repeats
# the attack's poisoning -- the same functions, in the same order of random draws -- up to the set it hands to
# ``train_simclr``. ``poisoned`` (bool, one per image) is for the harness's records only: no defense sees it.
# ``tests/test_pretrain_data.py`` checks every built-in builder against the set its attack really trains on.
PretrainingSet = Callable[["AttackInputs", object, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class AttackOptions(Options):
    """How an attack is planned (``register_attack``'s keyword arguments)."""
    needs_clean_encoder: bool = True  # False: a data-poisoning attack, trained from scratch on its poisoned set
    pretraining_set: PretrainingSet | None = None  # a data-poisoning attack's set, rebuilt (PretrainingSet)

    def check(self, where: str, config: type) -> None:
        if not self.needs_clean_encoder and not callable(self.pretraining_set):
            raise RegistryError(f"{where} poisons the pre-training data (needs_clean_encoder=False): register it "
                                "with pretraining_set=builder, which rebuilds its poisoned set for the defenses "
                                "that receive the pre-training data (see defbench.attacks.base.PretrainingSet)")
        if self.needs_clean_encoder and self.pretraining_set is not None:
            raise RegistryError(f"{where} starts from the clean encoder (needs_clean_encoder=True), so its victim "
                                "trained on the clean set: drop pretraining_set")


ATTACKS = ComponentRegistry("attack", "defbench.attacks", AttackOptions)


def register_attack(name: str, *, config: type, summary: str, profiles: dict | None = None,
                    needs_clean_encoder: bool = True, pretraining_set: PretrainingSet | None = None,
                    formerly: tuple[str, ...] | str = ()):
    """Register an attack. ``needs_clean_encoder=False``: it poisons the pre-training set and pre-trains from
    scratch, and ``pretraining_set`` rebuilds that set (:data:`PretrainingSet`); ``formerly``: the names it had
    before a rename, oldest first (its results keep)."""
    options = AttackOptions(needs_clean_encoder=needs_clean_encoder, pretraining_set=pretraining_set)
    return ATTACKS.component(name, config=config, summary=summary, profiles=profiles, formerly=formerly,
                             options=options)


@dataclass
class AttackInputs:
    """What the attacker holds for one (pre-training set, target task) pair."""
    encoder_config: EncoderConfig
    pretrain_images: torch.Tensor  # uint8 N x 3 x H x W: shadow set / pre-training set
    target_images: torch.Tensor  # uint8: downstream training images of the target class
    trigger: object  # has .apply(images)
    pretrain_recipe: SimCLRConfig  # the victim's pre-training recipe (data poisoning)
    clean_encoder: Encoder | None = None  # set when the attack needs_clean_encoder


def appended_set(clean: torch.Tensor, poisons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, poisoned) of a pre-training set with ``poisons`` appended: the set a ``PretrainingSet`` returns
    for an attack that adds its poisons to the clean images."""
    poisoned = torch.zeros(len(clean) + len(poisons), dtype=torch.bool)
    poisoned[len(clean):] = True
    return torch.cat([clean, poisons]), poisoned


def get_attack(name: str):
    return ATTACKS.get(name)
