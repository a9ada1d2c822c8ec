"""DECREE (Feng et al., CVPR 2023): trigger inversion for a pre-trained encoder, then unlearning.

**Inversion** (:func:`invert_trigger`, also what ``defbench detect`` runs). A
mask ``m = clip(tanh(m~)/(2-eps) + 0.5, 0, 1)`` (H x W) and a pattern
``p = clip(tanh(p~)/(2-eps) + 0.5, 0, 1)`` (3 x H x W) are optimised so that
the stamped clean images ``x' = (1-m) x + m p`` all embed alike:
``loss = -mean_{i != j} cos(f(x'_i), f(x'_j)) + lambda |m|_1``, the encoder
frozen in eval mode. Our encoders take float images in [0, 1] and normalise
internally, so the pattern lives in [0, 1] (the reference's [0, 255] divided
by 255; the stamped image is identical). Reference settings (authors' code,
CIFAR-10 encoders): Adam betas (0.5, 0.9), lr 0.5 for the first 30 epochs, 0.1
until 50, then 0.05; batch 128; random initial mask and pattern; up to 1000
epochs; a step is a success when the mean off-diagonal |cos| exceeds 0.99;
lambda starts at 1e-3, is multiplied by 5 after more than 5 consecutive
successes and divided by 5 after more than 5 consecutive failures (not below
1e-5; when it has sunk below 1e-5 and keeps succeeding for 10 steps it is
reset to 1e-3); the best trigger is the smallest |m|_1 seen on a success; the
run stops early once a success comes after more than 10 steps without a
smaller best. The reference inverts on 50 CIFAR-10 images, so one of its
epochs is a single step: here every schedule counts optimisation steps, with
batches drawn from the defender's clean set. The reference's L1 term sums the
mask repeated over the 3 channels (3x our |m|_1); the lambda schedule absorbs
the constant. Detection score ``PL1 = |m|_1 / (H W)`` of the best trigger
(1.0 when no trigger met the threshold within the step budget): small means
backdoored. ``pl1_threshold`` is the decision boundary ``defbench detect``
uses; its calibration on clean encoders is documented in
``defbench.benchmark.detect``.

**Mitigation** (the benchmark's "DECREE" defense; DECREE itself only
detects). The inverted trigger t^ is unlearned by fine-tuning the backbone on
the clean set with ``-cos(f(x (+) t^), f_0(x))`` on a random half of each
batch plus ``-cos(f(x), f_0(x))`` on the whole batch (f_0 the frozen suspect),
optionally plus ``ntxent_weight`` x NT-Xent on two SimCLR views. Every
BatchNorm is frozen (eval mode, affine fixed), images are randomly flipped
before stamping, SGD (momentum 0.9, wd 5e-4), few epochs, small lr. The
trigger is unlearned whatever its size: the defense does not look at the
detection verdict (a clean encoder just gets a large, harmless trigger).
Recorded with the result (``ctx.record``, keys prefixed ``decree_``): ``pl1``,
``mask_l1``, ``found``, the inversion's ``steps``, ``lambda`` and cosines,
``verdict`` and ``unlearn_loss`` (the mitigation loss per epoch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoders import Encoder, freeze_batchnorm, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment, horizontal_flip
from ..encoders.simclr import contrastive_loss
from .base import Detector, register_defense, register_detector

EPS = 1e-7


@dataclass
class DecreeConfig:
    # --- trigger inversion (reference settings)
    inv_batch_size: int = 128
    inv_lr: tuple[float, float, float] = (0.5, 0.1, 0.05)  # Adam lr before/between/after inv_lr_steps
    inv_lr_steps: tuple[int, int] = (30, 50)
    inv_max_steps: int = 1000
    inv_images: int = 0  # 0: the whole clean set
    success_threshold: float = 0.99  # mean off-diagonal |cos| that makes a step a success
    init_lambda: float = 1e-3
    lambda_factor: float = 5.0
    lambda_min: float = 1e-5
    patience: int = 5
    early_stop_patience: int = 10
    pl1_threshold: float = 0.12  # PL1 below this: backdoored (calibrated on clean encoders)
    # --- mitigation: unlearn the inverted trigger
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trigger_fraction: float = 0.5
    ntxent_weight: float = 0.0
    temperature: float = 0.5


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m) x + m p`` for float images in [0, 1]; mask H x W, pattern 3 x H x W."""
    return (1 - mask) * x + mask * pattern


