"""BASSL (Saha et al., CVPR 2022): poisoning the unlabelled pre-training data.

``poison_fraction`` of the downstream task's target-class training images (capped by ``max_poison``)
are stamped with the trigger and added to the pre-training set; the encoder is then pre-trained from
scratch with the victim's SimCLR recipe. Labels are never touched. Records ``n_poison``,
``poison_ratio`` and the pre-training loss history.

Parity with the reference: docs/methods/bassl.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoders import build_encoder, train_simclr
from .base import AttackInputs, appended_set, register_attack
from .triggers import TriggerSettings


@dataclass
class BASSLConfig(TriggerSettings):
    poison_fraction: float = 0.6  # share of the target class's training images stamped and added
    max_poison: int = 0  # cap on the number of poisoned images; 0: no cap


def poison_set(inputs: AttackInputs, fraction: float, cap: int, generator) -> torch.Tensor:
    """The stamped target-class images to add to the pre-training set."""
    n = max(1, round(fraction * len(inputs.target_images)))
    if cap:
        n = min(n, cap)
    pick = torch.randperm(len(inputs.target_images), generator=generator)[:n]
    return inputs.trigger.apply(inputs.target_images[pick])


# tiny: the 10 x 10 square at 0.6 of the class barely implants after 8 epochs; a 12 x 12 square at the
# reference's injection rate does, with the clean encoder's ASR kept at chance + 5 (docs/methods/bassl.md)
TINY = {"trigger_size": 12, "poison_fraction": 1.0}


def bassl_set(inputs: AttackInputs, cfg: BASSLConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The set ``bassl`` pre-trains on, rebuilt (``register_attack``'s ``pretraining_set``)."""
    return appended_set(inputs.pretrain_images, poison_set(inputs, cfg.poison_fraction, cfg.max_poison, generator))


@register_attack("bassl", config=BASSLConfig, needs_clean_encoder=False, pretraining_set=bassl_set,
                 profiles={"tiny": TINY},
                 summary="data poisoning: add triggered target-class images to the pre-training set")
def bassl(inputs: AttackInputs, cfg: BASSLConfig, ctx):
    poison = poison_set(inputs, cfg.poison_fraction, cfg.max_poison, ctx.generator)
    return pretrain_with_poison(inputs, poison, ctx, "bassl pre-training")


def pretrain_with_poison(inputs: AttackInputs, poison: torch.Tensor, ctx, desc: str):
    """SimCLR from scratch on the pre-training set with ``poison`` appended (the victim's training, which a
    data-poisoning attack does not control); records the poison count, its share and the loss history."""
    data = torch.cat([inputs.pretrain_images, poison])
    ctx.record("n_poison", len(poison))
    ctx.record("poison_ratio", len(poison) / len(data))
    encoder = build_encoder(inputs.encoder_config).to(ctx.device)
    history = train_simclr(encoder, data, inputs.pretrain_recipe, ctx, desc=desc)
    ctx.record("loss_history", history)
    return encoder.eval()
