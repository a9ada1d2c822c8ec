"""How each defense runs on a transformer image tower (a ViT, a CLIP image tower: ``encoders/towers.py``).

The defenses work through the encoder interface, and a tower offers all of it: ``stages`` gives every
block's patch tokens on the patch grid (B x C x h x w), so an attention map, a MINE input or a channel mean
is defined on a block as on a ResNet stage. What differs, per defense (docs/methods/<name>.md, "On a ViT"):

- **as they are**: FT, MIMIC (attention on every block, MI per block), DECREE and DECREE-unlearn, SSL-Cleanse,
  MOTH, DeDe (they use ``features``/``project``/``stages`` only);
- **NAD**: the attention terms go on the last ``len(betas)`` blocks (the ResNet default names layer2..layer4,
  the last three stages; a tower has no stage of those names);
- **MEDIC**: clones the block outputs (its ``layers="stages"`` sites); the ResNet sites are Conv2d/BatchNorm
  outputs, which a tower does not have;
- **FP**: prunes hidden units of the last block's MLP (a unit = a row of the MLP's first linear layer and its
  bias: GELU(0) = 0, so the unit contributes nothing), ranked by mean activation on the clean images, with the
  ResNet FP's label-free stopping rule and fine-tuning;
- **refused**, before any compute: ANP (its neurons are BatchNorm channels) and PatchSearch (its Grad-CAM
  hooks a convolutional stage module).

A defense not named here (a plugin) runs as it is. The harness calls :func:`runner` (in place of the
registered function) and :func:`refusal` (before it plans or runs anything); neither touches a ResNet run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..core import UserError
from ..encoders import to_float
from ..encoders.towers import is_transformer
from .fp import FPConfig, ChannelMask, _validate as validate_fp, keep_vector
from .ft import fine_tune
from .medic import medic
from .nad import nad

REFUSED = {
    "anp": "its neurons are BatchNorm channels and a transformer tower has no BatchNorm (LayerNorm normalises each "
           "token); use fp, nad, medic or mimic",
    "patchsearch": "its Grad-CAM hooks a convolutional stage module, which a transformer tower does not have",
}


def refusal(defense: str, encoder) -> str | None:
    """Why ``defense`` cannot run on ``encoder`` (one line), or None."""
    if is_transformer(encoder) and defense in REFUSED:
        return f"{defense} cannot run on a transformer tower ({encoder.config.arch}): {REFUSED[defense]}"
    return None


def check_runs_on(defense: str, encoder) -> None:
    reason = refusal(defense, encoder)
    if reason:
        raise UserError(reason)


# ----------------------------------------------------------------- NAD, MEDIC: the same code, other sites

def nad_on_blocks(encoder, clean, cfg, ctx):
    """NAD with its attention terms on the last ``len(betas)`` blocks when ``at_stages`` names no block."""
    names = encoder.stage_names
    if not all(s in names for s in cfg.at_stages):
        n = min(len(cfg.betas), len(names))
        cfg = dataclasses.replace(cfg, at_stages=tuple(names[-n:]), betas=tuple(cfg.betas[-n:]))
    ctx.record("nad_at_stages", list(cfg.at_stages))
    return nad(encoder, clean, cfg, ctx)


def medic_on_blocks(encoder, clean, cfg, ctx):
    """MEDIC cloning the block outputs (``layers="stages"``)."""
    return medic(encoder, clean, dataclasses.replace(cfg, layers="stages"), ctx)


# ----------------------------------------------------------------- FP on the MLP hidden units

@torch.no_grad()
def mlp_activation(encoder, images: torch.Tensor, stage: str, device, batch_size: int = 256) -> torch.Tensor:
    """Mean activation of each hidden unit of ``stage``'s MLP over images and tokens (H,)."""
    _, fc_out = encoder.backbone.mlp(stage)
    kept = []
    handle = fc_out.register_forward_pre_hook(lambda module, inputs: kept.append(inputs[0].float()))
    encoder.eval()
    total, n = None, 0
    try:
        for chunk in images.split(batch_size):
            kept.clear()
            encoder.features(to_float(chunk, device))
            hidden = kept[0].reshape(-1, kept[0].shape[-1])
            total = hidden.sum(0) if total is None else total + hidden.sum(0)
            n += hidden.shape[0]
    finally:
        handle.remove()
    return (total / n).cpu()


@torch.no_grad()
def prune_units(encoder, stage: str, pruned: torch.Tensor) -> None:
    """Zero the rows (and bias entries) of ``pruned`` hidden units in the MLP's first layer (in place)."""
    fc_in, _ = encoder.backbone.mlp(stage)
    fc_in.weight[pruned.to(fc_in.weight.device)] = 0
    if fc_in.bias is not None:
        fc_in.bias[pruned.to(fc_in.bias.device)] = 0


