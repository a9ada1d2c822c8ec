"""Downstream evaluation: frozen features, an MLP probe, ACC and ASR.

Features are the encoder's L2-normalised backbone output under the test
transform (no augmentation). The probe is the reference MLP
(D -> 512 -> ReLU -> Dropout(0.5) -> 256 -> ReLU -> C, cross-entropy, Adam),
trained on clean training features with shuffled batches (the reference code
forgot to shuffle). ACC is clean test accuracy; ASR is the fraction of
trigger-stamped test images classified as the target, stored both over all
test images (the papers' convention) and excluding the target class's own
images (the stricter one); without a trigger only ACC is measured.

The probe's random numbers (initialisation, batch order, dropout) come from
:func:`probe_seed`: the task, the evaluation settings, the profile's seed and
the encoder's weights. Equal weights give equal numbers wherever they come
from (a grid stage or a user's file); the trigger and target play no part,
since the probe never sees a triggered image.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ...encoders import Encoder, RunContext, to_float
from .keys import digest
from .settings import EvalSettings


def weights_digest(encoder: Encoder) -> str:
    """sha256 of what determines the encoder's features: its config (less the projection head's sizes) and its
    backbone's weights and buffers."""
    h = hashlib.sha256(digest({k: v for k, v in encoder.config.to_dict().items()
                               if k not in ("proj_hidden", "proj_dim")}).encode())
    for name, tensor in sorted(encoder.backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def probe_seed(spec: dict, encoder: Encoder) -> int:
    """The probe's seed for an evaluate stage's ``spec``: the task, settings and profile seed, and the weights."""
    task = {k: spec[k] for k in ("downstream", "data", "image_size", "eval", "seed")}
    return int(digest({"task": task, "weights": weights_digest(encoder)})[:8], 16) % (2**31)


@torch.no_grad()
def extract_features(encoder: Encoder, images: torch.Tensor, ctx: RunContext, batch_size: int = 512,
                     trigger=None, desc: str = "features") -> torch.Tensor:
    encoder.to(ctx.device).eval()
    out = []
    chunks = images.split(batch_size)
    for chunk in ctx.progress(chunks, desc=desc, total=len(chunks)):
        x = to_float(chunk, ctx.device)
        if trigger is not None:
            x = trigger.apply(x)
        out.append(F.normalize(encoder.features(x), dim=1).float().cpu())
    return torch.cat(out)


def make_probe(in_dim: int, num_classes: int, hidden: tuple[int, int], dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_dim, hidden[0]), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
        nn.Linear(hidden[1], num_classes),
    )


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: EvalSettings,
                ctx: RunContext) -> nn.Module:
    probe = make_probe(features.shape[1], num_classes, tuple(cfg.hidden), cfg.dropout).to(ctx.device)
    # fused: one kernel per step instead of one per tensor; the probe is small, so the step overhead counts
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, fused=True)
    x, y = features.to(ctx.device), labels.to(ctx.device)
    probe.train()
    for _ in ctx.progress(range(cfg.epochs), desc="probe", total=cfg.epochs):
        for idx in ctx.batches(len(x), cfg.batch_size, shuffle=True, drop_last=False):
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: nn.Module, features: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([probe(chunk.to(device)).argmax(1).cpu() for chunk in features.split(4096)])


def score(pred_clean: torch.Tensor, pred_triggered: torch.Tensor | None, labels: torch.Tensor,
          target: int | None) -> dict:
    """ACC and both ASR conventions, in percent (ASR NaN without triggered predictions)."""
    if pred_triggered is None:
        return {"acc": 100.0 * (pred_clean == labels).float().mean().item(), "asr_all": float("nan"),
                "asr_excl": float("nan"), "n_test": int(len(labels))}
    not_target = labels != target
    hit = (pred_triggered == target).float()
    return {
        "acc": 100.0 * (pred_clean == labels).float().mean().item(),
        "asr_all": 100.0 * hit.mean().item(),
        "asr_excl": 100.0 * hit[not_target].mean().item() if not_target.any() else float("nan"),
        "n_test": int(len(labels)),
    }


def evaluate_encoder(encoder: Encoder, train, test, trigger, target: int, cfg: EvalSettings,
                     ctx: RunContext) -> dict:
    """ACC/ASR of one encoder on one task (ImageSets), without the artifact store."""
    f_train = extract_features(encoder, train.images, ctx, cfg.feature_batch)
    f_test = extract_features(encoder, test.images, ctx, cfg.feature_batch)
    f_trig = extract_features(encoder, test.images, ctx, cfg.feature_batch, trigger=trigger)
    probe = train_probe(f_train, train.labels, max(train.num_classes, test.num_classes), cfg, ctx)
    return score(predict(probe, f_test, ctx.device), predict(probe, f_trig, ctx.device), test.labels, target)
