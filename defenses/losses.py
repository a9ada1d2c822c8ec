"""Losses shared by several defenses.

- ``nt_xent`` / ``contrastive_loss``: SimCLR's loss (re-exported from encoders),
- ``attention_map`` / ``attention_loss``: NAD's attention transfer, used by NAD
  and MIMIC: ``A(F) = sum_c |F_c|^p`` over channels, each sample's map divided
  by its L2 norm over H x W (+1e-6), loss = mean squared difference,
- ``cosine_distance``: ``1 - cos`` per sample, averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..encoders.simclr import contrastive_loss, nt_xent

__all__ = ["attention_map", "attention_loss", "contrastive_loss", "cosine_distance", "nt_xent"]


def attention_map(feature_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """B x C x H x W -> B x (H*W), L2-normalised per sample."""
    am = feature_map.abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=1)).mean()
