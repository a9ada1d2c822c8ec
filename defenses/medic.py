"""MEDIC (Xu et al., CVPR 2023): importance-driven cloning into a fresh model, adapted to encoders.

The student is ``encoder.empty_like()``; the teacher is the suspect, frozen in eval mode. Per-channel
teacher statistics (mu, sigma) of every hooked site come from one pass over the augmented clean set
(at most ``stat_batches`` batches; per-batch means and unbiased variances averaged with batch-size
weights, the reference's "exact" mode). Each step, on two SimCLR views of the batch:

- importance ``w = sqrt(softmax(T h^) * softmax(T g sigma))`` over each sample's C x H x W elements,
  ``h^ = (h - mu) / (sigma + 1e-5)``, g = gradient of the teacher's own loss (NT-Xent, batch mean)
  w.r.t. the compared teacher value;
- clone ``sum_sites mean_b sum w * ((v_t - v_s) / sigma)^2``;
- total ``NT-Xent(student) + clone_weight * clone + feature_weight * (1 - cos(f_s, f_t))``.

Sites (``layers``): ``conv+bn`` (default) the main-path Conv2d and BatchNorm2d outputs of the
backbone (shortcut convs/BNs excluded, as in the reference). With ``bn_after_relu`` a BN output is
compared (v, g) where the reference's in-place operations leave its stored tensor (its hooked ResNet,
``models/resnet_tv.py``): a BN that feeds a ReLU after that ReLU, a block's bn2 after ``out += identity``
and the ReLU, i.e. at the block's output; h^, mu, sigma stay on the BN output.
Adam, cosine annealing stepped once per epoch; batches keep the last partial batch.

Parity with the reference: docs/methods/medic.md
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Encoder, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from ..encoders.resnet import BasicBlock, ResNet18Backbone
from ..encoders.simclr import nt_xent
from .base import register_defense

LAYER_CHOICES = ("conv+bn", "conv", "bn", "stages")
EPS = 1e-5  # the reference's Norm eps: h^ = (h - mu) / (sigma + eps); also the floor of the sigma divisor
STAT_VAR_PRIOR, STAT_COUNT_PRIOR = 1.0, 1e-5  # hook.py Norm("exact"): running_var starts at ones, cnt at 1e-5


@dataclass
class MedicConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    cosine: bool = True  # CosineAnnealingLR over `epochs`, stepped per epoch (reference --converge)
    clone_weight: float = 10.0  # lambda (--hookweight)
    importance_temperature: float = 5.0  # T (--imp_temp)
    feature_weight: float = 1.0  # encoder adaptation: 1 - cos(f_s, f_t)
    temperature: float = 0.5  # NT-Xent
    stat_batches: int = 101  # one pass over the clean set, at most this many batches (reference: idx > 100)
    layers: str = "conv+bn"  # conv+bn (reference README) | conv (reference argparse default) | bn | stages
    bn_after_relu: bool = True  # compare BN sites where the reference's in-place ReLU / += identity leave them
    teacher_loss: str = "ntxent"  # ntxent | cosine
    teacher_reduction: str = "mean"  # mean over samples (reference) | sum (per-sample gradient scale)

    def validate(self) -> None:
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"unknown MEDIC layers {self.layers!r}; use one of {', '.join(LAYER_CHOICES)}")
        if self.teacher_loss not in ("ntxent", "cosine"):
            raise ValueError(f"unknown MEDIC teacher_loss {self.teacher_loss!r}; use ntxent or cosine")
        if self.teacher_reduction not in ("mean", "sum"):
            raise ValueError(f"unknown MEDIC teacher_reduction {self.teacher_reduction!r}; use mean or sum")


# ----------------------------------------------------------------- hook sites

def _value_sources(backbone: nn.Module) -> dict[nn.Module, tuple[nn.Module, str]]:
    """BatchNorm -> (module, "input" | "output") holding what the reference's in-place operations turn that
    BN's stored output into, for the ResNet-18 here: the stem BN -> ReLU -> the input of ``layer1[0]``; a
    block's bn1 -> ReLU -> the input of its conv2; a block's bn2 -> ``+= identity`` -> ReLU -> the block's
    output (``resnet_tv.py`` ``BasicBlock.forward``)."""
    if not isinstance(backbone, ResNet18Backbone):
        return {}
    sources = {backbone.bn1: (getattr(backbone, backbone.stage_names[0])[0], "input")}
    for block in backbone.modules():
        if isinstance(block, BasicBlock):
            sources[block.bn1] = (block.conv2, "input")
            sources[block.bn2] = (block, "output")
    return sources


def hook_sites(encoder: Encoder, layers: str,
               bn_after_relu: bool = True) -> list[tuple[nn.Module, tuple[nn.Module, str] | None]]:
    """(module whose output gives h and the statistics, (module, "input" | "output") giving the compared
    value, or None when it is h itself) for every hooked site, in forward order; shortcut (``downsample``)
    convs and BNs are not hooked."""
    kinds = {"conv+bn": (nn.Conv2d, nn.modules.batchnorm._BatchNorm), "conv": (nn.Conv2d,),
             "bn": (nn.modules.batchnorm._BatchNorm,)}[layers]
    sources = _value_sources(encoder.backbone) if bn_after_relu else {}
    return [(m, sources.get(m)) for name, m in encoder.backbone.named_modules()
            if isinstance(m, kinds) and "downsample" not in name.split(".")]


class ActivationTap:
    """Forward hooks registered once; tensors are kept only inside ``capture()``."""

    def __init__(self, sites: list[tuple[nn.Module, tuple[nn.Module, str] | None]]):
        self.n = len(sites)
        self.active = False
        self.stat: list[torch.Tensor | None] = [None] * self.n
        self.value: list[torch.Tensor | None] = [None] * self.n
        self.handles = []
        for i, (module, source) in enumerate(sites):
            self.handles.append(module.register_forward_hook(functools.partial(self._keep_output, i)))
            if source is not None and source[1] == "input":
                self.handles.append(source[0].register_forward_pre_hook(functools.partial(self._keep_input, i)))
            elif source is not None:
                self.handles.append(source[0].register_forward_hook(functools.partial(self._keep_value, i)))

    def _keep_output(self, i, module, inputs, output):
        if self.active:
            self.stat[i] = output

    def _keep_value(self, i, module, inputs, output):
        if self.active:
            self.value[i] = output

    def _keep_input(self, i, module, inputs):
        if self.active:
            self.value[i] = inputs[0]

    @contextlib.contextmanager
    def capture(self):
        self.stat, self.value, self.active = [None] * self.n, [None] * self.n, True
        try:
            yield self
        finally:
            self.active = False

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(statistics tensors h, compared values v); v is h where the site has no consumer."""
        return list(self.stat), [v if v is not None else h for h, v in zip(self.stat, self.value)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def activations(encoder: Encoder, x: torch.Tensor, layers: str, tap: ActivationTap | None):
    """(h per site, v per site, backbone feature) from one forward pass."""
    if layers == "stages":
        out = encoder.stages(x)
        acts = [out[name] for name in encoder.stage_names]
        return acts, acts, out["feature"]
    with tap.capture():
        feature = encoder.features(x)
    stat, value = tap.tensors()
    return stat, value, feature


# ----------------------------------------------------------------- statistics, importance, loss

@torch.no_grad()
def teacher_statistics(teacher: Encoder, images: torch.Tensor, cfg: MedicConfig, ctx, tap, augment):
    """Per-channel (mu, sigma) of every site's h over one pass of augmented clean batches (at most
    ``stat_batches``): batch means and unbiased batch variances, averaged with batch-size weights.

    As the reference's ``Norm`` in mode ``exact``, the sums start from its buffers' initial values, the
    variance sum at ``STAT_VAR_PRIOR`` and the count at ``STAT_COUNT_PRIOR``:
    ``sigma^2 = (1 + sum_b n_b var_b) / (1e-5 + sum_b n_b)``, a prior worth one sample of unit variance."""
    means = variances = None
    count = STAT_COUNT_PRIOR
    batches = ctx.batches(len(images), min(cfg.batch_size, len(images)), drop_last=False)
    for idx in batches[:max(1, cfg.stat_batches)]:
        stat, _, _ = activations(teacher, augment(to_float(images[idx], ctx.device)), cfg.layers, tap)
        if means is None:
            means = [torch.zeros(a.shape[1], dtype=torch.float64, device=a.device) for a in stat]
            variances = [torch.full_like(m, STAT_VAR_PRIOR) for m in means]
        for i, a in enumerate(stat):
            dims = (0, 2, 3) if a.ndim == 4 else (0,)
            a = a.double()
            means[i] += a.mean(dims) * len(idx)
            variances[i] += a.var(dims, unbiased=True) * len(idx)
        count += len(idx)
    shape = (1, -1, 1, 1)
    return [((m / count).float().view(shape), (v / count).sqrt().float().view(shape))
            for m, v in zip(means, variances)]


def _softmax_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean over samples of H(p) / log(N) for B x N distributions (1 = uniform)."""
    return -(p * p.clamp_min(1e-30).log()).sum(1).mean() / math.log(p.shape[1])


def importance(h_t: torch.Tensor, g: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, T: float,
               with_entropy: bool = False):
    """``sqrt(softmax(T h^) * softmax(T g sigma))`` over each sample's C x H x W elements
    (with ``with_entropy``: also the normalised entropies of the two softmaxes)."""
    b = h_t.shape[0]
    a = F.softmax(T * ((h_t - mu) / (sigma + EPS)).reshape(b, -1), dim=1)
    c = F.softmax(T * (g * sigma).reshape(b, -1), dim=1)
    w = (a * c).sqrt().reshape(h_t.shape)
    if with_entropy:
        return w, (_softmax_entropy(a), _softmax_entropy(c))
    return w


def teacher_loss(teacher: Encoder, feature: torch.Tensor, cfg: MedicConfig) -> torch.Tensor:
    """The teacher's own loss on the 2B views, averaged (reference) or summed over samples."""
    if cfg.teacher_loss == "ntxent":
        per_mean = nt_xent(*teacher.head(feature).chunk(2), temperature=cfg.temperature)
    elif cfg.teacher_loss == "cosine":
        f1, f2 = feature.chunk(2)
        per_mean = (1 - F.cosine_similarity(f1, f2, dim=1)).mean()
    else:
        raise ValueError(f"unknown MEDIC teacher_loss {cfg.teacher_loss!r}; use ntxent or cosine")
    return per_mean * feature.shape[0] if cfg.teacher_reduction == "sum" else per_mean


def medic_step_losses(student, teacher, views, stats, cfg: MedicConfig, taps, entropies: list | None = None):
    """(total, nt-xent, clone, feature) for one batch of stacked views (2B images). With a list
    ``entropies``, appends (activation, gradient) softmax entropies averaged over the sites."""
    # teacher: values with gradients of its own loss, no parameter gradients
    x_t = views.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        stat_t, value_t, feat_t = activations(teacher, x_t, cfg.layers, taps[0])
        grads = torch.autograd.grad(teacher_loss(teacher, feat_t, cfg), value_t)
    stat_t = [h.detach() for h in stat_t]
    value_t = [v.detach() for v in value_t]
    feat_t = feat_t.detach()
    with torch.no_grad():
        out = [importance(h, g, mu, sigma, cfg.importance_temperature, with_entropy=entropies is not None)
               for h, g, (mu, sigma) in zip(stat_t, grads, stats)]
    if entropies is not None:
        weights = [w for w, _ in out]
        ent = torch.tensor([[float(e) for e in pair] for _, pair in out])
        entropies.append(ent.mean(0).tolist())
    else:
        weights = out
    # student
    _, value_s, feat_s = activations(student, views, cfg.layers, taps[1])
    task = nt_xent(*student.head(feat_s).chunk(2), temperature=cfg.temperature)
    clone = sum((w * ((v_t - v_s) / sigma.clamp_min(EPS)).pow(2)).flatten(1).sum(1).mean()
                for w, v_t, v_s, (_, sigma) in zip(weights, value_t, value_s, stats))
    feature = (1 - F.cosine_similarity(feat_s, feat_t, dim=1)).mean()
    total = task + cfg.clone_weight * clone + cfg.feature_weight * feature
    return total, task, clone, feature


def make_optimizer(student, cfg: MedicConfig) -> torch.optim.Adam:
    """The reference's optimiser with ``--hook``: Adam over every student parameter, weight decay."""
    return torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def step(student, teacher, views, stats, cfg: MedicConfig, taps, opt, entropies: list | None = None):
    """One update of the student on stacked views; returns :func:`medic_step_losses`'s (total, nt-xent, clone,
    feature)."""
    losses = medic_step_losses(student, teacher, views, stats, cfg, taps, entropies)
    opt.zero_grad(set_to_none=True)
    losses[0].backward()
    opt.step()
    return losses


@register_defense("medic", config=MedicConfig,
                  summary="clone the suspect into a random-init student, weighting layers by importance (MEDIC)",
                  profiles={"tiny": {"epochs": 12}, "ci": {"epochs": 3}}, budget=("epochs",))
def medic(encoder, clean, cfg: MedicConfig, ctx):
    cfg.validate()
    device = ctx.device
    teacher = frozen_copy(encoder).to(device)
    student = encoder.empty_like().to(device).train()
    taps = (None, None) if cfg.layers == "stages" else \
        tuple(ActivationTap(hook_sites(m, cfg.layers, cfg.bn_after_relu)) for m in (teacher, student))
    augment = SimCLRAugment()
    images = clean.images
    batch_size = min(cfg.batch_size, len(images))
    try:
        stats = teacher_statistics(teacher, images, cfg, ctx, taps[0], augment)
        opt = make_optimizer(student, cfg)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs)) if cfg.cosine else None
        history = {"loss": [], "ntxent": [], "clone": [], "feature": []}
        entropy = {"activation": [], "gradient": []}
        for _ in ctx.progress(range(cfg.epochs), desc="medic", total=cfg.epochs):
            totals = torch.zeros(4)
            batches = ctx.batches(len(images), batch_size, drop_last=False)
            for i, idx in enumerate(batches):
                x = to_float(images[idx], device)
                views = torch.cat([augment(x), augment(x)])
                ent = [] if i == 0 else None  # softmax entropies on the first batch of each epoch
                losses = step(student, teacher, views, stats, cfg, taps, opt, ent)
                totals += torch.tensor([v.item() for v in losses])
                if ent:
                    entropy["activation"].append(ent[0][0])
                    entropy["gradient"].append(ent[0][1])
            if sched is not None:
                sched.step()
            for key, value in zip(history, (totals / max(1, len(batches))).tolist()):
                history[key].append(value)
        ctx.record("medic_layers", cfg.layers)
        ctx.record("medic_n_hooked", len(stats))
        ctx.record("medic_importance_entropy", entropy)
        for key, values in history.items():
            ctx.record(f"medic_{key}", values)
    finally:
        for tap in taps:
            if tap is not None:
                tap.remove()
    return student.eval()
