"""Losses shared by several defenses.

- ``nt_xent`` / ``contrastive_loss``: SimCLR's loss (re-exported from encoders),
- ``attention_map`` / ``attention_loss``: attention transfer, used by NAD and MIMIC:
  ``A(F) = sum_c |F_c|^p`` over channels, each sample's map divided by its L2 norm over H x W
  (+1e-6). ``form="code"`` (default; NAD's and MIMIC's reference code): the mean squared
  difference over batch and H x W. ``form="eq6"`` (MIMIC paper, Eq. 6): each sample's L2 norm
  of the difference, averaged over the batch; per sample ``eq6 = sqrt(H*W * code)``,
- ``cosine_distance``: ``1 - cos`` per sample, averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..encoders.simclr import contrastive_loss, nt_xent

__all__ = ["ATTENTION_FORMS", "attention_map", "attention_loss", "contrastive_loss", "cosine_distance", "nt_xent"]

ATTENTION_FORMS = ("code", "eq6")


def attention_map(feature_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """B x C x H x W -> B x (H*W), L2-normalised per sample."""
    am = feature_map.abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, form: str = "code") -> torch.Tensor:
    diff = attention_map(student, p) - attention_map(teacher, p)
    if form == "code":
        return diff.pow(2).mean()
    if form == "eq6":
        return torch.linalg.vector_norm(diff, dim=1).mean()
    raise ValueError(f"unknown attention form {form!r}; use one of {', '.join(ATTENTION_FORMS)}")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=1)).mean()
