"""FT: continue SimCLR training of all weights on the defender's clean set.

Same augmentations and NT-Xent loss as pre-training; SGD (momentum 0.9, wd 5e-4)
at lr 0.01 with a cosine schedule, 100 epochs, batch 256. Label-free as it
stands. ``fine_tune`` is reused by FP (its fine-tuning phase).

Parity with the reference: docs/methods/ft.md
"""
from __future__ import annotations

from dataclasses import dataclass

from ..encoders import SimCLRConfig, train_simclr
from .base import register_defense


@dataclass
class FTConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 0.5
    cosine: bool = True

    def recipe(self) -> SimCLRConfig:
        return SimCLRConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                            weight_decay=self.weight_decay, temperature=self.temperature,
                            optimizer="sgd", momentum=self.momentum, cosine=self.cosine)


def fine_tune(encoder, clean, cfg: FTConfig, ctx, desc: str = "ft"):
    """Contrastive fine-tuning in place; other defenses reuse it (FP, NAD's teacher)."""
    history = train_simclr(encoder, clean.images, cfg.recipe(), ctx, desc=desc)
    ctx.record(f"{desc}_loss", history)
    return encoder.eval()


@register_defense("ft", config=FTConfig, summary="fine-tune all weights with SimCLR on the clean set",
                  profiles={"tiny": {"epochs": 12, "batch_size": 128}, "ci": {"epochs": 5, "batch_size": 128}},
                  budget=("epochs",))
def ft(encoder, clean, cfg: FTConfig, ctx):
    return fine_tune(encoder, clean, cfg, ctx)
