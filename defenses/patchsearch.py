"""PatchSearch (Tejankar et al., CVPR 2023): find the poisons in the suspect's pre-training set, drop them, re-train.

Works on the suspect's unlabelled pre-training set (``needs_pretrain_data``), not on the clean set:

1. **Clusters**: k-means (:func:`defbench.defenses.moth.kmeans`) on the suspect's L2-normalised features.
2. **Candidate patch** of an image: Grad-CAM of its cluster-assignment score (cosine to the cluster means) at
   the encoder's last stage; the ``window`` x ``window`` square holding the most heat.
3. **Poison score**: the patch pasted at random places on the test images (those closest to each centroid);
   the score is how many of them then fall in the image's cluster minus how many did before.
4. **Iterative search**: each round scores ``samples_per_iteration`` random unscored images of every
   candidate cluster, then drops the ``remove_fraction`` of candidate clusters with the lowest best score.
5. **Poison classifier**: the patches of the ``topk_poisons`` best-scored images, pasted at random on the rest of
   the set, train an ensemble of small ResNets (poisoned vs not); every image it calls poisoned is removed.
6. **Re-training**: a fresh encoder of the suspect's architecture, pre-trained on the kept images with the
   victim's recipe (``pretrain.recipe``).

Records the number of clusters, images scored, search rounds, the top scores, the classifier's validation F1,
the number of images removed and kept (``pretrain_removed``: their indices, for the harness) and the
re-training loss.

Parity with the reference: docs/methods/patchsearch.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoders import Encoder, to_float, train_simclr
from ..encoders.augment import color_jitter, horizontal_flip, random_grayscale, random_resized_crop
from .base import register_defense
from .moth import encode, kmeans
from .pretrain_data import REMOVED_RECORD, PretrainData

REFERENCE_SIZE = 224  # the reference's input side: its window and paste sizes are fractions of it here


@dataclass
class PatchSearchConfig:
    # 1. clusters (patch_search_iterative_search.py: --num_clusters 1000; faiss k-means, 20 iterations)
    clusters: int = 1000
    kmeans_iters: int = 20
    # 2-3. candidate patches and their poison score (--window_w 60 of 224 px, --test_images_size 1000)
    window_fraction: float = 60 / REFERENCE_SIZE
    test_images: int = 1000
    # 4. iterative search (--samples_per_iteration 2, --remove_per_iteration 0.25, --prune_clusters)
    samples_per_iteration: int = 2
    remove_fraction: float = 0.25
    prune_clusters: bool = True
    # 5. poison classifier (patch_search_poison_classifier.py, as run_pipeline.sh runs it)
    topk_poisons: int = 20
    top_fraction: float = 0.10  # --top_p: the best-scored share left out of the classifier's training set
    model_count: int = 5
    max_iterations: int = 2000
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_freq: int = 20
    stable_evals: int = 10  # stop once this many validation F1s in a row agree (in whole percent)
    crop_min_fraction: float = 0.2  # RandomResizedCrop(scale=(0.2, 1))
    paste_min_fraction: float = 20 / REFERENCE_SIZE  # pasted patch side, drawn in [min, max) of the image side
    paste_max_fraction: float = 80 / REFERENCE_SIZE
    paste_margin_fraction: float = 10 / REFERENCE_SIZE
    # 6. re-training on the kept images with the victim's recipe
    retrain: bool = True
    search_batch_size: int = 256  # images per forward pass while searching (compute only)

    def validate(self) -> None:
        if self.clusters < 1 or self.topk_poisons < 1 or self.model_count < 1 or self.samples_per_iteration < 1:
            raise ValueError("patchsearch.clusters, topk_poisons, model_count and samples_per_iteration must be "
                             "at least 1")
        if not 0 < self.window_fraction <= 1:
            raise ValueError(f"patchsearch.window_fraction must be in (0, 1], got {self.window_fraction}")
        if not 0 < self.paste_min_fraction < self.paste_max_fraction <= 1:
            raise ValueError("patchsearch.paste_min_fraction < paste_max_fraction must lie in (0, 1], got "
                             f"{self.paste_min_fraction}, {self.paste_max_fraction}")
        if self.eval_freq < 1 or self.stable_evals < 1:
            raise ValueError("patchsearch.eval_freq and stable_evals must be at least 1")


def pixels(fraction: float, size: int) -> int:
    return max(1, round(fraction * size))


# ----------------------------------------------------------------- 1. clusters

@dataclass
class Clusters:
    centroids: torch.Tensor  # k x D (CPU), the k-means centroids of the normalised features
    labels: torch.Tensor  # N, nearest centroid of each image
    distance: torch.Tensor  # N, distance to it
    prototypes: torch.Tensor  # k x D, the mean feature of each cluster's images (the reference's KMeansLinear)

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cdist(features, self.centroids).argmin(1)


def cluster(features: torch.Tensor, k: int, iters: int, generator) -> Clusters:
    centroids, _ = kmeans(features.clone(), k, iters, generator)
    distance, labels = torch.cdist(features, centroids).min(1)  # the final centroids' assignment (index.search)
    prototypes = centroids.clone()
    for c in labels.unique().tolist():
        prototypes[c] = features[labels == c].mean(0)
    return Clusters(centroids, labels, distance, prototypes)


# ----------------------------------------------------------------- 2. Grad-CAM and candidate patches

def grad_cam(encoder: Encoder, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM heat maps (B x H x W, each scaled to [0, 1]) of the best cluster score of float images ``x``.

    The score of cluster j is ``cos(f(x), prototypes[j])``; the explained class is each image's best cluster
    (pytorch-grad-cam with ``targets=None``); the layer is the encoder's last stage. Scaled as pytorch-grad-cam
    scales a one-layer map: to [0, 1] at the layer's size, resized bilinearly to the image, scaled again.
    """
    layer = dict(encoder.backbone.named_modules())[encoder.stage_names[-1]]
    kept = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: kept.__setitem__("act", output))
    try:
        with torch.enable_grad():
            feature = encoder.features(x.detach().requires_grad_(True))  # a graph even when the weights are frozen
            scores = F.normalize(feature.float(), dim=1) @ F.normalize(prototypes.to(x.device), dim=1).t()
            best = scores.max(1).values.sum()
            (grads,) = torch.autograd.grad(best, kept["act"])
    finally:
        handle.remove()
    act, grads = kept["act"].detach().float(), grads.float()
    cam = _min_max(F.relu((grads.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True)))
    return _min_max(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)).squeeze(1)


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map (B x 1 x H x W) minus its minimum, divided by its new maximum + 1e-7 (scale_cam_image)."""
    maps = maps - maps.flatten(1).min(1).values.view(-1, 1, 1, 1)
    return maps / (maps.flatten(1).max(1).values.view(-1, 1, 1, 1) + 1e-7)


def max_window(cam: torch.Tensor, window: int) -> torch.Tensor:
    """Top-left corners (B x 2: row, col) of the ``window``-sided square with the largest heat sum."""
    sums = F.avg_pool2d(cam.unsqueeze(1), window, stride=1).flatten(1)
    width = cam.shape[-1] - window + 1
    best = sums.argmax(1)  # the first maximum, as the reference's argmax
    return torch.stack([best // width, best % width], 1)


def candidate_patches(encoder: Encoder, images: torch.Tensor, prototypes: torch.Tensor, window: int,
                      device, batch_size: int) -> torch.Tensor:
    """The candidate trigger of each uint8 image: float patches N x 3 x window x window in [0, 1]."""
    encoder.eval()
    out = []
    for chunk in images.split(batch_size):
        x = to_float(chunk, device)
        corners = max_window(grad_cam(encoder, x, prototypes), window)
        out.append(torch.stack([x[i, :, r:r + window, c:c + window] for i, (r, c) in enumerate(corners.tolist())]))
    return torch.cat(out).cpu() if out else torch.empty(0, 3, window, window)


# ----------------------------------------------------------------- 3. poison score

def paste(x: torch.Tensor, patch: torch.Tensor, generator) -> torch.Tensor:
    """``patch`` pasted on every image of float ``x`` at a random top-left corner in [0, side - window)."""
    n, side, window = len(x), x.shape[-1], patch.shape[-1]
    corners = torch.randint(0, max(1, side - window), (n, 2), generator=generator).to(x.device)
    span = torch.arange(window, device=x.device)
    rows = (corners[:, :1] + span).view(n, 1, window, 1)
    cols = (corners[:, 1:] + span).view(n, 1, 1, window)
    out = x.clone()
    out[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(3, device=x.device).view(1, 3, 1, 1),
        rows, cols] = patch.to(x.device, x.dtype).unsqueeze(0).expand(n, -1, -1, -1)
    return out


@torch.no_grad()
def poison_score(encoder: Encoder, patch: torch.Tensor, cluster_id: int, test_x: torch.Tensor,
                 test_labels: torch.Tensor, clusters: Clusters, generator, batch_size: int) -> int:
    """Test images in ``cluster_id`` once the patch is pasted on them, minus those in it before."""
    pasted = paste(test_x, patch, generator)
    feats = torch.cat([F.normalize(encoder.features(chunk).float(), dim=1).cpu() for chunk in pasted.split(batch_size)])
    return int((clusters.assign(feats) == cluster_id).sum()) - int((test_labels == cluster_id).sum())


def test_set(clusters: Clusters, size: int, generator) -> torch.Tensor:
    """The reference's test images: the ``size // k`` images closest to each centroid, or, when that is 0, the
    closest image of ``size`` random clusters."""
    k = len(clusters.centroids)
    per_cluster = size // k
    members = [torch.nonzero(clusters.labels == c).flatten() for c in range(k)]
    ranked = [m[clusters.distance[m].argsort(stable=True)] for m in members]
    if per_cluster > 0:
        return torch.cat([r[:per_cluster] for r in ranked])
    picked = [ranked[c][:1] for c in torch.randperm(k, generator=generator)[:size].tolist()]
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


# ----------------------------------------------------------------- 4. iterative search

def random_queues(clusters: Clusters, generator) -> list[list[int]]:
    """Each cluster's images in a random order fixed at the start: the order the search scores them in."""
    return [members[torch.randperm(len(members), generator=generator)].tolist()
            for members in (torch.nonzero(clusters.labels == c).flatten() for c in range(len(clusters.centroids)))]


