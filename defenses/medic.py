"""MEDIC (Xu et al., CVPR 2023): importance-driven cloning into a fresh model, adapted to encoders.

The student is ``encoder.empty_like()`` (same architecture, random weights);
the teacher is the suspect, frozen in eval mode and never modified. Per-channel
teacher statistics mu, sigma of every hooked layer are pooled over
``stat_batches`` batches of augmented clean views (exact mean and variance over
all samples and positions; the reference's "exact" mode averages per-batch
variances instead). Each step, for two SimCLR views of the batch:

- importance ``w = sqrt(softmax(T h^) * softmax(T g sigma))``, both softmaxes
  over all C x H x W elements of a sample, ``h^ = (h_t - mu) / sigma`` and g
  the gradient of the teacher's loss w.r.t. the teacher activation ``h_t``;
- clone loss ``sum_layers mean_b sum w * ((h_t - h_s) / sigma)^2``;
- total ``NT-Xent(student) + clone_weight * clone + feature_weight *
  (1 - cos(f_s, f_t))`` on the backbone features.

Encoder adaptation: the task loss is the student's own NT-Xent on the two
views; the teacher's loss (for g) is the teacher's NT-Xent on the same views
(``teacher_loss="cosine"``: ``1 - cos`` between the two views' features
instead). The teacher loss is summed over samples rather than averaged, so g
is each sample's own gradient scale and does not shrink with the batch size
(with a batch mean, ``T g sigma`` is ~1e-4 and its softmax is uniform, as
happens in the reference). The final-feature cosine term is the encoder
adaptation the spec asks for (a classifier's logits have no counterpart).

Layers (``layers``): ``"conv"`` (default, the reference's ``--hook-plane
conv``) hooks the output of every Conv2d of the backbone (20 in ResNet-18,
conv1 + 16 block convs + 3 shortcut convs); ``"bn"`` every BatchNorm2d output
instead (the same positions after the affine normalisation); ``"stages"`` only
layer1..layer4 from the encoder's ``stages()`` (4 tensors, a cheaper variant
that skips the importance weighting inside the blocks). Forward hooks are
registered once per model, collect only inside a ``capture()`` block, and are
removed before returning.

Reference defaults: lambda (``clone_weight``) 10, T 5, Adam lr 0.01 with
weight decay 1e-4 and a cosine schedule, 60 epochs, batch 64, statistics from
~100 batches, 5% clean data. ``tiny``/``ci`` cut the epochs and statistic
batches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Encoder, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from ..encoders.simclr import nt_xent
from .base import register_defense

LAYER_CHOICES = ("conv", "bn", "stages")


@dataclass
class MedicConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    cosine: bool = True
    clone_weight: float = 10.0  # lambda
    importance_temperature: float = 5.0  # T
    feature_weight: float = 1.0
    temperature: float = 0.5  # NT-Xent
    stat_batches: int = 100
    layers: str = "conv"  # conv | bn | stages
    teacher_loss: str = "ntxent"  # ntxent | cosine


class ActivationTap:
    """Forward hooks registered once; outputs are kept only inside ``capture()``."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor] = []
        self.active = False
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        if self.active:
            self.outputs.append(output)

    @contextlib.contextmanager
    def capture(self):
        self.outputs, self.active = [], True
        try:
            yield self.outputs
        finally:
            self.active = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _hooked_modules(encoder: Encoder, layers: str) -> list[nn.Module]:
    kind = {"conv": nn.Conv2d, "bn": nn.modules.batchnorm._BatchNorm}[layers]
    return [m for m in encoder.backbone.modules() if isinstance(m, kind)]


def activations(encoder: Encoder, x: torch.Tensor, layers: str, tap: ActivationTap | None):
    """(hooked outputs, backbone feature) from one forward pass."""
    if layers == "stages":
        out = encoder.stages(x)
        return [out[name] for name in encoder.stage_names], out["feature"]
    with tap.capture() as outputs:
        feature = encoder.features(x)
    return list(outputs), feature


@torch.no_grad()
def teacher_statistics(teacher: Encoder, images: torch.Tensor, cfg: MedicConfig, ctx, tap, augment):
    """Per-channel (mu, sigma) of every hooked layer, pooled over ``stat_batches`` batches."""
    sums = sq = count = None
    batch_size = min(cfg.batch_size, len(images))
    done = 0
    while done < cfg.stat_batches:
        for idx in ctx.batches(len(images), batch_size):
            acts, _ = activations(teacher, augment(to_float(images[idx], ctx.device)), cfg.layers, tap)
            dims = [(0, 2, 3) if a.ndim == 4 else (0,) for a in acts]
            if sums is None:
                sums = [torch.zeros(a.shape[1], dtype=torch.float64, device=a.device) for a in acts]
                sq = [torch.zeros_like(s) for s in sums]
                count = [0] * len(acts)
            for i, (a, d) in enumerate(zip(acts, dims)):
                a = a.double()
                sums[i] += a.sum(d)
                sq[i] += a.pow(2).sum(d)
                count[i] += a.numel() // a.shape[1]
            done += 1
            if done >= cfg.stat_batches:
                break
    stats = []
    for s, q, n in zip(sums, sq, count):
        mu = s / n
        sigma = (q / n - mu.pow(2)).clamp_min(0).sqrt().clamp_min(1e-5)
        shape = (1, -1, 1, 1)
        stats.append((mu.float().view(shape), sigma.float().view(shape)))
    return stats