def _to_tanh_space(values: torch.Tensor) -> torch.Tensor:
    return torch.atanh((values.clamp(1e-4, 1 - 1e-4) - 0.5) * (2 - EPS))


def _from_tanh_space(raw: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(raw) / (2 - EPS) + 0.5).clamp(0, 1)


def offdiag_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the rows, the diagonal left out."""
    z = F.normalize(features, dim=1)
    n = len(z)
    sim = z @ z.t()
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


def invert_trigger(encoder: Encoder, images: torch.Tensor, cfg: DecreeConfig, ctx, trace: list | None = None):
    """DECREE's inversion on uint8 ``images`` (N x 3 x H x W); the encoder is not modified.

    Returns ``(mask, pattern, info)``: the best trigger (mask H x W and pattern
    3 x H x W, floats in [0, 1], on the CPU) and a JSON-able dict with ``pl1``,
    ``mask_l1``, ``found``, ``steps``, ``lambda``, ``cosine`` (of the best trigger)
    and ``final_cosine``. When no step reached the threshold the last trigger
    is returned, ``found`` is False and ``pl1`` is 1.0. ``trace``, when given,
    receives ``(cos, |m|_1, lambda)`` of every step.
    """
    if len(images) < 2:
        raise ValueError("DECREE needs at least 2 clean images to invert a trigger")
    device = ctx.device
    model = frozen_copy(encoder).to(device)
    if cfg.inv_images and cfg.inv_images < len(images):
        images = images[torch.randperm(len(images), generator=ctx.generator)[:cfg.inv_images]]
    h, w = images.shape[-2:]
    raw_mask = _to_tanh_space(torch.rand(h, w, generator=ctx.generator)).to(device).requires_grad_(True)
    raw_pattern = _to_tanh_space(torch.rand(3, h, w, generator=ctx.generator)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([raw_mask, raw_pattern], lr=cfg.inv_lr[0], betas=(0.5, 0.9))
    batch_size = min(cfg.inv_batch_size, len(images))

    lam = cfg.init_lambda
    up = down = reset_count = stale = 0
    best_l1, best_cos, best = math.inf, float("nan"), None
    last_best = math.inf
    cos_value = float("nan")
    step = 0
    batches: list[torch.Tensor] = []
    with torch.enable_grad():
        while step < cfg.inv_max_steps:
            if not batches:
                batches = ctx.batches(len(images), batch_size)
            idx = batches.pop(0)
            for group in opt.param_groups:
                group["lr"] = cfg.inv_lr[sum(step >= s for s in cfg.inv_lr_steps)]
            mask, pattern = _from_tanh_space(raw_mask), _from_tanh_space(raw_pattern)
            x = stamp(to_float(images[idx], device), mask, pattern)
            cos = offdiag_cosine(model.features(x))
            l1 = mask.sum()
            loss = -cos + lam * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1

            cos_value, l1_value = cos.item(), l1.item()
            success = abs(cos_value) > cfg.success_threshold
            if trace is not None:
                trace.append((cos_value, l1_value, lam))
            if success and l1_value < best_l1:
                best_l1, best_cos = l1_value, cos_value
                best = (mask.detach().cpu().clone(), pattern.detach().cpu().clone())
            if best is not None:  # early-stop bookkeeping starts with the first valid trigger
                stale = stale + 1 if best_l1 >= last_best else 0
                last_best = min(last_best, best_l1)
            # lambda schedule
            if lam < cfg.lambda_min and success:
                reset_count += 1
                if reset_count > 2 * cfg.patience:
                    lam, up, down, reset_count = cfg.init_lambda, 0, 0, 0
            else:
                reset_count = 0
            up, down = (up + 1, 0) if success else (0, down + 1)
            if up > cfg.patience:
                if lam < 1e5:
                    lam *= cfg.lambda_factor
                up = 0
            elif down > cfg.patience:
                if lam >= cfg.lambda_min:
                    lam /= cfg.lambda_factor
                down = 0
            if success and stale > cfg.early_stop_patience:
                break

    found = best is not None
    if not found:
        with torch.no_grad():
            best = (_from_tanh_space(raw_mask).cpu(), _from_tanh_space(raw_pattern).cpu())
        best_l1 = best[0].sum().item()
    info = {"pl1": best_l1 / (h * w) if found else 1.0, "mask_l1": best_l1, "found": found, "steps": step,
            "lambda": lam, "cosine": best_cos if found else None, "final_cosine": cos_value,
            "image_size": [int(h), int(w)], "n_images": len(images)}
    return best[0], best[1], info


def unlearn_trigger(encoder: Encoder, images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                    cfg: DecreeConfig, ctx, desc: str = "decree unlearn") -> list[float]:
    """Fine-tune ``encoder`` in place so stamped images embed like their clean originals did."""
    device = ctx.device
    reference = frozen_copy(encoder).to(device)
    model = encoder.to(device).train()
    freeze_batchnorm(model)
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    if cfg.ntxent_weight:
        params += [p for p in model.head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    mask, pattern = mask.to(device), pattern.to(device)
    augment = SimCLRAugment()
    batch_size = min(cfg.batch_size, len(images))
    history = []
    for _ in ctx.progress(range(cfg.epochs), desc=desc, total=cfg.epochs):
        total, batches = 0.0, ctx.batches(len(images), batch_size)
        for idx in batches:
            x = horizontal_flip(to_float(images[idx], device))
            n_trig = max(1, round(cfg.trigger_fraction * len(x))) if cfg.trigger_fraction > 0 else 0
            pick = torch.randperm(len(x), generator=ctx.generator)[:n_trig].to(device)
            with torch.no_grad():
                target = F.normalize(reference.features(x), dim=1)
            feats = F.normalize(model.features(torch.cat([x, stamp(x[pick], mask, pattern)])), dim=1)
            f_clean, f_trig = feats[:len(x)], feats[len(x):]
            loss = -(f_clean * target).sum(1).mean()
            if n_trig:
                loss = loss - (f_trig * target[pick]).sum(1).mean()
            if cfg.ntxent_weight:
                loss = loss + cfg.ntxent_weight * contrastive_loss(model, x, augment, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / max(1, len(batches)))
    return history


# tiny/ci: small, briefly trained encoders whose features collapse less than the paper's (BadEncoder's own
# trigger reaches a mean pairwise cosine of only ~0.97-0.985 on the ci/tiny encoders), so a step succeeds
# at 0.95; the shorter budgets need a longer early-stop patience to finish shrinking the mask.
_SMALL_ENCODERS = {"success_threshold": 0.95, "early_stop_patience": 50}


@register_defense("decree", config=DecreeConfig,
                  summary="invert the encoder's trigger (DECREE) and unlearn it by fine-tuning with frozen BN",
                  profiles={"tiny": {**_SMALL_ENCODERS, "inv_max_steps": 300, "inv_batch_size": 64,
                                     "pl1_threshold": 0.055, "epochs": 5},
                            "ci": {**_SMALL_ENCODERS, "inv_max_steps": 200, "inv_batch_size": 32, "pl1_threshold": 0.09,
                                   "epochs": 2, "batch_size": 64}}, budget=("inv_max_steps", "epochs"))
def decree(encoder, clean, cfg: DecreeConfig, ctx):
    mask, pattern, info = invert_trigger(encoder, clean.images, cfg, ctx)
    info["verdict"] = "backdoored" if info["pl1"] < cfg.pl1_threshold else "clean"
    for key, value in info.items():
        ctx.record(f"decree_{key}", value)
    ctx.logger.info("decree: PL1 %.4f (|m|_1 %.1f, found %s, %d steps) -> %s", info["pl1"], info["mask_l1"],
                    info["found"], info["steps"], info["verdict"])
    if cfg.epochs > 0:
        ctx.record("decree_unlearn_loss", unlearn_trigger(encoder, clean.images, mask, pattern, cfg, ctx))
    return encoder.eval()


def _detect(encoder: Encoder, images: torch.Tensor, cfg: DecreeConfig, ctx) -> dict:
    """DECREE as a detector: the inverted trigger's PL1 is the score (small: backdoored)."""
    info = invert_trigger(encoder, images, cfg, ctx)[2]
    return {**info, "score": info["pl1"]}


register_detector(Detector("decree", _detect, defense="decree", threshold_field="pl1_threshold",
                           summary="DECREE's trigger inversion: PL1 = |m|_1 / (H W) of the smallest trigger that "
                                   "makes stamped clean images embed alike (small: backdoored)"))