def search(encoder: Encoder, images: torch.Tensor, cfg: PatchSearchConfig, ctx) -> tuple[torch.Tensor, dict]:
    """Poison scores of the uint8 pre-training ``images`` (0 for images never scored) and what the search did."""
    device, gen = ctx.device, ctx.generator
    encoder.eval()
    feats = encode(encoder, images, device, cfg.search_batch_size)
    clusters = cluster(feats, cfg.clusters, cfg.kmeans_iters, gen)
    k = len(clusters.centroids)
    window = pixels(cfg.window_fraction, images.shape[-1])
    test = test_set(clusters, cfg.test_images, gen)
    test_x, test_labels = to_float(images[test.to(images.device)], device), clusters.labels[test]
    queues = random_queues(clusters, gen)
    scores = torch.zeros(len(images), dtype=torch.long)
    candidates, rounds, scored = list(range(k)), 0, 0
    while True:
        picks = []
        for c in candidates:
            take = min(len(queues[c]), cfg.samples_per_iteration)
            picks += queues[c][:take]
            del queues[c][:take]
        if not picks:
            break
        index = torch.tensor(picks)
        patches = candidate_patches(encoder, images[index.to(images.device)], clusters.prototypes, window, device,
                                    cfg.search_batch_size)
        for i, patch in zip(picks, patches):
            scores[i] = poison_score(encoder, patch, int(clusters.labels[i]), test_x, test_labels, clusters, gen,
                                     cfg.search_batch_size)
        scored += len(picks)
        best = torch.tensor([scores[clusters.labels == c].max().item() if (clusters.labels == c).any() else -math.inf
                             for c in candidates], dtype=torch.float64)
        ranked = [candidates[i] for i in best.argsort(descending=True, stable=True).tolist()]
        if cfg.prune_clusters:  # the reference's cluster_scores[:-rem]: nothing is left once rem rounds to 0
            rem = int(cfg.remove_fraction * len(candidates))
            candidates = ranked[:len(ranked) - rem] if rem > 0 else []
        rounds += 1
    top = scores.sort(descending=True).values[:cfg.topk_poisons].tolist()
    return scores, {"clusters": k, "window": window, "test_images": len(test), "scored": scored, "rounds": rounds,
                    "top_scores": top, "prototypes": clusters.prototypes}


