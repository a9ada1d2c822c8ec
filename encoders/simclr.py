"""SimCLR: the NT-Xent loss and the contrastive training loop.

The loop is shared by clean pre-training, BASSL/CTRL (pre-training on poisoned
data) and the FT defense (continued training on the clean set).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import SimCLRAugment
from .base import Encoder
from .runtime import RunContext, to_float


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross entropy over 2B views; (z1[i], z2[i]) are positives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def contrastive_loss(encoder: Encoder, x: torch.Tensor, augment: SimCLRAugment,
                     temperature: float) -> torch.Tensor:
    """NT-Xent of two augmented views of ``x`` through the projection head, one forward pass."""
    views = torch.cat([augment(x), augment(x)])
    z = encoder.project(views)
    return nt_xent(*z.chunk(2), temperature=temperature)


@dataclass
class SimCLRConfig:
    epochs: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.5
    optimizer: str = "adam"  # adam (pre-training reference) or sgd (FT reference)
    momentum: float = 0.9
    cosine: bool = False


def make_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float = 0.9):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adam or sgd")


def train_simclr(encoder: Encoder, images: torch.Tensor, cfg: SimCLRConfig, ctx: RunContext,
                 desc: str = "simclr") -> list[float]:
    """Train ``encoder`` in place on uint8 images (N x 3 x H x W); returns the mean loss per epoch."""
    encoder.to(ctx.device).train()
    augment = SimCLRAugment()
    opt = make_optimizer(encoder.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    batch_size = min(cfg.batch_size, len(images))
    steps_per_epoch = max(1, len(images) // batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
             if cfg.cosine else None)
    history = []
    for epoch in ctx.progress(range(cfg.epochs), desc=desc, total=cfg.epochs):
        total = 0.0
        batches = ctx.batches(len(images), batch_size)
        for idx in batches:
            loss = contrastive_loss(encoder, to_float(images[idx], ctx.device), augment, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item()
        history.append(total / max(1, len(batches)))
        ctx.logger.debug("%s epoch %d loss %.4f", desc, epoch, history[-1])
    return history
