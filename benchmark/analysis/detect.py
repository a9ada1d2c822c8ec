"""Screening an encoder for a backdoor with a registered detector (``defbench detect``).

A detector (``defenses.DETECTORS``; DECREE's trigger inversion registers
``decree``) scores one encoder on clean images; the score is compared with the
threshold in its defense's config (``pl1_threshold`` for DECREE). The
inversion is non-convex, so :func:`run_detection` keeps the most backdoor-like
score over several random starts. :func:`calibrate` derives a threshold from
*clean* encoders only (the profile's SimCLR encoders of several seeds): a low
quantile of their scores, so no attacked encoder, trigger or ASR ever sets it.
Calibration numbers: ``docs/detect.md``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...core import UserError
from ...defenses import DETECTORS
from ...encoders import RunContext
from ..datasets import load_dataset

DEFAULT_DATA = "synth-cifar10"


def detection_images(data: str, n: int, image_size: int, data_dir, seed: int, fraction: float = 0.0,
                     cap: int = 0) -> torch.Tensor:
    """A seeded random subset of ``data``'s pre-training split, resized to ``image_size``.

    ``n`` images, or when ``n`` is 0 ``fraction`` of the split capped at ``cap``
    (0: no cap), the way the benchmark draws a defender's clean set.
    """
    images = load_dataset(data, "pretrain", data_dir, image_size).images
    if n > len(images):
        raise UserError(f"--images {n}: {data} has only {len(images)} images")
    if not n:
        n = max(2, round(fraction * len(images)))
        n = min(n, cap) if cap else n
    if len(images) < 2:
        raise UserError(f"{data} has {len(images)} image; a detector needs at least 2")
    if 0 < n < len(images):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images = images[pick.sort().values]
    return images


def run_detection(detector_name: str, encoder, images: torch.Tensor, cfg, ctx: RunContext,
                  threshold: float | None = None, restarts: int = 1) -> dict:
    """The most backdoor-like score over ``restarts`` runs from different random starts (seeds ``ctx.seed``,
    ``ctx.seed + 1``, ...), with the verdict against ``threshold`` (default: the config's)."""
    detector = DETECTORS.get(detector_name)
    threshold = getattr(cfg, detector.threshold_field) if threshold is None else threshold
    started = time.perf_counter()
    first_seed, runs = ctx.seed, []
    for i in range(restarts):
        ctx.reseed(first_seed + i)
        runs.append(detector.fn(encoder, images, cfg, ctx))
    pick = min if detector.backdoored_if_below else max
    info = pick(runs, key=lambda r: r["score"])
    backdoored = info["score"] < threshold if detector.backdoored_if_below else info["score"] > threshold
    info.update(detector=detector_name, score_name=detector.score_name,
                restarts=[round(r["score"], 4) for r in runs], threshold=threshold,
                verdict="backdoored" if backdoored else "clean", seconds=round(time.perf_counter() - started, 2))
    return info


def calibrate(scores: list[float], quantile: float, backdoored_if_below: bool = True) -> float:
    """A threshold from clean encoders' scores: their ``quantile`` (low side when small scores mean backdoored),
    so about that share of clean encoders would be called backdoored."""
    if not scores:
        raise ValueError("calibration needs the scores of at least one clean encoder")
    q = quantile if backdoored_if_below else 1 - quantile
    return float(np.quantile(np.asarray(scores, dtype=float), q))


def encoder_label(path: Path | str) -> str:
    return str(path)