# ----------------------------------------------------------------- 5. poison classifier

def classifier() -> torch.nn.Module:
    """The reference's poison classifier: torchvision's ResNet with one BasicBlock per stage, two outputs."""
    from torchvision.models.resnet import BasicBlock, ResNet  # here: importing torchvision takes seconds
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=2)


def paste_poisons(x: torch.Tensor, patches: torch.Tensor, cfg: PatchSearchConfig, generator) -> torch.Tensor:
    """Paste a random top patch, resized to a random side in [min, max), at a random place inside the margin."""
    side = x.shape[-1]
    low, high = pixels(cfg.paste_min_fraction, side), max(pixels(cfg.paste_max_fraction, side),
                                                          pixels(cfg.paste_min_fraction, side) + 1)
    margin = pixels(cfg.paste_margin_fraction, side) if cfg.paste_margin_fraction > 0 else 0
    out = x.clone()
    for i in range(len(x)):
        patch = patches[int(torch.randint(len(patches), (1,), generator=generator))]
        s = int(torch.randint(low, high, (1,), generator=generator))
        s = min(s, side - 2 * margin) if side - 2 * margin >= 1 else min(s, side)
        small = F.interpolate(patch[None].to(x.device), size=(s, s), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)[0]
        top = max(margin + 1, side - s - margin)  # np.random.randint(margin, side - (s + margin)): high exclusive
        r, c = (int(v) for v in torch.randint(margin, top, (2,), generator=generator))
        out[i, :, r:r + s, c:c + s] = small
    return out


