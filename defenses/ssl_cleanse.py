"""SSL-Cleanse (Zheng et al., ECCV 2024): per-cluster trigger inversion, a MAD outlier test, then unlearning.

1. **Clusters**: k-means (best of ``kmeans_restarts`` k-means++ runs, :func:`defbench.defenses.moth.kmeans`) on
   the suspect's raw clean features.
2. **Inversion, per cluster c**: a mask + pattern (tanh space, :mod:`defbench.defenses.decree` helpers) stamped
   on images of the other clusters, pulled to random embeddings of cluster c:
   ``loss = 2 - 2 cos(f(x (+) t), z_c) + lambda mean(m * p)``. After every epoch the stamped clean images are
   classified by 1-NN among the clean features; the epoch succeeds when more than ``success_threshold`` of them
   land in c. Lambda starts at 0, is set after ``patience`` successful epochs and is then moved by
   ``lambda_factor``; the cluster's score is the smallest epoch-mean ``mean(m * p)`` among successes (1 if none).
3. **Detection**: anomaly index ``|min - median| / MAD`` of the scores (the reference's MAD scaling); above
   ``anomaly_threshold``: backdoored (recorded; also the ``ssl-cleanse`` detector of ``defbench detect``).
4. **Mitigation**: the whole encoder (BatchNorm training) is fine-tuned with Adam on augmented clean views:
   ``2 - 2 cos(f(v1), f_0(v2))`` plus ``2 - 2 cos(f(v3 (+) t_c), f_0(v2))`` with a random found trigger t_c per
   image (f_0: the frozen suspect), so stamped images keep their clean embeddings.

Parity with the reference: docs/methods/ssl-cleanse.md
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoders import Encoder, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from .base import Detector, register_defense, register_detector
from .decree import _from_tanh_space, _to_tanh_space, stamp
from .moth import kmeans

MAD_CONSISTENCY = 1.4826  # the reference's outlier(): 1.4826 * median|x - median| / 0.6745
MAD_NORMAL_QUANTILE = 0.6745


@dataclass
class SSLCleanseConfig:
    # --- clusters (detector.py: sklearn KMeans(n_clusters=num_clusters, random_state=0, n_init=30))
    clusters: int = 12
    kmeans_restarts: int = 30
    kmeans_iters: int = 300
    # --- trigger inversion (detector.py / cfg.py; the README's command line)
    inv_epochs: int = 1000
    inv_batch_size: int = 32
    inv_lr: float = 0.1
    init_lambda: float = 0.1
    lambda_factor: float = 1.5
    patience: int = 5
    success_threshold: float = 0.99
    knn_images: int = 1000
    early_stop: bool = False  # the README's command does not pass --early_stop
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 10
    start_early_stop_patience: int = 50
    # --- detection
    anomaly_threshold: float = 2.0
    # --- mitigation (mitigator/core/train.py, cfg.py and the README's command line)
    unlearn_steps: int = 8000
    batch_size: int = 1536
    lr: float = 3e-3
    weight_decay: float = 1e-6
    warmup_fraction: float = 0.0625  # 500 warm-up updates of the reference's 8,000
    lr_drops: tuple[float, float] = (0.9, 0.95)  # MultiStepLR at epochs 450 and 475 of 500
    lr_drop_gamma: float = 0.2
    clean_weight: float = 1.0  # alpha_1
    trigger_weight: float = 1.0  # alpha_4

    def validate(self) -> None:
        if self.clusters < 3:
            raise ValueError(f"ssl-cleanse.clusters must be at least 3 (a median and MAD of the clusters' trigger "
                             f"norms), got {self.clusters}")
        if not 0 < self.success_threshold < 1:
            raise ValueError(f"ssl-cleanse.success_threshold must be in (0, 1), got {self.success_threshold}")
        if self.lambda_factor <= 1:
            raise ValueError(f"ssl-cleanse.lambda_factor must be > 1, got {self.lambda_factor}")
        if self.kmeans_restarts < 1 or self.knn_images < 1 or self.patience < 1:
            raise ValueError("ssl-cleanse.kmeans_restarts, knn_images and patience must be at least 1")
        if not all(0 <= d <= 1 for d in self.lr_drops):
            raise ValueError(f"ssl-cleanse.lr_drops are fractions of unlearn_steps in [0, 1], got {self.lr_drops}")


# ----------------------------------------------------------------- clusters

@torch.no_grad()
def embed(encoder: Encoder, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """Raw (unnormalised) features of uint8 ``images``, eval mode, on the CPU."""
    encoder.eval()
    return torch.cat([encoder.features(to_float(chunk, device)).float().cpu() for chunk in images.split(batch_size)])


def cluster(features: torch.Tensor, cfg: SSLCleanseConfig, generator: torch.Generator) -> torch.Tensor:
    """Labels of the best (lowest inertia) of ``kmeans_restarts`` k-means++ runs."""
    if cfg.clusters > len(features):
        raise ValueError(f"ssl-cleanse: {cfg.clusters} clusters need at least as many clean images, got "
                         f"{len(features)}")
    best, best_inertia = None, math.inf
    for _ in range(cfg.kmeans_restarts):
        centroids, labels = kmeans(features.clone(), cfg.clusters, cfg.kmeans_iters, generator)
        inertia = (features - centroids[labels]).pow(2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def anomaly_index(scores: torch.Tensor) -> dict:
    """The reference's outlier test on the clusters' trigger norms: how far the smallest lies below the median."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    median = scores.median()
    mad = MAD_CONSISTENCY * (scores - median).abs().median() / MAD_NORMAL_QUANTILE
    gap = (scores.min() - median).abs()
    index = (gap / mad).item() if mad > 0 else (math.inf if gap > 0 else 0.0)
    return {"median": median.item(), "mad": mad.item(), "anomaly_index": index,
            "flagged_cluster": int(scores.argmin())}


