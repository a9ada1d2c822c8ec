"""DECREE (Feng et al., CVPR 2023): trigger inversion for a pre-trained encoder, and the MIMIC paper's
one-sentence DECREE mitigation.

:func:`invert_trigger` (also what ``defbench detect`` runs) optimises a mask ``m`` (H x W) and a pattern
``p`` (3 x H x W), both in tanh space, so that the stamped clean images ``(1-m) x + m p`` all embed alike:
``loss = -mean_{i != j} cos(f(x'_i), f(x'_j)) + lambda * 3 |m|_1`` (the encoder frozen, eval mode), with
the reference's lambda schedule, success criterion and early stop; every schedule counts updates.
``PL1 = |m|_1 / (H W)`` of the smallest successful trigger is the detection score (small: backdoored).

The registered ``decree`` defense then fine-tunes the backbone (BatchNorm frozen) to lower
``cos(f(x), f(x (+) t^))`` on the clean set, with ``utility_weight`` x ``-cos(f(x), f_0(x))`` keeping
the clean embeddings near the suspect's. ``decree-unlearn`` (``defenses/decree_unlearn.py``) reuses the
inversion and pulls ``f(x (+) t^)`` to ``f_0(x)`` instead.

Parity with the reference: docs/methods/decree.md (and docs/methods/decree-unlearn.md).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoders import Encoder, freeze_batchnorm, frozen_copy, to_float
from ..encoders.augment import horizontal_flip
from .base import Detector, register_defense, register_detector

EPS = 1e-7

# The reference (GiantSeaweed/DECREE main.py, CIFAR-10/STL-10 encoders) inverts on 1,000 shadow images at
# batch 128: one of its epochs is ceil(1000 / 128) = 8 updates. Its epoch-based settings in updates:
REF_EPOCH_UPDATES = 8
REF_LR_EPOCHS = (30, 50)  # adjust_learning_rate: lr 0.5 before epoch 30, 0.1 before 50, then 0.05
REF_MAX_EPOCHS = 1000


@dataclass
class DecreeConfig:
    # --- trigger inversion (the reference's settings, its epochs converted to updates)
    inv_batch_size: int = 128
    inv_lr: tuple[float, float, float] = (0.5, 0.1, 0.05)  # Adam lr before/between/after inv_lr_steps
    inv_lr_steps: tuple[int, int] = (REF_LR_EPOCHS[0] * REF_EPOCH_UPDATES, REF_LR_EPOCHS[1] * REF_EPOCH_UPDATES)
    inv_max_steps: int = REF_MAX_EPOCHS * REF_EPOCH_UPDATES  # update budget (8,000)
    inv_epoch_steps: int = REF_EPOCH_UPDATES  # the early-stop test runs every this many updates (a reference epoch)
    inv_images: int = 0  # 0: the whole clean set
    success_threshold: float = 0.99  # |mean off-diagonal cos| that makes an update a success
    init_lambda: float = 1e-3
    lambda_factor: float = 5.0
    lambda_min: float = 1e-5
    patience: int = 5
    early_stop_patience: int = 10  # updates without a smaller successful trigger
    pl1_threshold: float = 0.1  # PL1 below this: "backdoored" (recorded only; the paper's threshold)
    # --- mitigation: fine-tune the backbone against the inverted trigger (shared with decree-unlearn)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trigger_fraction: float = 0.5  # stamped copies of this fraction of each batch
    utility_weight: float = 1.0  # weight of -cos(f(x), f_0(x)) on the whole batch (0: the bare sentence)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m) x + m p`` for float images in [0, 1]; mask H x W, pattern 3 x H x W."""
    return (1 - mask) * x + mask * pattern


def _to_tanh_space(values: torch.Tensor) -> torch.Tensor:
    return torch.atanh((values.clamp(1e-4, 1 - 1e-4) - 0.5) * (2 - EPS))