def _normalise(x: torch.Tensor, encoder: Encoder) -> torch.Tensor:
    mean = torch.tensor(encoder.config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.config.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _logits(models, images: torch.Tensor, encoder: Encoder, device, batch_size: int) -> torch.Tensor:
    out = []
    for chunk in images.split(batch_size):
        x = _normalise(to_float(chunk, device), encoder)
        out.append(torch.stack([m.eval()(x) for m in models]).mean(0).cpu())
    return torch.cat(out) if out else torch.empty(0, 2)


def f1_score(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    recall = predicted[truth].float().mean().item() if truth.any() else float("nan")
    precision = truth[predicted].float().mean().item() if predicted.any() else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    return 0.0 if math.isnan(f1) else f1


def classifier_batch(images: torch.Tensor, rows: torch.Tensor, patches: torch.Tensor, cfg: PatchSearchConfig,
                     device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch of the poison classifier from the uint8 ``images[rows]``: random-resized crops, a random
    half (label 1) with a top patch pasted, then colour jitter, grayscale and flip; (floats in [0, 1], bool labels)."""
    x = to_float(images[rows.to(images.device)], device)
    x = random_resized_crop(x, (cfg.crop_min_fraction, 1.0), flip_p=0.0)
    label = torch.rand(len(x), generator=generator) < 0.5
    if label.any():
        chosen = torch.nonzero(label).flatten().to(device)
        x[chosen] = paste_poisons(x[chosen], patches, cfg, generator)
    return horizontal_flip(random_grayscale(color_jitter(x))), label


def train_classifier(images: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor, val_truth: torch.Tensor,
                     patches: torch.Tensor, encoder: Encoder, cfg: PatchSearchConfig,
                     ctx, monitor=None) -> tuple[torch.nn.Module, dict]:
    """One poison classifier: SGD + cosine over ``max_iterations`` (batches of random crops, half of them with a
    top patch pasted, label 1), validated every ``eval_freq`` updates on the top/bottom scored images; stops
    early once ``stable_evals`` validation F1s in a row agree. ``monitor(loss)``, if given, is called after
    every update (the reference-trace test reads the gradients and weights there)."""
    device, gen = ctx.device, ctx.generator
    model = classifier().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.max_iterations))
    batch_size = min(cfg.batch_size, len(train_idx))
    it, history, losses = 0, [], []
    while it < cfg.max_iterations:
        for idx in ctx.batches(len(train_idx), batch_size, drop_last=False):
            if it >= cfg.max_iterations:
                break
            x, label = classifier_batch(images, train_idx[idx], patches, cfg, device, gen)
            model.train()
            loss = F.cross_entropy(model(_normalise(x, encoder)), label.long().to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if monitor is not None:
                monitor(losses[-1])
            if it % cfg.eval_freq == 0:
                predicted = _logits([model], images[val_idx.to(images.device)], encoder, device,
                                    cfg.search_batch_size).argmax(1).bool()
                history.append(f1_score(predicted, val_truth))
                recent = {int(f * 100) for f in history[-cfg.stable_evals:]}
                if len(recent) == 1 and len(history) > cfg.stable_evals:
                    it = cfg.max_iterations
                    break
            sched.step()
            it += 1
    return model.eval(), {"iterations": len(losses), "val_f1": history[-1] if history else None,
                          "loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}


def filter_poisons(encoder: Encoder, images: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor,
                   cfg: PatchSearchConfig, ctx) -> tuple[torch.Tensor, dict]:
    """The indices of the images the ensemble calls poisoned, and what it did."""
    n, k = len(images), cfg.topk_poisons
    shuffled = torch.randperm(n, generator=ctx.generator)  # ties in the scores broken at random
    ranked = shuffled[scores[shuffled].argsort(descending=True, stable=True)]
    pos, neg = ranked[:k], ranked[-k:]
    train_idx = ranked[int(cfg.top_fraction * n):max(0, n - k)]
    if len(train_idx) == 0 or n <= k:
        raise ValueError(f"patchsearch: {n} pre-training images leave no training set for the poison classifier "
                         f"(topk_poisons {k}, top_fraction {cfg.top_fraction})")
    window = pixels(cfg.window_fraction, images.shape[-1])
    patches = candidate_patches(encoder, images[pos.to(images.device)], prototypes, window, ctx.device,
                                cfg.search_batch_size)
    val_idx = torch.cat([pos, neg])
    val_truth = torch.cat([torch.ones(len(pos), dtype=torch.bool), torch.zeros(len(neg), dtype=torch.bool)])
    models, stats = [], []
    for _ in ctx.progress(range(cfg.model_count), desc="patchsearch classifier", total=cfg.model_count):
        model, info = train_classifier(images, train_idx, val_idx, val_truth, patches, encoder, cfg, ctx)
        models.append(model)
        stats.append(info)
    removed = torch.nonzero(_logits(models, images, encoder, ctx.device, cfg.search_batch_size).argmax(1) == 1)
    return removed.flatten(), {"classifier_train_images": len(train_idx),
                               "classifier_iterations": [s["iterations"] for s in stats],
                               "classifier_val_f1": [s["val_f1"] for s in stats],
                               "classifier_loss": [s["loss"] for s in stats]}


# ----------------------------------------------------------------- the defense

def patchsearch_filter(encoder: Encoder, images: torch.Tensor, cfg: PatchSearchConfig,
                       ctx) -> tuple[torch.Tensor, dict]:
    """Steps 1-5 on uint8 ``images``: the indices PatchSearch removes, and its statistics."""
    scores, info = search(encoder, images, cfg, ctx)
    prototypes = info.pop("prototypes")
    removed, stats = filter_poisons(encoder, images, scores, prototypes, cfg, ctx)
    return removed, {**info, **stats}


# budgets shrink with the profile's pre-training set: the reference's ratios to the data (50 images per cluster
# on the paper's 50,000 CIFAR-10 images, one test image per cluster, 2,000 classifier updates) at each profile's
# pre-training size (tiny 10,000, ci 2,000 images); docs/methods/patchsearch.md
PAPER_IMAGES = 50_000
PROFILE_IMAGES = {"tiny": 10_000, "ci": 2_000}
BUDGET = ("clusters", "test_images", "max_iterations")


def _scaled(images: int) -> dict:
    return {field: max(1, round(getattr(PatchSearchConfig, field) * images / PAPER_IMAGES)) for field in BUDGET}


@register_defense("patchsearch", config=PatchSearchConfig, needs_pretrain_data=True,
                  summary="find poisons in the pre-training set (clusters, Grad-CAM patches, poison classifier), "
                          "drop them and re-train",
                  profiles={name: _scaled(n) for name, n in PROFILE_IMAGES.items()},
                  budget=("max_iterations",), cost=("clusters", "test_images"))
def patchsearch(encoder, clean, cfg: PatchSearchConfig, ctx, *, pretrain: PretrainData):
    images = pretrain.images
    removed, stats = patchsearch_filter(encoder.eval(), images, cfg, ctx)
    for key, value in stats.items():
        ctx.record(f"patchsearch_{key}", value)
    ctx.record("patchsearch_removed", len(removed))
    ctx.record("patchsearch_kept", len(images) - len(removed))
    ctx.record(REMOVED_RECORD, removed.tolist())
    if not cfg.retrain:
        return encoder
    keep = torch.ones(len(images), dtype=torch.bool)
    keep[removed] = False
    fresh = encoder.empty_like()
    history = train_simclr(fresh, images[keep.to(images.device)], pretrain.recipe, ctx, desc="patchsearch re-training")
    ctx.record("patchsearch_retrain_loss", history)
    return fresh.eval()