# ----------------------------------------------------------------- inversion

@torch.no_grad()
def _knn_rate(model: Encoder, images: torch.Tensor, pick: torch.Tensor, mask, pattern, features: torch.Tensor,
              labels: torch.Tensor, target: int, device) -> float:
    """Share of the stamped ``images[pick]`` whose nearest clean feature belongs to cluster ``target``."""
    hits = 0
    for chunk in pick.split(256):
        f = model.features(stamp(to_float(images[chunk], device), mask, pattern)).float().cpu()
        hits += (labels[torch.cdist(f, features).argmin(1)] == target).sum().item()
    return hits / len(pick)


def inversion_draws(labels: torch.Tensor, target: int, shape: tuple[int, int], generator: torch.Generator) -> dict:
    """The random inputs of one cluster's inversion (the reference's ``detector.py``): ``sample``, a random subset
    of the other clusters' images (N - the largest cluster's size); ``partner``, for each, a random image of
    cluster ``target`` whose feature it is pulled to (``DatasetCluster``); the initial ``raw_mask`` (H x W) and
    ``raw_pattern`` (3 x H x W) in tanh space, from uniform noise."""
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    others = torch.nonzero(labels != target).flatten()
    sample = others[torch.randperm(len(others), generator=generator)[:len(labels) - int(counts.max())]]
    if len(sample) == 0:
        sample = others
    members = torch.nonzero(labels == target).flatten()
    partner = members[torch.randint(len(members), (len(sample),), generator=generator)]
    h, w = shape
    return {"sample": sample, "partner": partner, "raw_mask": _to_tanh_space(torch.rand(h, w, generator=generator)),
            "raw_pattern": _to_tanh_space(torch.rand(3, h, w, generator=generator))}


def knn_sample(n_images: int, cfg: SSLCleanseConfig, generator: torch.Generator) -> torch.Tensor:
    """The images of one epoch's success test: ``knn_images`` drawn with replacement, anew every epoch (the
    reference's ``DatasetEval``)."""
    return torch.randint(n_images, (cfg.knn_images,), generator=generator)