def importance(h_t: torch.Tensor, g: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, T: float) -> torch.Tensor:
    """``sqrt(softmax(T h^) * softmax(T g sigma))`` over each sample's C x H x W elements."""
    b = h_t.shape[0]
    a = F.softmax(T * ((h_t - mu) / sigma).reshape(b, -1), dim=1)
    c = F.softmax(T * (g * sigma).reshape(b, -1), dim=1)
    return (a * c).sqrt().reshape(h_t.shape)


def _teacher_loss(teacher: Encoder, feature: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    n = feature.shape[0]  # summed over samples (see the module docstring)
    if kind == "ntxent":
        return nt_xent(*teacher.head(feature).chunk(2), temperature=temperature) * n
    if kind == "cosine":
        f1, f2 = feature.chunk(2)
        return (1 - F.cosine_similarity(f1, f2, dim=1)).sum() * 2
    raise ValueError(f"unknown MEDIC teacher_loss {kind!r}; use ntxent or cosine")


def medic_step_losses(student, teacher, views, stats, cfg: MedicConfig, taps):
    """(total, nt-xent, clone, feature) for one batch of stacked views (2B images)."""
    # teacher: activations with gradients of its own loss, no parameter gradients
    x_t = views.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        acts_t, feat_t = activations(teacher, x_t, cfg.layers, taps[0])
        grads = torch.autograd.grad(_teacher_loss(teacher, feat_t, cfg.teacher_loss, cfg.temperature), acts_t)
    acts_t = [a.detach() for a in acts_t]
    feat_t = feat_t.detach()
    with torch.no_grad():
        weights = [importance(h, g, mu, sigma, cfg.importance_temperature)
                   for h, g, (mu, sigma) in zip(acts_t, grads, stats)]
    # student
    acts_s, feat_s = activations(student, views, cfg.layers, taps[1])
    task = nt_xent(*student.head(feat_s).chunk(2), temperature=cfg.temperature)
    clone = sum((w * ((h_t - h_s) / sigma).pow(2)).flatten(1).sum(1).mean()
                for w, h_t, h_s, (_, sigma) in zip(weights, acts_t, acts_s, stats))
    feature = (1 - F.cosine_similarity(feat_s, feat_t, dim=1)).mean()
    total = task + cfg.clone_weight * clone + cfg.feature_weight * feature
    return total, task, clone, feature


@register_defense("medic", config=MedicConfig,
                  summary="clone the suspect into a random-init student, weighting layers by importance (MEDIC)",
                  profiles={"tiny": {"epochs": 12, "stat_batches": 10},
                            "ci": {"epochs": 3, "stat_batches": 3}})
def medic(encoder, clean, cfg: MedicConfig, ctx):
    if cfg.layers not in LAYER_CHOICES:
        raise ValueError(f"unknown MEDIC layers {cfg.layers!r}; use one of {', '.join(LAYER_CHOICES)}")
    device = ctx.device
    teacher = frozen_copy(encoder).to(device)
    student = encoder.empty_like().to(device).train()
    taps = (None, None) if cfg.layers == "stages" else \
        (ActivationTap(_hooked_modules(teacher, cfg.layers)), ActivationTap(_hooked_modules(student, cfg.layers)))
    augment = SimCLRAugment()
    images = clean.images
    batch_size = min(cfg.batch_size, len(images))
    try:
        stats = teacher_statistics(teacher, images, cfg, ctx, taps[0], augment)
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * max(1, len(images) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if cfg.cosine else None
        history = {"loss": [], "ntxent": [], "clone": [], "feature": []}
        for _ in ctx.progress(range(cfg.epochs), desc="medic", total=cfg.epochs):
            totals = torch.zeros(4)
            batches = ctx.batches(len(images), batch_size)
            for idx in batches:
                x = to_float(images[idx], device)
                views = torch.cat([augment(x), augment(x)])
                losses = medic_step_losses(student, teacher, views, stats, cfg, taps)
                opt.zero_grad(set_to_none=True)
                losses[0].backward()
                opt.step()
                if sched is not None:
                    sched.step()
                totals += torch.tensor([v.item() for v in losses])
            for key, value in zip(history, (totals / max(1, len(batches))).tolist()):
                history[key].append(value)
        ctx.record("medic_layers", cfg.layers)
        ctx.record("medic_n_hooked", len(stats))
        for key, values in history.items():
            ctx.record(f"medic_{key}", values)
    finally:
        for tap in taps:
            if tap is not None:
                tap.remove()
    return student.eval()