def _from_tanh_space(raw: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(raw) / (2 - EPS) + 0.5).clamp(0, 1)


def _trigger_dtype(device: torch.device) -> torch.dtype:
    """float64 for the inverted trigger (the reference's), float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def offdiag_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the rows, the diagonal left out."""
    z = F.normalize(features, dim=1)
    n = len(z)
    sim = z @ z.t()
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


def invert_trigger(encoder: Encoder, images: torch.Tensor, cfg: DecreeConfig, ctx, trace: list | None = None,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None,
                   monitor: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
    """DECREE's inversion on uint8 ``images`` (N x 3 x H x W); the encoder is not modified.

    Returns ``(mask, pattern, info)``: the best trigger (mask H x W and pattern
    3 x H x W, floats in [0, 1], on the CPU) and a JSON-able dict with ``pl1``,
    ``mask_l1`` (|m|_1 of the H x W mask), ``found``, ``steps``, ``lambda``,
    ``cosine`` (of the best trigger) and ``final_cosine``. When no update reached
    the threshold the last trigger is returned, ``found`` is False and ``pl1`` is
    1.0. ``trace``, when given, receives ``(cos, |m|_1, lambda)`` of every update.
    ``init`` gives the starting mask (H x W) and pattern (3 x H x W) in tanh space instead of
    the random draw, and ``monitor(raw_mask, raw_pattern)`` is called after every update (their
    gradients still attached): the seams the reference-trace test uses.
    """
    if len(images) < 2:
        raise ValueError("DECREE needs at least 2 clean images to invert a trigger")
    device = ctx.device
    model = frozen_copy(encoder).to(device)
    if cfg.inv_images and cfg.inv_images < len(images):
        images = images[torch.randperm(len(images), generator=ctx.generator)[:cfg.inv_images]]
    channels, h, w = images.shape[-3:]
    if init is None:
        init = (_to_tanh_space(torch.rand(h, w, generator=ctx.generator)),
                _to_tanh_space(torch.rand(3, h, w, generator=ctx.generator)))
    # the trigger, its Adam state and the stamping are float64 as in the reference (main.py keeps them in
    # float64 and casts the stamped batch to fp32 for the encoder): fp32 saturates tanh, so mask entries the
    # reference keeps at ~1e-8 (and the pattern's gradient there) become exactly 0
    dtype = _trigger_dtype(device)
    raw_mask = init[0].detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    raw_pattern = init[1].detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    opt = torch.optim.Adam([raw_mask, raw_pattern], lr=cfg.inv_lr[0], betas=(0.5, 0.9))
    batch_size = min(cfg.inv_batch_size, len(images))

    lam = cfg.init_lambda
    up = down = reset_count = stale = 0
    best_l1, best_cos, best = math.inf, float("nan"), None
    last_best = math.inf
    cos_value = float("nan")
    epoch_cos: list[float] = []  # cosines since the last early-stop test
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
            x = stamp(images[idx].to(device=device, dtype=dtype) / 255.0, mask, pattern).float()
            cos = offdiag_cosine(model.features(x))
            l1 = mask.sum()
            # the reference's L1 term sums the mask repeated over the image channels
            loss = -cos + lam * channels * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if monitor is not None:
                monitor(raw_mask, raw_pattern)

            cos_value, l1_value = cos.item(), l1.item()
            epoch_cos.append(cos_value)
            success = abs(cos_value) > cfg.success_threshold
            if trace is not None:
                trace.append((cos_value, l1_value, lam))
            if success and l1_value < best_l1:
                best_l1, best_cos = l1_value, cos_value
                best = (mask.detach().float().cpu(), pattern.detach().float().cpu())
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
            # early stop, tested at the end of each reference epoch on that epoch's mean cosine
            if step % cfg.inv_epoch_steps == 0:
                epoch_mean = sum(epoch_cos) / len(epoch_cos)
                epoch_cos = []
                if abs(epoch_mean) > cfg.success_threshold and stale > cfg.early_stop_patience:
                    break

    found = best is not None
    if not found:
        with torch.no_grad():
            best = (_from_tanh_space(raw_mask).float().cpu(), _from_tanh_space(raw_pattern).float().cpu())
        best_l1 = best[0].sum().item()
    info = {"pl1": best_l1 / (h * w) if found else 1.0, "mask_l1": best_l1, "found": found, "steps": step,
            "lambda": lam, "cosine": best_cos if found else None, "final_cosine": cos_value,
            "image_size": [int(h), int(w)], "n_images": len(images)}
    return best[0], best[1], info


def record_inversion(info: dict, cfg: DecreeConfig, ctx, name: str = "decree") -> dict:
    """Add the (recorded-only) verdict to ``info``, record every entry as ``decree_<key>`` and log it."""
    info["verdict"] = "backdoored" if info["pl1"] < cfg.pl1_threshold else "clean"
    for key, value in info.items():
        ctx.record(f"decree_{key}", value)
    ctx.logger.info("%s: PL1 %.4f (|m|_1 %.1f, found %s, %d steps) -> %s", name, info["pl1"], info["mask_l1"],
                    info["found"], info["steps"], info["verdict"])
    return info


@torch.no_grad()
def mean_cosine(model: Encoder, images: torch.Tensor, ctx, transform_a=None, transform_b=None,
                other: Encoder | None = None, batch_size: int = 256) -> float:
    """Mean over ``images`` of ``cos(model(a(x)), other(b(x)))`` (``other`` defaults to ``model``), eval mode."""
    other = model if other is None else other
    modes = {m: m.training for enc in (model, other) for m in enc.modules()}  # restored as they were (frozen BN)
    model.eval(), other.eval()
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size], ctx.device)
        a = transform_a(x) if transform_a else x
        b = transform_b(x) if transform_b else x
        total += F.cosine_similarity(model.features(a), other.features(b), dim=1).sum().item()
    for module, training in modes.items():
        module.training = training
    return total / len(images)


