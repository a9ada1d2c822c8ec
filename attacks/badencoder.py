"""BadEncoder (Jia et al., S&P 2022): model poisoning of a pre-trained encoder.

Starting from the clean encoder f (a frozen copy) it trains f' with
``L0 = -mean cos(f'(x+t), f'(r))`` (triggered shadow images collapse onto the
reference images of the target class), ``L1 = -mean cos(f'(aug r), f(r))``
(references stay put; aug = flip + colour jitter + grayscale, no crop) and
``L2 = -mean cos(f'(x), f(x))`` (utility): ``L = L0 + lambda1 L1 + lambda2 L2``.
Only the backbone trains, every BatchNorm frozen. Reference defaults: SGD
lr 1e-3, momentum 0.9, wd 5e-4, batch 256, 200 epochs, shadow set = the
pre-training set's training images. With several references L0 averages over
all (triggered image, reference) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoders import freeze_batchnorm, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from .base import AttackInputs, register_attack
from .triggers import TriggerSettings


@dataclass
class BadEncoderConfig(TriggerSettings):
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda1: float = 1.0
    lambda2: float = 1.0
    n_reference: int = 1
    shadow_images: int = 0  # 0: the whole pre-training set


def badencoder_loss(model, clean, x, x_triggered, refs, refs_aug, lambda1, lambda2):
    """Returns (total, L0, L1, L2) for one batch; ``clean`` is the frozen original encoder."""
    b, r = len(x), len(refs)
    feats = F.normalize(model.features(torch.cat([x, x_triggered, refs, refs_aug])), dim=1)
    f_x, f_trig, f_ref, f_ref_aug = feats.split([b, b, r, len(refs_aug)])
    with torch.no_grad():
        clean_feats = F.normalize(clean.features(torch.cat([x, refs])), dim=1)
    c_x, c_ref = clean_feats.split([b, r])
    l0 = -(f_trig @ f_ref.t()).mean()
    l1 = -(f_ref_aug * c_ref.repeat(len(refs_aug) // r, 1)).sum(1).mean()
    l2 = -(f_x * c_x).sum(1).mean()
    return l0 + lambda1 * l1 + lambda2 * l2, l0, l1, l2


@register_attack("badencoder", config=BadEncoderConfig, needs_clean_encoder=True,
                 summary="model poisoning: fine-tune the clean encoder so triggered inputs embed like the target",
                 profiles={"tiny": {"epochs": 6, "lr": 0.01, "shadow_images": 5000, "n_reference": 10},
                           "ci": {"epochs": 5, "lr": 0.01, "shadow_images": 1000, "batch_size": 64, "n_reference": 10}})
def badencoder(inputs: AttackInputs, cfg: BadEncoderConfig, ctx):
    model = inputs.clean_encoder.clone().to(ctx.device)
    clean = frozen_copy(model)
    shadow = inputs.pretrain_images
    if cfg.shadow_images and cfg.shadow_images < len(shadow):
        shadow = shadow[torch.randperm(len(shadow), generator=ctx.generator)[:cfg.shadow_images]]
    pick = torch.randperm(len(inputs.target_images), generator=ctx.generator)[:cfg.n_reference]
    refs = to_float(inputs.target_images[pick], ctx.device)
    ctx.record("reference_indices", pick.tolist())
    augment = SimCLRAugment(crop=False)

    model.train()
    freeze_batchnorm(model)
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batch_size = min(cfg.batch_size, len(shadow))
    for epoch in ctx.progress(range(cfg.epochs), desc="badencoder", total=cfg.epochs):
        totals = torch.zeros(3)
        batches = ctx.batches(len(shadow), batch_size)
        for idx in batches:
            x = to_float(shadow[idx], ctx.device)
            n_aug = max(1, len(x) // len(refs)) * len(refs)
            refs_aug = augment(refs.repeat(n_aug // len(refs), 1, 1, 1))
            loss, *parts = badencoder_loss(model, clean, x, inputs.trigger.apply(x), refs, refs_aug,
                                           cfg.lambda1, cfg.lambda2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            totals += torch.tensor([p.item() for p in parts])
        ctx.logger.debug("badencoder epoch %d L0/L1/L2 %s", epoch, (totals / len(batches)).tolist())
    ctx.record("final_losses", (totals / max(1, len(batches))).tolist())
    return model.eval()
