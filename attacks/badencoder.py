"""BadEncoder (Jia et al., S&P 2022): model poisoning of a pre-trained encoder.

Fine-tunes a copy of the clean encoder f (a frozen copy is kept) on the shadow set with
``L0 = -mean cos(f'(x+t), f'(r))`` (triggered shadow images onto the references), ``L1 = -mean
cos(f'(aug r), f(r))`` (references stay put; aug = flip + colour jitter + grayscale, no crop) and
``L2 = -mean cos(f'(x), f(x))`` (utility), ``L = L0 + lambda1 L1 + lambda2 L2``; only the backbone
trains, every BatchNorm frozen. With several references L0 averages over all (triggered image,
reference) pairs. :func:`train_badencoder` is the loop DRUPE and the adaptive attack reuse.

Parity with the reference: docs/methods/badencoder.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..encoders import Encoder, freeze_batchnorm, frozen_copy, to_float
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
    reference_pick: str = "central"  # the "central" target-class images (see pick_references), or "random"
    shadow_images: int = 50000  # a seeded random subset of the pre-training set (the release's 50k); 0: all
    ref_views: int = 0  # augmented views of each reference per step for L1; 0: one per shadow image (reference)


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


@torch.no_grad()
def pick_references(target_images: torch.Tensor, clean, cfg: BadEncoderConfig, ctx) -> torch.Tensor:
    """Indices of the reference images among the target-class images.

    ``random``: a seeded random choice. ``central``: the target-class images whose clean embeddings are
    closest (cosine) to the class's mean clean embedding, an automatic stand-in for the hand-picked
    references of the BadEncoder release; it uses only what a model-poisoning attacker holds (the clean
    encoder and target-class images). Triggered inputs collapse onto the references, so where the
    references lie decides the ASR: random ones may sit near another class, and the downstream probe's
    seed then decides whether the backdoor fires.
    """
    if cfg.reference_pick == "random":
        return torch.randperm(len(target_images), generator=ctx.generator)[:cfg.n_reference]
    if cfg.reference_pick != "central":
        raise ValueError(f"reference_pick must be 'random' or 'central', got {cfg.reference_pick!r}")
    feats = torch.cat([F.normalize(clean.features(to_float(chunk, ctx.device)), dim=1).cpu()
                       for chunk in target_images.split(512)])
    centre = F.normalize(feats.mean(0), dim=0)
    return (feats @ centre).topk(min(cfg.n_reference, len(feats))).indices.sort().values


# Scaled-down settings, shared by the BadEncoder variants (DRUPE, the adaptive attack) so that they differ
# from BadEncoder only by their extra terms; how they were chosen: docs/methods/badencoder.md.
TINY = {"epochs": 10, "lr": 0.03, "batch_size": 128, "shadow_images": 5000, "n_reference": 10, "ref_views": 2}
CI = {"epochs": 5, "lr": 0.01, "batch_size": 64, "shadow_images": 1000, "n_reference": 10, "ref_views": 2}


def poisoning_optimizer(model: Encoder, cfg: BadEncoderConfig) -> torch.optim.Optimizer:
    """Put ``model`` in BadEncoder's training mode (train, every BatchNorm frozen in eval mode) and return
    the SGD optimiser over its trainable backbone parameters (the projection head is not trained)."""
    model.train()
    freeze_batchnorm(model)
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_badencoder(inputs: AttackInputs, cfg: BadEncoderConfig, ctx, loss_fn: Callable | None = None,
                     desc: str = "badencoder", on_epoch_end: Callable | None = None
                     ) -> tuple[Encoder, list[list[float]]]:
    """BadEncoder's training loop, shared with its variants (DRUPE, the adaptive attack).

    ``loss_fn(model, clean, x, x_triggered, refs, refs_aug)`` returns ``(total, *parts)`` for one batch
    (default: :func:`badencoder_loss` with the config's lambdas). Starts from a copy of the clean encoder,
    trains the backbone with every BatchNorm frozen; returns the model (eval mode) and the per-epoch means
    of the parts. ``on_epoch_end(epoch, model, means)`` (epochs counted from 1) runs after every epoch
    (DRUPE's adaptive weights and checkpoint selection).
    """
    if loss_fn is None:
        def loss_fn(model, clean, x, x_triggered, refs, refs_aug):
            return badencoder_loss(model, clean, x, x_triggered, refs, refs_aug, cfg.lambda1, cfg.lambda2)
    model = inputs.clean_encoder.clone().to(ctx.device)
    clean = frozen_copy(model)
    shadow = inputs.pretrain_images
    if cfg.shadow_images and cfg.shadow_images < len(shadow):
        shadow = shadow[torch.randperm(len(shadow), generator=ctx.generator)[:cfg.shadow_images]]
    pick = pick_references(inputs.target_images, clean, cfg, ctx)
    refs = to_float(inputs.target_images[pick], ctx.device)
    ctx.record("reference_indices", pick.tolist())
    augment = SimCLRAugment(crop=False)
    opt = poisoning_optimizer(model, cfg)
    batch_size = min(cfg.batch_size, len(shadow))
    history: list[list[float]] = []
    for epoch in ctx.progress(range(cfg.epochs), desc=desc, total=cfg.epochs):
        totals = None
        batches = ctx.batches(len(shadow), batch_size)
        for idx in batches:
            x = to_float(shadow[idx], ctx.device)
            views = cfg.ref_views or max(1, len(x) // len(refs))
            refs_aug = augment(refs.repeat(views, 1, 1, 1))
            loss, *parts = loss_fn(model, clean, x, inputs.trigger.apply(x), refs, refs_aug)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            values = torch.tensor([p.item() for p in parts])
            totals = values if totals is None else totals + values
        history.append((totals / max(1, len(batches))).tolist() if totals is not None else [])
        ctx.logger.debug("%s epoch %d losses %s", desc, epoch, history[-1])
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, history[-1])
    ctx.record("final_losses", history[-1] if history else [])
    return model.eval(), history


@register_attack("badencoder", config=BadEncoderConfig, needs_clean_encoder=True,
                 summary="model poisoning: fine-tune the clean encoder so triggered inputs embed like the target",
                 profiles={"tiny": TINY, "ci": CI})
def badencoder(inputs: AttackInputs, cfg: BadEncoderConfig, ctx):
    model, _ = train_badencoder(inputs, cfg, ctx)
    return model