def invert_cluster(model: Encoder, images: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, target: int,
                   cfg: SSLCleanseConfig, ctx, monitor: Callable[..., None] | None = None) -> dict:
    """The smallest trigger moving the other clusters' images to cluster ``target``; ``model`` frozen (eval).

    Returns ``{"reg", "mask", "pattern", "found", "epochs", "lambda", "mask_l1"}``; ``reg`` is the
    reference's score (epoch-mean ``mean(m * p)`` of the best success, 1.0 when none). ``monitor(**values)``
    is called after every update (the loss terms, the raw mask and pattern with their gradients) and after every
    epoch (its success rate, the trigger the success test stamped, and the schedule); the reference-trace test reads
    them.
    """
    device, gen = ctx.device, ctx.generator
    draws = inversion_draws(labels, target, tuple(images.shape[-2:]), gen)
    sample = draws["sample"]
    paired = features[draws["partner"]].to(device)
    raw_mask = draws["raw_mask"].to(device).requires_grad_(True)
    raw_pattern = draws["raw_pattern"].to(device).requires_grad_(True)
    opt = torch.optim.Adam([raw_pattern, raw_mask], lr=cfg.inv_lr, betas=(0.5, 0.9))
    batch_size = min(cfg.inv_batch_size, len(sample))

    lam = 0.0
    best, reg_best, early_best = None, math.inf, math.inf
    early_count = set_count = up = down = 0
    went_up = went_down = False
    epoch = 0
    with torch.enable_grad():
        for epoch in range(cfg.inv_epochs):
            regs = []
            for idx in ctx.batches(len(sample), batch_size):
                mask, pattern = _from_tanh_space(raw_mask), _from_tanh_space(raw_pattern)
                x = stamp(to_float(images[sample[idx]], device), mask, pattern)
                z = model.features(x)
                loss_sim = 2 - 2 * F.cosine_similarity(z, paired[idx.to(device)], dim=1).mean()
                reg = (mask * pattern).mean()
                loss = loss_sim + lam * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                regs.append(reg.item())
                if monitor is not None:
                    monitor(loss_sim=loss_sim.item(), reg=regs[-1], loss=loss.item(), raw_mask=raw_mask,
                            raw_pattern=raw_pattern)
            reg_epoch = sum(regs) / len(regs)
            # the success test and the kept trigger use the last batch's trigger, as the reference's (before
            # that batch's update)
            mask, pattern = mask.detach(), pattern.detach()
            rate = _knn_rate(model, images, knn_sample(len(images), cfg, gen), mask, pattern, features, labels,
                             target, device)
            success = rate >= cfg.success_threshold
            if rate > cfg.success_threshold and reg_epoch < reg_best:
                reg_best = reg_epoch
                best = (mask.detach().cpu().clone(), pattern.detach().cpu().clone())
            if cfg.early_stop:
                if went_up and went_down:
                    if reg_best < math.inf:
                        early_count = early_count + 1 if reg_best >= cfg.early_stop_threshold * early_best else 0
                    early_best = min(early_best, reg_best)
                    if early_count >= cfg.early_stop_patience:
                        break
                elif epoch == cfg.start_early_stop_patience and (lam == 0 or reg_best == math.inf):
                    break
            if lam == 0 and success:
                set_count += 1
                if set_count >= cfg.patience:
                    lam, up, down, went_up, went_down = cfg.init_lambda, 0, 0, False, False
            else:
                set_count = 0
            up, down = (up + 1, 0) if success else (0, down + 1)
            if lam != 0 and up >= cfg.patience:
                up, lam, went_up = 0, lam * cfg.lambda_factor, True
            elif lam != 0 and down >= cfg.patience:
                down, lam, went_down = 0, lam / cfg.lambda_factor, True
            if monitor is not None:
                monitor(epoch=epoch, rate=rate, reg_epoch=reg_epoch, reg_best=reg_best, lam=lam, mask=mask,
                        pattern=pattern)
    found = best is not None
    if not found:
        with torch.no_grad():
            best = (_from_tanh_space(raw_mask).cpu(), _from_tanh_space(raw_pattern).cpu())
    return {"reg": reg_best if found else 1.0, "mask": best[0], "pattern": best[1], "found": found,
            "epochs": epoch + 1, "lambda": lam, "mask_l1": best[0].sum().item()}


def detect_triggers(encoder: Encoder, images: torch.Tensor, cfg: SSLCleanseConfig, ctx) -> tuple[list[dict], dict]:
    """Cluster, invert one trigger per cluster and run the outlier test; the encoder is not modified.

    Returns ``(triggers, info)``: one dict per cluster (see :func:`invert_cluster`, plus ``cluster`` and
    ``size``) and a JSON-able summary with the scores, the anomaly index and the verdict.
    """
    model = frozen_copy(encoder).to(ctx.device)
    features = embed(model, images, ctx.device)
    labels = cluster(features, cfg, ctx.generator)
    k = int(labels.max()) + 1
    triggers = []
    for c in ctx.progress(range(k), desc="ssl-cleanse invert", total=k):
        if not (labels == c).any():
            continue
        trig = invert_cluster(model, images, features, labels, c, cfg, ctx)
        trig.update(cluster=c, size=int((labels == c).sum()))
        triggers.append(trig)
    scores = torch.tensor([t["reg"] for t in triggers])
    info = anomaly_index(scores)
    info["flagged_cluster"] = triggers[info["flagged_cluster"]]["cluster"]
    h, w = images.shape[-2:]
    info.update(scores=[round(t["reg"], 6) for t in triggers], found=[t["found"] for t in triggers],
                epochs=[t["epochs"] for t in triggers], cluster_sizes=[t["size"] for t in triggers],
                min_score=float(scores.min()), min_mask_l1=min(t["mask_l1"] for t in triggers) / (h * w),
                verdict="backdoored" if info["anomaly_index"] > cfg.anomaly_threshold else "clean")
    return triggers, info