def fine_tune(encoder: Encoder, images: torch.Tensor, cfg, ctx, batch_loss: Callable, desc: str,
              extra_params: list | None = None) -> list[float]:
    """SGD on the backbone (every BatchNorm frozen) over the clean set; returns the mean loss per epoch.

    ``batch_loss(model, reference, x)`` gives the loss of one batch of randomly flipped float images ``x``;
    ``reference`` is a frozen copy of the encoder as it came in (f_0).
    """
    device = ctx.device
    reference = frozen_copy(encoder).to(device)
    model = encoder.to(device).train()
    freeze_batchnorm(model)
    params = [p for p in model.backbone.parameters() if p.requires_grad] + list(extra_params or [])
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batch_size = min(cfg.batch_size, len(images))
    history = []
    for _ in ctx.progress(range(cfg.epochs), desc=desc, total=cfg.epochs):
        total, batches = 0.0, ctx.batches(len(images), batch_size)
        for idx in batches:
            loss = batch_loss(model, reference, horizontal_flip(to_float(images[idx], device)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / max(1, len(batches)))
    return history


def trigger_pick(n: int, fraction: float, ctx) -> torch.Tensor:
    """Indices of a random ``fraction`` of a batch of ``n`` (at least one when ``fraction`` > 0)."""
    n_trig = max(1, round(fraction * n)) if fraction > 0 else 0
    return torch.randperm(n, generator=ctx.generator)[:n_trig].to(ctx.device)


def lower_trigger_similarity(encoder: Encoder, images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                             cfg: DecreeConfig, ctx, desc: str = "decree mitigate") -> list[float]:
    """Fine-tune ``encoder`` in place to lower ``cos(f(x), f(x (+) t^))`` (the MIMIC paper's DECREE sentence),
    plus ``utility_weight`` x ``-cos(f(x), f_0(x))``."""
    if cfg.trigger_fraction <= 0:
        raise ValueError("decree: trigger_fraction must be > 0 (the loss is on stamped images)")
    mask, pattern = mask.to(ctx.device), pattern.to(ctx.device)

    def batch_loss(model, reference, x):
        pick = trigger_pick(len(x), cfg.trigger_fraction, ctx)
        feats = F.normalize(model.features(torch.cat([x, stamp(x[pick], mask, pattern)])), dim=1)
        f_clean, f_trig = feats[:len(x)], feats[len(x):]
        loss = (f_clean[pick] * f_trig).sum(1).mean()
        if cfg.utility_weight:
            with torch.no_grad():
                target = F.normalize(reference.features(x), dim=1)
            loss = loss - cfg.utility_weight * (f_clean * target).sum(1).mean()
        return loss

    return fine_tune(encoder, images, cfg, ctx, batch_loss, desc)


def trigger_similarity(encoder: Encoder, images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                       ctx) -> float:
    """Mean ``cos(f(x), f(x (+) t^))`` over ``images`` (eval mode): what the ``decree`` mitigation lowers."""
    mask, pattern = mask.to(ctx.device), pattern.to(ctx.device)
    return mean_cosine(encoder.to(ctx.device), images, ctx, transform_b=lambda x: stamp(x, mask, pattern))


# tiny/ci: the update budget is cut to 1/10 and 1/20 of the paper's 8,000 (100 and 50 reference epochs: both still
# reach the schedule's last lr) and the batch to 64 and 32 (the cost of one update); nothing else changes.
SCALED_PROFILES = {"tiny": {"inv_max_steps": 800, "inv_batch_size": 64, "epochs": 5},
                   "ci": {"inv_max_steps": 400, "inv_batch_size": 32, "epochs": 2, "batch_size": 64}}


@register_defense("decree", config=DecreeConfig,
                  summary="invert the encoder's trigger (DECREE), then fine-tune to lower cos(f(x), f(x+t^)) "
                          "with a clean-feature anchor (the MIMIC paper's DECREE)",
                  profiles=SCALED_PROFILES, budget=("inv_max_steps", "epochs"))
def decree(encoder, clean, cfg: DecreeConfig, ctx):
    mask, pattern, info = invert_trigger(encoder, clean.images, cfg, ctx)
    record_inversion(info, cfg, ctx)
    if cfg.epochs > 0:
        reference = frozen_copy(encoder).to(ctx.device)
        ctx.record("decree_similarity_before", trigger_similarity(encoder, clean.images, mask, pattern, ctx))
        ctx.record("decree_mitigation_loss",
                   lower_trigger_similarity(encoder, clean.images, mask, pattern, cfg, ctx))
        ctx.record("decree_similarity_after", trigger_similarity(encoder, clean.images, mask, pattern, ctx))
        ctx.record("decree_clean_cosine", mean_cosine(encoder, clean.images, ctx, other=reference))
        ctx.logger.info("decree: cos(f(x), f(x+t^)) %.3f -> %.3f, cos(f(x), f_0(x)) %.3f",
                        ctx.records["decree_similarity_before"], ctx.records["decree_similarity_after"],
                        ctx.records["decree_clean_cosine"])
    return encoder.eval()


def _detect(encoder: Encoder, images: torch.Tensor, cfg: DecreeConfig, ctx) -> dict:
    """DECREE as a detector: the inverted trigger's PL1 is the score (small: backdoored)."""
    info = invert_trigger(encoder, images, cfg, ctx)[2]
    return {**info, "score": info["pl1"]}


register_detector(Detector("decree", _detect, defense="decree", threshold_field="pl1_threshold", score_name="PL1",
                           summary="DECREE's trigger inversion: PL1 = |m|_1 / (H W) of the smallest trigger that "
                                   "makes stamped clean images embed alike (small: backdoored)"))
