"""The attack contract and registry.

An attack is registered with ``@register_attack(name, config=..., summary=...,
needs_clean_encoder=...)`` on a function ``attack(inputs, config, ctx) ->
Encoder``. Model-poisoning attacks (BadEncoder) start from the clean
pre-trained encoder; data-poisoning attacks (BASSL, CTRL) poison the
pre-training set and pre-train from scratch with the victim's recipe. The
config class must provide ``target`` and ``make_trigger(image_size)``
(inherit :class:`~defbench.attacks.triggers.TriggerSettings` for the patch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoders import Encoder, EncoderConfig, SimCLRConfig
from ..core import ComponentRegistry
from ..core.registry import Options


@dataclass(frozen=True)
class AttackOptions(Options):
    """How an attack is planned (``register_attack``'s keyword arguments)."""
    needs_clean_encoder: bool = True  # False: a data-poisoning attack, trained from scratch on its poisoned set


ATTACKS = ComponentRegistry("attack", "defbench.attacks", AttackOptions)


def register_attack(name: str, *, config: type, summary: str, profiles: dict | None = None,
                    needs_clean_encoder: bool = True, formerly: tuple[str, ...] | str = ()):
    """Register an attack. ``needs_clean_encoder=False``: it poisons the pre-training set and pre-trains from
    scratch; ``formerly``: the names it had before a rename, oldest first (its results keep)."""
    return ATTACKS.component(name, config=config, summary=summary, profiles=profiles, formerly=formerly,
                             options=AttackOptions(needs_clean_encoder=needs_clean_encoder))


@dataclass
class AttackInputs:
    """What the attacker holds for one (pre-training set, target task) pair."""
    encoder_config: EncoderConfig
    pretrain_images: torch.Tensor  # uint8 N x 3 x H x W: shadow set / pre-training set
    target_images: torch.Tensor  # uint8: downstream training images of the target class
    trigger: object  # has .apply(images)
    pretrain_recipe: SimCLRConfig  # the victim's pre-training recipe (data poisoning)
    clean_encoder: Encoder | None = None  # set when the attack needs_clean_encoder


def get_attack(name: str):
    return ATTACKS.get(name)