# ----------------------------------------------------------------- mitigation

def unlearn(encoder: Encoder, images: torch.Tensor, triggers: list[dict], cfg: SSLCleanseConfig, ctx) -> list[float]:
    """Fine-tune ``encoder`` in place so stamped views embed like clean views did in the frozen suspect.

    Returns the mean loss over each tenth of the updates.
    """
    device = ctx.device
    reference = frozen_copy(encoder).to(device)
    model = encoder.to(device).train()
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    masks = torch.stack([t["mask"] for t in triggers]).to(device)
    patterns = torch.stack([t["pattern"] for t in triggers]).to(device)
    augment = SimCLRAugment(crop_scale=(0.2, 1.0), gray_p=0.1)  # mitigator cfg.py: crop_s0 0.2, gs_p 0.1
    batch_size = min(cfg.batch_size, len(images))
    warmup = round(cfg.warmup_fraction * cfg.unlearn_steps)
    drops = [round(d * cfg.unlearn_steps) for d in cfg.lr_drops]
    history, window, batches = [], [], []
    chunk = max(1, cfg.unlearn_steps // 10)
    for step in ctx.progress(range(cfg.unlearn_steps), desc="ssl-cleanse unlearn", total=cfg.unlearn_steps):
        lr = cfg.lr * cfg.lr_drop_gamma ** sum(step >= d for d in drops)
        if step < warmup:
            lr = cfg.lr * (step + 1) / warmup
        for group in opt.param_groups:
            group["lr"] = lr
        if not batches:
            batches = ctx.batches(len(images), batch_size)
        x = to_float(images[batches.pop(0)], device)
        v1, v2, v3 = augment(x), augment(x), augment(x)
        which = torch.randint(len(triggers), (len(x),), generator=ctx.generator).to(device)
        v3 = stamp(v3, masks[which].unsqueeze(1), patterns[which])
        with torch.no_grad():
            target = F.normalize(reference.features(v2), dim=1)
        f1, f3 = F.normalize(model.features(torch.cat([v1, v3])), dim=1).chunk(2)
        loss = cfg.clean_weight * (2 - 2 * (f1 * target).sum(1).mean()) + \
            cfg.trigger_weight * (2 - 2 * (f3 * target).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if len(window) == chunk or step == cfg.unlearn_steps - 1:
            history.append(sum(window) / len(window))
            window = []
    return history


@register_defense("ssl-cleanse", config=SSLCleanseConfig,
                  summary="invert a trigger per k-means cluster of clean embeddings, flag the smallest by MAD, "
                          "unlearn the triggers (SSL-Cleanse)",
                  profiles={"tiny": {"inv_epochs": 20, "knn_images": 500, "unlearn_steps": 200, "batch_size": 256},
                            "ci": {"clusters": 5, "kmeans_restarts": 5, "inv_epochs": 10, "knn_images": 200,
                                   "unlearn_steps": 20, "batch_size": 64}},
                  budget=("inv_epochs", "unlearn_steps"))
def ssl_cleanse(encoder, clean, cfg: SSLCleanseConfig, ctx):
    triggers, info = detect_triggers(encoder, clean.images, cfg, ctx)
    for key, value in info.items():
        ctx.record(f"ssl_cleanse_{key}", value)
    ctx.logger.info("ssl-cleanse: scores %s, anomaly index %.2f -> %s", info["scores"], info["anomaly_index"],
                    info["verdict"])
    found = [t for t in triggers if t["found"]]
    ctx.record("ssl_cleanse_unlearned_triggers", len(found))
    if found and cfg.unlearn_steps > 0:
        ctx.record("ssl_cleanse_unlearn_loss", unlearn(encoder, clean.images, found, cfg, ctx))
    return encoder.eval()


def _detect(encoder: Encoder, images: torch.Tensor, cfg: SSLCleanseConfig, ctx) -> dict:
    """SSL-Cleanse as a detector: the anomaly index of the clusters' trigger norms (large: backdoored)."""
    info = detect_triggers(encoder, images, cfg, ctx)[1]
    return {**info, "score": info["anomaly_index"]}


register_detector(Detector("ssl-cleanse", _detect, defense="ssl-cleanse", threshold_field="anomaly_threshold",
                           backdoored_if_below=False, score_name="anomaly index",
                           summary="SSL-Cleanse: anomaly index (MAD) of per-cluster inverted trigger norms "
                                   "(large: backdoored)"))
