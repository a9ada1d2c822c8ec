"""NAD — Neural Attention Distillation (Li et al., ICLR 2021), adapted to label-free encoders.

Teacher: the suspect fine-tuned for ``teacher_epochs`` with NAD's own training
loop and no attention term (the reference's "beta = 0" run), then frozen.
Student: the suspect trained for ``epochs`` on NT-Xent (two SimCLR views of each
clean image, through its projection head) plus ``sum_l beta_l AT(student_l,
teacher_l)`` on the stage outputs ``at_stages`` (layer2..layer4; attention map
``sum_c |F_c|^p`` per position, L2-normalised per sample, mean squared
difference). Both runs use SGD (momentum 0.9, Nesterov, wd 1e-4), batch 64,
lr ``lr`` for the first ``lr_drop_epoch`` epochs then ``lr_after`` (0.1 ->
0.01), at every profile. The student runs in train mode, the teacher in eval
mode under ``no_grad``; each network does one forward pass per step.
Records: the teacher's loss curve, the attention distance to the teacher before
and after, and the per-epoch attention (total and per stage) and NT-Xent curves.

Parity with the reference: docs/methods/nad.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoders import Encoder, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from .base import register_defense
from .losses import attention_loss, nt_xent


@dataclass
class NADConfig:
    teacher_epochs: int = 10   # NAD README: the teacher is fine-tuned for 5-10 epochs (BackdoorBench: 10)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    lr_after: float = 0.01
    lr_drop_epoch: int = 2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    at_stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    p: float = 2.0
    temperature: float = 0.5

    def lr_at(self, epoch: int) -> float:
        """NAD's schedule (``adjust_learning_rate``): lr before ``lr_drop_epoch``, lr_after from then on."""
        return self.lr if epoch < self.lr_drop_epoch else self.lr_after


def _validate(cfg: NADConfig, encoder: Encoder) -> None:
    if len(cfg.at_stages) != len(cfg.betas):
        raise ValueError(f"nad: at_stages ({len(cfg.at_stages)}) and betas ({len(cfg.betas)}) differ in length")
    unknown = [s for s in cfg.at_stages if s not in encoder.stage_names]
    if unknown:
        raise ValueError(f"nad: unknown stages {unknown}; this encoder has {list(encoder.stage_names)}")


def make_teacher(encoder: Encoder, clean, cfg: NADConfig, ctx) -> Encoder:
    """The suspect fine-tuned with NAD's loop and no attention term (the reference's beta = 0), then frozen."""
    teacher = encoder.clone().to(ctx.device)
    history = train(teacher, None, clean, cfg, ctx, cfg.teacher_epochs, desc="nad_teacher")
    ctx.record("nad_teacher_loss", history["nt_xent"])
    return frozen_copy(teacher)


def attention_terms(student_stages: dict, teacher_stages: dict, cfg: NADConfig) -> list[torch.Tensor]:
    """Unweighted AT(student_l, teacher_l) for each configured stage."""
    return [attention_loss(student_stages[s], teacher_stages[s], cfg.p) for s in cfg.at_stages]


@torch.no_grad()
def attention_distance(student: Encoder, teacher: Encoder, images: torch.Tensor, cfg: NADConfig, device,
                       batch_size: int = 256) -> float:
    """beta-weighted attention loss between two encoders on clean images, both in eval mode."""
    was_training = student.training
    student.eval()
    total, n = 0.0, 0
    for chunk in images.split(batch_size):
        x = to_float(chunk, device)
        terms = attention_terms(student.stages(x), teacher.stages(x), cfg)
        total += sum(b * t.item() for b, t in zip(cfg.betas, terms)) * len(chunk)
        n += len(chunk)
    student.train(was_training)
    return total / max(1, n)


def make_optimizer(model: Encoder, cfg: NADConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr_at(0), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)


