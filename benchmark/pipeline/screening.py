"""Evaluating an encoder that screens its inputs (``encoders.screening.ScreenedEncoder``, e.g. DeDe's).

The screen stands in front of the encoder and sees every input it is given, the probe's training
images included. The evaluation is the usual one (:mod:`.evaluate`: frozen features, the MLP probe,
ACC and ASR) with rejections counted as follows:

- the probe trains on the accepted training images only (a rejected image never reaches it);
- ACC: a rejected clean test image counts as misclassified (the clean cost of the screen);
- ASR: a rejected triggered test image counts as not attacked (the backdoor was stopped);
- recorded beside them: ``rejected_train``, ``rejected_clean``, ``rejected_triggered`` (percent of each
  set the screen refused) and ``acc_accepted`` (accuracy over the accepted clean test images, the
  reference DeDe's "BA").

An encoder without a screen accepts everything, and these rules then give exactly :func:`.evaluate.score`.
This module enters the key of an evaluate stage only when its encoder comes from a defense registered
with ``screens=True`` (``stages.Stage.code``), so no other stage's key depends on it.
"""
from __future__ import annotations

import torch

from ...encoders import Encoder, RunContext, to_float
from ...encoders.screening import accepts
from . import evaluate as evaluation
from .settings import EvalSettings


@torch.no_grad()
def accept_mask(encoder: Encoder, images: torch.Tensor, ctx: RunContext, batch_size: int = 512,
                trigger=None) -> torch.Tensor:
    """Bool (N,) on the CPU: which of ``images`` (uint8) the encoder's screen accepts (after ``trigger``)."""
    encoder.to(ctx.device).eval()
    out = []
    for chunk in images.split(batch_size):
        x = to_float(chunk, ctx.device)
        if trigger is not None:
            x = trigger.apply(x)
        out.append(accepts(encoder, x).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def score_screened(pred_clean: torch.Tensor, ok_clean: torch.Tensor, pred_triggered: torch.Tensor | None,
                   ok_triggered: torch.Tensor | None, labels: torch.Tensor, target: int | None) -> dict:
    """ACC and both ASR conventions in percent with rejections counted as the module says, plus the
    rejection rates (percent) and ``acc_accepted``."""
    correct = (pred_clean == labels) & ok_clean
    metrics = {"acc": 100.0 * correct.float().mean().item(), "asr_all": float("nan"), "asr_excl": float("nan"),
               "n_test": int(len(labels)),
               "rejected_clean": 100.0 * (~ok_clean).float().mean().item(),
               "acc_accepted": 100.0 * correct[ok_clean].float().mean().item() if ok_clean.any() else float("nan")}
    if pred_triggered is not None:
        hit = ((pred_triggered == target) & ok_triggered).float()
        not_target = labels != target
        metrics.update(asr_all=100.0 * hit.mean().item(),
                       asr_excl=100.0 * hit[not_target].mean().item() if not_target.any() else float("nan"),
                       rejected_triggered=100.0 * (~ok_triggered).float().mean().item())
    return metrics


def probe_and_score(f_train: torch.Tensor, ok_train: torch.Tensor, train, f_test: torch.Tensor,
                    ok_test: torch.Tensor, f_trig: torch.Tensor | None, ok_trig: torch.Tensor | None, test,
                    target: int | None, cfg: EvalSettings, ctx: RunContext) -> dict:
    """Train the probe on the accepted training features, predict every test image, count rejections."""
    if not ok_train.any():
        raise ValueError("the encoder's screen rejected every training image of the task; no probe can be trained")
    probe = evaluation.train_probe(f_train[ok_train], train.labels[ok_train],
                                   max(train.num_classes, test.num_classes), cfg, ctx)
    pred_trig = evaluation.predict(probe, f_trig, ctx.device) if f_trig is not None else None
    metrics = score_screened(evaluation.predict(probe, f_test, ctx.device), ok_test, pred_trig, ok_trig,
                             test.labels, target)
    metrics["rejected_train"] = 100.0 * (~ok_train).float().mean().item()
    return metrics


def evaluate_screened_encoder(encoder: Encoder, train, test, trigger, target: int, cfg: EvalSettings,
                              ctx: RunContext) -> dict:
    """:func:`.evaluate.evaluate_encoder` for an encoder that may screen its inputs (without the store)."""
    f_train = evaluation.extract_features(encoder, train.images, ctx, cfg.feature_batch)
    f_test = evaluation.extract_features(encoder, test.images, ctx, cfg.feature_batch)
    f_trig = evaluation.extract_features(encoder, test.images, ctx, cfg.feature_batch, trigger=trigger)
    ok_train = accept_mask(encoder, train.images, ctx, cfg.feature_batch)
    ok_test = accept_mask(encoder, test.images, ctx, cfg.feature_batch)
    ok_trig = accept_mask(encoder, test.images, ctx, cfg.feature_batch, trigger=trigger)
    return probe_and_score(f_train, ok_train, train, f_test, ok_test, f_trig, ok_trig, test, target, cfg, ctx)
