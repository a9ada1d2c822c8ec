"""FP — Fine-Pruning (Liu et al., RAID 2018), adapted to label-free encoders.

Rank the channels of the last stage (layer4, i.e. the dimensions of the pooled
feature) by mean activation on the clean images outside a hold-out; prune the
least active ones in steps of ``ratio_step`` while the mean cosine between
pruned and original features on the hold-out stays at or above
``min_similarity`` (capped at ``max_ratio``; ``prune_by="ratio"`` prunes exactly
``ratio``); then fine-tune with FT's recipe on the whole clean set. A channel is
pruned in the stage's residual stream: weight and bias zero in every BatchNorm
that writes into it (each block's ``bn2`` and the first block's downsample BN),
kept zero during fine-tuning by a parametrisation that is removed afterwards,
so the result is a plain :class:`Encoder` whose state_dict holds the zeros.
Records: stage, ratio, pruned channels, mean activations, similarity curve.

Parity with the reference: docs/methods/fp.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..encoders import Encoder, to_float
from .base import register_defense
from .ft import FTConfig, fine_tune


@dataclass
class FPConfig:
    # pruning
    prune_by: str = "similarity"  # "similarity" (label-free stopping rule) or "ratio" (fixed)
    ratio: float = 0.8             # pruned share of channels when prune_by == "ratio"
    max_ratio: float = 0.9         # cap for the similarity rule
    ratio_step: float = 0.01      # BackdoorBench's once_prune_ratio (the paper prunes one channel at a time)
    min_similarity: float = 0.9    # mean cos(pruned f(x), original f(x)) on held-out clean images
    holdout_fraction: float = 0.2
    stage: str = ""                # "": the encoder's last stage (layer4)
    # fine-tuning afterwards: FT's fields and defaults
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 0.5
    cosine: bool = True            # cosine learning-rate schedule, as FT

    def fine_tuning(self) -> FTConfig:
        return FTConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                        weight_decay=self.weight_decay, temperature=self.temperature, cosine=self.cosine)


# ----------------------------------------------------------------- channel ranking

@torch.no_grad()
def mean_activation(encoder: Encoder, images: torch.Tensor, stage: str, device, batch_size: int = 256) -> torch.Tensor:
    """Mean activation of each channel of ``stage`` over images and positions (C,)."""
    encoder.eval()
    total, n = None, 0
    for chunk in images.split(batch_size):
        out = encoder.stages(to_float(chunk, device))[stage].float()
        s = out.sum((0, 2, 3)) if out.ndim == 4 else out.sum(0)
        total = s if total is None else total + s
        n += out.shape[0] * (out[0, 0].numel() if out.ndim == 4 else 1)
    return (total / n).cpu()


def rank_channels(encoder: Encoder, images: torch.Tensor, stage: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, activation): channel indices from least to most active (ties by index), and the means."""
    act = mean_activation(encoder, images, stage, device)
    order = torch.sort(act, stable=True).indices
    return order, act


# ----------------------------------------------------------------- residual-stream pruning

def stream_batchnorms(encoder: Encoder, stage: str) -> list[nn.BatchNorm2d]:
    """The BatchNorms whose outputs are summed into ``stage``'s residual stream (ResNet blocks)."""
    layer = getattr(encoder.backbone, stage, None)
    if layer is None or not isinstance(layer, nn.Sequential):
        raise ValueError(f"FP needs a ResNet stage named {stage!r}; this encoder has {encoder.stage_names}")
    bns = []
    for i, block in enumerate(layer):
        if not isinstance(getattr(block, "bn2", None), nn.BatchNorm2d):
            raise ValueError(f"FP supports ResNet basic blocks; {stage}[{i}] has no bn2")
        bns.append(block.bn2)
        if block.downsample is not None:
            bns.append(block.downsample[-1])
        elif i == 0:
            raise ValueError(f"{stage}[0] has an identity shortcut: its channels come from the previous stage, "
                             "so they cannot be pruned within this stage")
    return bns


class ChannelMask(nn.Module):
    """Parametrisation ``w = w_orig * keep``: pruned channels stay exactly zero whatever the optimiser does."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.keep


def keep_vector(n_channels: int, pruned: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n_channels, dtype=like.dtype, device=like.device)
    keep[pruned.to(like.device)] = 0
    return keep


@torch.no_grad()
def prune_channels(encoder: Encoder, stage: str, pruned: torch.Tensor) -> None:
    """Zero weight and bias of ``pruned`` channels in every BN of the stage's residual stream (in place)."""
    for bn in stream_batchnorms(encoder, stage):
        bn.weight[pruned.to(bn.weight.device)] = 0
        bn.bias[pruned.to(bn.bias.device)] = 0


