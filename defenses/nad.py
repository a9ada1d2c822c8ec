"""NAD — Neural Attention Distillation (Li et al., ICLR 2021), adapted to label-free encoders.

Reference (bboylyg/NAD): the teacher is the suspect model fine-tuned on the
clean data (5-10 epochs); the student is the suspect model trained with the
task loss plus ``sum_l beta_l * AT(student_l, teacher_l)`` on the last three
residual groups, ``beta = 500/1000/1000``, attention maps with ``p = 2``;
teacher frozen; SGD (momentum 0.9, Nesterov, wd 1e-4), lr 0.1 for 2 epochs
then 0.01, 20 epochs, batch 64, 5% of the training data.

Encoder adaptation:

- Teacher = FT: the suspect encoder after ``teacher_epochs`` of contrastive
  fine-tuning on the clean set (FT's recipe, :func:`defenses.ft.fine_tune`),
  then frozen (eval mode, no gradients, run under ``no_grad``).
- Task loss = NT-Xent on two SimCLR views of each clean image through the
  student's projection head. The attention term compares student and teacher
  stage outputs on the same two views; each network runs ONE forward pass per
  step (``Encoder.stages``), the teacher's without gradients.
- Attention on the stages with spatial extent: ``layer2..layer4`` by default
  (``at_stages``/``betas`` are configurable; the pooled feature is 1x1 and its
  normalised attention map is constant, so it carries no signal).
- Learning rate: NAD's 0.1 -> 0.01 was tuned for classifiers trained from
  scratch with SGD at lr 0.1, where the task loss is near zero and the
  attention term dominates. Here NT-Xent stays large, and with beta =
  500/1000/1000 the distillation objective itself is unstable at that scale:
  on the ci BadEncoder encoder (width 16) the weighted attention loss rose
  from 2.7 to a first-epoch mean of 20 at lr 0.1 (9 at lr 0.01, 1.8 at lr
  0.001) before falling, and after 6 epochs both terms ended worse
  than at lr 0.001 (attention 5.3 / 2.3 / 0.75, clean NT-Xent 4.43 / 4.20 /
  4.10 for lr 0.1 / 0.01 / 0.001). The default keeps NAD's schedule shape
  (x0.1 after 2 epochs) two decades lower: 0.001 -> 0.0001, where both terms
  fall from the first epoch. ``lr=0.1, lr_after=0.01`` restores the
  original. The choice rests on the clean-set losses only, never on ASR;
  wider encoders (width 64) have smaller attention gradients per channel and
  may tolerate a larger lr.
- The attention-loss curve (per epoch, beta-weighted sum and per stage) and the
  contrastive loss are kept with ``ctx.record``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoders import Encoder, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from .base import register_defense
from .ft import FTConfig, fine_tune
from .losses import attention_loss, nt_xent


@dataclass
class NADConfig:
    # teacher: FT on the clean set
    teacher_epochs: int = 10
    teacher_batch_size: int = 256
    teacher_lr: float = 0.01
    # student: NT-Xent + attention distillation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.001         # NAD: 0.1 (see the module docstring)
    lr_after: float = 0.0001  # NAD: 0.01
    lr_drop_epoch: int = 2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    at_stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    p: float = 2.0
    temperature: float = 0.5

    def teacher_recipe(self) -> FTConfig:
        return FTConfig(epochs=self.teacher_epochs, batch_size=self.teacher_batch_size, lr=self.teacher_lr,
                        temperature=self.temperature)


def _validate(cfg: NADConfig, encoder: Encoder) -> None:
    if len(cfg.at_stages) != len(cfg.betas):
        raise ValueError(f"nad: at_stages ({len(cfg.at_stages)}) and betas ({len(cfg.betas)}) differ in length")
    unknown = [s for s in cfg.at_stages if s not in encoder.stage_names]
    if unknown:
        raise ValueError(f"nad: unknown stages {unknown}; this encoder has {list(encoder.stage_names)}")


def make_teacher(encoder: Encoder, clean, cfg: NADConfig, ctx) -> Encoder:
    """The suspect fine-tuned with FT on the clean set, then frozen."""
    teacher = encoder.clone().to(ctx.device)
    fine_tune(teacher, clean, cfg.teacher_recipe(), ctx, desc="nad_teacher")
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


def distill(student: Encoder, teacher: Encoder, clean, cfg: NADConfig, ctx) -> dict[str, list]:
    """Train ``student`` in place against the frozen ``teacher``; returns per-epoch loss curves."""
    device = ctx.device
    student.to(device).train()
    teacher.to(device).eval()
    augment = SimCLRAugment()
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    images = clean.images
    batch_size = min(cfg.batch_size, len(images))
    history = {"at": [], "nt_xent": [], **{f"at_{s}": [] for s in cfg.at_stages}}
    for epoch in ctx.progress(range(cfg.epochs), desc="nad", total=cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr if epoch < cfg.lr_drop_epoch else cfg.lr_after
        sums = torch.zeros(2 + len(cfg.at_stages))
        batches = ctx.batches(len(images), batch_size)
        for idx in batches:
            x = to_float(images[idx], device)
            views = torch.cat([augment(x), augment(x)])
            s = student.stages(views)
            with torch.no_grad():
                t = teacher.stages(views)
            z = student.head(s["feature"])
            l_con = nt_xent(*z.chunk(2), temperature=cfg.temperature)
            terms = attention_terms(s, t, cfg)
            l_at = sum(b * term for b, term in zip(cfg.betas, terms))
            loss = l_con + l_at
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.tensor([float(l_at.detach()) if torch.is_tensor(l_at) else float(l_at), l_con.item(),
                                  *[term.item() for term in terms]])
        mean = (sums / max(1, len(batches))).tolist()
        history["at"].append(mean[0])
        history["nt_xent"].append(mean[1])
        for name, value in zip(cfg.at_stages, mean[2:]):
            history[f"at_{name}"].append(value)
        ctx.logger.debug("nad epoch %d at %.4f nt_xent %.4f", epoch, mean[0], mean[1])
    return history


@register_defense("nad", config=NADConfig,
                  summary="distil attention maps of an FT teacher into the suspect, with NT-Xent as task loss",
                  profiles={"tiny": {"teacher_epochs": 5, "teacher_batch_size": 128, "epochs": 10},
                            "ci": {"teacher_epochs": 2, "teacher_batch_size": 128, "epochs": 2}})
def nad(encoder: Encoder, clean, cfg: NADConfig, ctx) -> Encoder:
    _validate(cfg, encoder)
    encoder = encoder.to(ctx.device)
    teacher = make_teacher(encoder, clean, cfg, ctx)
    n_probe = min(len(clean.images), 256)
    ctx.record("nad_at_before", attention_distance(encoder, teacher, clean.images[:n_probe], cfg, ctx.device))
    history = distill(encoder, teacher, clean, cfg, ctx)
    ctx.record("nad_at_after", attention_distance(encoder, teacher, clean.images[:n_probe], cfg, ctx.device))
    for key, curve in history.items():
        ctx.record(f"nad_{key}_loss", curve)
    return encoder.eval()