def step(student: Encoder, teacher: Encoder | None, views: torch.Tensor, cfg: NADConfig,
         opt: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One update of ``student`` on stacked views (2B images: both views of B images).

    Loss: NT-Xent of the two views' projections, plus ``sum_l beta_l AT_l`` against the frozen
    ``teacher`` when one is given (the teacher's stages under ``no_grad``); one backward, one
    optimiser step. Returns (NT-Xent, weighted attention total, unweighted per-stage attention
    terms) for the caller's records. The reference-trace test (tests/reference/test_nad.py) drives it.
    """
    s = student.stages(views)
    z = student.head(s["feature"])
    l_con = nt_xent(*z.chunk(2), temperature=cfg.temperature)
    l_at, terms = torch.zeros((), device=views.device), []
    if teacher is not None:
        with torch.no_grad():
            t = teacher.stages(views)
        terms = attention_terms(s, t, cfg)
        l_at = sum(b * term for b, term in zip(cfg.betas, terms))
    loss = l_con + l_at
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return l_con, l_at, terms


def train(student: Encoder, teacher: Encoder | None, clean, cfg: NADConfig, ctx, epochs: int,
          desc: str = "nad") -> dict[str, list]:
    """NAD's training loop on ``student`` in place: NT-Xent, plus the attention term when a teacher is given.

    Returns per-epoch means: ``nt_xent``, ``lr`` and, with a teacher, ``at`` and ``at_<stage>``.
    """
    device = ctx.device
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    augment = SimCLRAugment()
    opt = make_optimizer(student, cfg)
    images = clean.images
    batch_size = min(cfg.batch_size, len(images))
    stages = cfg.at_stages if teacher is not None else ()
    history = {"nt_xent": [], "lr": []}
    if teacher is not None:
        history.update({"at": [], **{f"at_{s}": [] for s in stages}})
    for epoch in ctx.progress(range(epochs), desc=desc, total=epochs):
        lr = cfg.lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        sums = torch.zeros(2 + len(stages))
        batches = ctx.batches(len(images), batch_size)
        for idx in batches:
            x = to_float(images[idx], device)
            l_con, l_at, terms = step(student, teacher, torch.cat([augment(x), augment(x)]), cfg, opt)
            sums += torch.tensor([l_at.item(), l_con.item(), *[term.item() for term in terms]])
        mean = (sums / max(1, len(batches))).tolist()
        history["nt_xent"].append(mean[1])
        history["lr"].append(lr)
        if teacher is not None:
            history["at"].append(mean[0])
            for name, value in zip(stages, mean[2:]):
                history[f"at_{name}"].append(value)
        ctx.logger.debug("%s epoch %d lr %g at %.4f nt_xent %.4f", desc, epoch, lr, mean[0], mean[1])
    return history


def distill(student: Encoder, teacher: Encoder, clean, cfg: NADConfig, ctx) -> dict[str, list]:
    """Train ``student`` in place against the frozen ``teacher``; returns per-epoch loss curves."""
    return train(student, teacher, clean, cfg, ctx, cfg.epochs, desc="nad")


@register_defense("nad", config=NADConfig,
                  summary="distil attention maps of a fine-tuned teacher into the suspect, with NT-Xent as task loss",
                  profiles={"tiny": {"teacher_epochs": 5, "epochs": 10},
                            "ci": {"teacher_epochs": 3, "epochs": 3}}, budget=("teacher_epochs", "epochs"))
def nad(encoder: Encoder, clean, cfg: NADConfig, ctx) -> Encoder:
    _validate(cfg, encoder)
    encoder = encoder.to(ctx.device)
    teacher = make_teacher(encoder, clean, cfg, ctx)
    n_probe = min(len(clean.images), 256)
    ctx.record("nad_at_before", attention_distance(encoder, teacher, clean.images[:n_probe], cfg, ctx.device))
    history = distill(encoder, teacher, clean, cfg, ctx)
    ctx.record("nad_at_after", attention_distance(encoder, teacher, clean.images[:n_probe], cfg, ctx.device))
    for key, curve in history.items():
        ctx.record("nad_lr" if key == "lr" else f"nad_{key}_loss", curve)
    return encoder.eval()