def attach_masks(encoder: Encoder, stage: str, pruned: torch.Tensor) -> None:
    """Zero the channels and keep them zero during training (parametrisation on weight and bias)."""
    prune_channels(encoder, stage, pruned)
    for bn in stream_batchnorms(encoder, stage):
        for name in ("weight", "bias"):
            keep = keep_vector(bn.num_features, pruned, getattr(bn, name))
            parametrize.register_parametrization(bn, name, ChannelMask(keep))


def detach_masks(encoder: Encoder, stage: str) -> None:
    """Remove the parametrisations, leaving the masked values: a plain state_dict again."""
    for bn in stream_batchnorms(encoder, stage):
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(bn, name):
                parametrize.remove_parametrizations(bn, name, leave_parametrized=True)


@torch.no_grad()
def _features(encoder: Encoder, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder.features(to_float(c, device)).float() for c in images.split(batch_size)])


@torch.no_grad()
def choose_ratio(encoder: Encoder, order: torch.Tensor, holdout: torch.Tensor, stage: str, cfg: FPConfig,
                 device) -> tuple[int, list[dict]]:
    """Number of channels to prune by the label-free similarity rule, and the curve it walked."""
    n_channels = len(order)
    reference = _features(encoder, holdout, device)
    trial = encoder.clone()
    steps = max(1, math.floor(cfg.max_ratio / cfg.ratio_step + 1e-9))
    chosen, curve = 0, []
    for i in range(1, steps + 1):
        k = min(n_channels - 1, round(i * cfg.ratio_step * n_channels))
        if k <= chosen:
            continue
        prune_channels(trial, stage, order[:k])
        sim = F.cosine_similarity(_features(trial, holdout, device), reference, dim=1).mean().item()
        curve.append({"ratio": k / n_channels, "n_pruned": k, "similarity": sim})
        if sim < cfg.min_similarity:
            break
        chosen = k
    return chosen, curve


def _validate(cfg: FPConfig) -> None:
    if cfg.prune_by not in ("similarity", "ratio"):
        raise ValueError(f"fp: prune_by must be 'similarity' or 'ratio', got {cfg.prune_by!r}")
    if not 0 <= cfg.ratio < 1 or not 0 <= cfg.max_ratio < 1:
        raise ValueError("fp: ratio and max_ratio must lie in [0, 1)")
    if cfg.ratio_step <= 0:
        raise ValueError("fp: ratio_step must be positive")
    if not 0 < cfg.holdout_fraction < 1:
        raise ValueError("fp: holdout_fraction must lie in (0, 1)")


@register_defense("fp", config=FPConfig,
                  summary="prune the least active layer4 channels (label-free stopping rule), then fine-tune",
                  profiles={"tiny": {"epochs": 12, "batch_size": 128},   # FT's budget at each profile
                            "ci": {"epochs": 5, "batch_size": 128}}, budget=("epochs",))
def fp(encoder: Encoder, clean, cfg: FPConfig, ctx) -> Encoder:
    _validate(cfg)
    device = ctx.device
    encoder = encoder.to(device).eval()
    stage = cfg.stage or encoder.stage_names[-1]
    images = clean.images
    perm = torch.randperm(len(images), generator=ctx.generator)
    n_hold = max(1, round(cfg.holdout_fraction * len(images))) if len(images) > 1 else 0
    holdout, ranking = images[perm[:n_hold]], images[perm[n_hold:]]
    if len(ranking) == 0:
        ranking = images

    order, act = rank_channels(encoder, ranking, stage, device)
    n_channels = len(order)
    if cfg.prune_by == "ratio":
        k, curve = min(n_channels - 1, round(cfg.ratio * n_channels)), []
    else:
        k, curve = choose_ratio(encoder, order, holdout if len(holdout) else images, stage, cfg, device)
    pruned = order[:k].sort().values
    ctx.record("fp_stage", stage)
    ctx.record("fp_ratio", k / n_channels)
    ctx.record("fp_n_pruned", int(k))
    ctx.record("fp_pruned_channels", pruned.tolist())
    ctx.record("fp_mean_activation", [round(v, 6) for v in act.tolist()])
    ctx.record("fp_similarity_curve", curve)
    ctx.logger.info("fp: pruning %d of %d %s channels (%.2f)", k, n_channels, stage, k / n_channels)

    attach_masks(encoder, stage, pruned)
    try:
        fine_tune(encoder, clean, cfg.fine_tuning(), ctx, desc="fp_ft")
    finally:
        detach_masks(encoder, stage)
    return encoder.eval()