def _features(encoder, images, device, batch_size: int = 256) -> torch.Tensor:
    encoder.eval()
    with torch.no_grad():
        return torch.cat([encoder.features(to_float(c, device)).float() for c in images.split(batch_size)])


@torch.no_grad()
def choose_units(encoder, order: torch.Tensor, holdout: torch.Tensor, stage: str, cfg: FPConfig, device):
    """FP's label-free rule on MLP units: prune in steps of ``ratio_step`` while the mean cosine to the
    unpruned features on the hold-out stays at or above ``min_similarity`` (capped at ``max_ratio``)."""
    reference = _features(encoder, holdout, device)
    trial = encoder.clone()
    steps = max(1, math.floor(cfg.max_ratio / cfg.ratio_step + 1e-9))
    chosen, curve = 0, []
    for i in range(1, steps + 1):
        k = min(len(order) - 1, round(i * cfg.ratio_step * len(order)))
        if k <= chosen:
            continue
        prune_units(trial, stage, order[:k])
        sim = F.cosine_similarity(_features(trial, holdout, device), reference, dim=1).mean().item()
        curve.append({"ratio": k / len(order), "n_pruned": k, "similarity": sim})
        if sim < cfg.min_similarity:
            break
        chosen = k
    return chosen, curve


def _masked(encoder, stage: str, pruned: torch.Tensor, attach: bool) -> None:
    """Keep the pruned units at zero during fine-tuning (a parametrisation), or remove it keeping the zeros."""
    fc_in, _ = encoder.backbone.mlp(stage)
    for name in ("weight", "bias"):
        if getattr(fc_in, name, None) is None:
            continue
        if attach:
            keep = keep_vector(fc_in.out_features, pruned, getattr(fc_in, name))
            parametrize.register_parametrization(fc_in, name, ChannelMask(keep.view(-1, *[1] * (getattr(
                fc_in, name).ndim - 1))))
        elif parametrize.is_parametrized(fc_in, name):
            parametrize.remove_parametrizations(fc_in, name, leave_parametrized=True)


def fp_on_mlp(encoder, clean, cfg: FPConfig, ctx):
    """Fine-Pruning of the hidden units of a block's MLP (default: the last block), then FT's fine-tuning."""
    validate_fp(cfg)
    encoder = encoder.to(ctx.device).eval()
    stage = cfg.stage or encoder.stage_names[-1]
    if stage not in encoder.stage_names:
        raise ValueError(f"fp.stage {stage!r} is not a block of this tower ({', '.join(encoder.stage_names)})")
    images = clean.images
    perm = torch.randperm(len(images), generator=ctx.generator)
    n_hold = max(1, round(cfg.holdout_fraction * len(images))) if len(images) > 1 else 0
    holdout, ranking = images[perm[:n_hold]], images[perm[n_hold:]]
    act = mlp_activation(encoder, ranking if len(ranking) else images, stage, ctx.device)
    order = torch.sort(act, stable=True).indices
    if cfg.prune_by == "ratio":
        k, curve = min(len(order) - 1, round(cfg.ratio * len(order))), []
    else:
        k, curve = choose_units(encoder, order, holdout if len(holdout) else images, stage, cfg, ctx.device)
    pruned = order[:k].sort().values
    for key, value in (("fp_stage", stage), ("fp_site", "mlp hidden units"), ("fp_ratio", k / len(order)),
                       ("fp_n_pruned", int(k)), ("fp_pruned_channels", pruned.tolist()),
                       ("fp_mean_activation", [round(v, 6) for v in act.tolist()]), ("fp_similarity_curve", curve)):
        ctx.record(key, value)
    ctx.logger.info("fp: pruning %d of %d MLP units of %s (%.2f)", k, len(order), stage, k / len(order))
    prune_units(encoder, stage, pruned)
    _masked(encoder, stage, pruned, attach=True)
    try:
        fine_tune(encoder, clean, cfg.fine_tuning(), ctx, desc="fp_ft")
    finally:
        _masked(encoder, stage, pruned, attach=False)
    return encoder.eval()


VARIANTS: dict[str, Callable] = {"fp": fp_on_mlp, "nad": nad_on_blocks, "medic": medic_on_blocks}


def runner(component, encoder) -> Callable:
    """The function that runs ``component`` (a registered defense) on ``encoder``: its own, or the tower
    variant above; a refused pair is a one-line UserError."""
    if not is_transformer(encoder):
        return component.fn
    check_runs_on(component.name, encoder)
    return VARIANTS.get(component.name, component.fn)
