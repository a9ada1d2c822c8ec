"""MOTH, Model Orthogonalization (Tao et al., S&P 2022), adapted to label-free encoders.

k-means pseudo-classes on the suspect's clean features stand in for classes. For ``steps`` SGD
(Nesterov) updates, masks + patterns are inverted in embedding space on the encoder being
hardened (a universal trigger per pseudo-class during the warm-up, then both directions of a pair
every ``round_steps`` updates, pairs 30 % at random and 70 % by distance improvement), stamped on a
share of the batch, and trained away with NT-Xent (a stamped image is a positive view of its clean
image) plus feature consistency to the original encoder.

Parity with the reference: docs/methods/moth.md
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoders import Encoder, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from ..encoders.simclr import nt_xent
from .base import register_defense
from .decree import EPS, _from_tanh_space, stamp

# The reference hardens for 2 epochs over CIFAR-10's 50,000 training images at batch 128 (391
# batches an epoch, the last one partial). The defender's clean set is far smaller, so ``paper``
# matches the reference's number of model updates, not its epoch count.
REFERENCE_EPOCHS, REFERENCE_TRAIN_IMAGES, REFERENCE_BATCH = 2, 50_000, 128
REFERENCE_UPDATES = REFERENCE_EPOCHS * math.ceil(REFERENCE_TRAIN_IMAGES / REFERENCE_BATCH)  # 782


@dataclass
class MothConfig:
    # pseudo-classes
    clusters: int = 10
    kmeans_iters: int = 50
    # trigger inversion in embedding space
    warmup_per_class: int = 10  # images per pseudo-class in the warm-up inversion set
    warmup_inv_steps: int = 500  # passes over that set per universal trigger
    inv_steps: int = 200  # pair inversion passes at a round's first batch, or after a failed direction
    reuse_inv_steps: int = 50  # at a round's later batches while every direction succeeded
    inv_batch_size: int = 32
    inv_lr: float = 0.1
    init_cost: float = 1e-3
    reuse_cost: float = 1e-2  # initial cost with ``reuse_inv_steps``
    cost_patience: int = 10
    warmup_success: float = 0.99
    success_bound: float = 0.9
    restart_noise: float = 0.01  # uniform noise added to a new best trigger to restart from it
    max_mask_share: float = 0.25  # a trigger is stamped only when |m|_1 < this share of H x W
    # schedule
    round_steps: int = 3
    random_pair_share: float = 0.3
    improvement_ramp: int = 1000  # batches after the warm-up over which the improvement term ramps in
    warm_ratio: float = 0.5  # share of the other clusters' batch images stamped during the warm-up
    portion: float = 0.1  # share of the pair's batch images stamped per direction afterwards
    # hardening
    steps: int = REFERENCE_UPDATES  # model updates, warm-up included
    batch_size: int = 128
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    temperature: float = 0.5
    consistency_weight: float = 1.0


# ----------------------------------------------------------------- pseudo-classes

def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding; returns (centroids k x D, labels N)."""
    n = len(x)
    k = min(k, n)
    centroids = x[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).pow(2).min(1).values
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=generator)]])
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centroids).argmin(1)
        if _ > 0 and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centroids[j] = members.mean(0)
            else:  # an empty cluster takes the point farthest from its centroid
                far = torch.cdist(x, centroids).min(1).values.argmax()
                centroids[j] = x[far]
    return centroids, labels


@torch.no_grad()
def encode(encoder: Encoder, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    encoder.eval()
    return torch.cat([F.normalize(encoder.features(to_float(chunk, device)), dim=1).cpu()
                      for chunk in images.split(batch_size)])


# ----------------------------------------------------------------- inversion

@contextmanager
def _frozen_parameters(model: Encoder):
    """Turn parameter gradients off for the duration (inversion only needs input gradients)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def invert_triggers(model: Encoder, images: torch.Tensor, direction: torch.Tensor, targets: list[int],
                    centroids: torch.Tensor, steps: int, bound: float, cost: float, cfg: MothConfig, ctx,
                    init: list | None = None, reduction: str = "mean", keep_last: bool = True,
                    history: list | None = None) -> list[dict | None]:
    """Jointly invert one mask + pattern per direction; image i belongs to direction ``direction[i]``.

    A step is one pass over ``images`` (uint8, shuffled each step) in batches of
    ``inv_batch_size`` (the last partial batch kept when ``keep_last``, else
    dropped). Loss per direction d: the mean (``reduction="mean"``) or sum of
    ``-cos(f(x'), centroid_{targets[d]})`` over its images, plus
    ``cost_d |m_d|_1``; one Adam update per batch. After each step, a direction
    whose batches reached their target (nearest centroid) at a mean rate >=
    ``bound`` with a smaller mean |m|_1 than its best keeps the last batch's
    trigger as its best and restarts from it plus uniform noise, clipped to
    [0, 1] (a value clipped to 0 or 1 stays pinned there: :func:`_to_tanh_space`),
    while every other direction restarts from the last batch's trigger, i.e. loses
    its last Adam update (both as the reference's ``TriggerCombo``); its cost grows
    x1.5 after ``cost_patience`` successful steps in a row and shrinks /1.5^1.5
    after as many failures. ``model`` is used as it is (eval mode, parameter
    gradients off meanwhile). Returns per direction ``{"mask", "pattern",
    "size"}`` (CPU tensors, size = |m|_1) or None when no step succeeded.
    ``history``, when given, receives per step a list over directions of
    ``{"rate", "mean_size", "best_size" (None before a success), "cost",
    "raw_mask", "raw_pattern"}``, the last two the (tanh-space) trigger the
    next step starts from.
    """
    device = ctx.device
    n_dir = len(targets)
    h, w = images.shape[-2:]
    x_all = to_float(images, device)
    direction = direction.to(device)
    masks0, patterns0 = [], []
    for d in range(n_dir):
        start = init[d] if init is not None and init[d] is not None else None
        masks0.append(start[0] if start else torch.rand(h, w, generator=ctx.generator))
        patterns0.append(start[1] if start else torch.rand(3, h, w, generator=ctx.generator))
    raw_mask = _to_tanh_space(torch.stack(masks0)).to(device).requires_grad_(True)
    raw_pattern = _to_tanh_space(torch.stack(patterns0)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([raw_mask, raw_pattern], lr=cfg.inv_lr, betas=(0.5, 0.9))
    centroids = centroids.to(device)
    target_ids = torch.tensor(targets, device=device)
    costs, up, down = [cost] * n_dir, [0] * n_dir, [0] * n_dir
    best: list[dict | None] = [None] * n_dir
    n = len(x_all)
    if n == 0:
        return best
    batch_size = min(cfg.inv_batch_size, n)
    n_batches = math.ceil(n / batch_size) if keep_last else n // batch_size
    model.eval()
    with _frozen_parameters(model), torch.enable_grad():
        for _ in range(steps):
            order = torch.randperm(n, generator=ctx.generator).to(device)
            rates, sizes = [], []
            for b in range(n_batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                mask, pattern = _from_tanh_space(raw_mask), _from_tanh_space(raw_pattern)
                dirs = direction[idx]
                # index_select, not mask[dirs]: the backward of advanced indexing accumulates repeated
                # indices in a thread-dependent order on CPU (results differed run to run with 2 threads)
                x_adv = stamp(x_all[idx], mask.index_select(0, dirs).unsqueeze(1), pattern.index_select(0, dirs))
                f = F.normalize(model.features(x_adv), dim=1)
                sim = f @ centroids.t()
                tgt = target_ids[dirs]
                per_sample = -sim.gather(1, tgt[:, None]).squeeze(1)
                hit = (sim.argmax(1) == tgt).float()
                size = mask.flatten(1).sum(1)
                loss = 0.0
                batch_rates = []
                for d in range(n_dir):
                    mine = dirs == d
                    term = per_sample[mine].sum()
                    if reduction == "mean" and mine.any():
                        term = term / mine.sum()
                    loss = loss + term + costs[d] * size[d]
                    batch_rates.append(hit[mine].mean().item() if mine.any() else float("nan"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rates.append(batch_rates)
                sizes.append(size.detach())
            rate = torch.tensor(rates).mean(0)  # NaN (a direction absent from a batch) counts as a failure
            mean_size = torch.stack(sizes).mean(0).cpu()
            for d in range(n_dir):
                ok = bool(rate[d] >= bound)
                if ok and (best[d] is None or mean_size[d].item() < best[d]["mean_size"]):
                    best[d] = {"mask": mask[d].detach().cpu().clone(), "pattern": pattern[d].detach().cpu().clone(),
                               "mean_size": mean_size[d].item()}
                    if cfg.restart_noise:  # restart from the new best, slightly perturbed
                        eps = cfg.restart_noise
                        noisy_m = best[d]["mask"] + _restart_noise((h, w), eps, ctx.generator)
                        noisy_p = best[d]["pattern"] + _restart_noise((3, h, w), eps, ctx.generator)
                        # as TriggerCombo.generate, every direction is re-encoded: d from its noisy best, the
                        # others from the pass's last-batch trigger (which undoes their last Adam step)
                        starts_m = [noisy_m if e == d else mask[e].detach().cpu() for e in range(n_dir)]
                        starts_p = [noisy_p if e == d else pattern[e].detach().cpu() for e in range(n_dir)]
                        with torch.no_grad():
                            raw_mask.copy_(_to_tanh_space(torch.stack(starts_m)).to(device))
                            raw_pattern.copy_(_to_tanh_space(torch.stack(starts_p)).to(device))
                up[d], down[d] = (up[d] + 1, 0) if ok else (0, down[d] + 1)
                if up[d] >= cfg.cost_patience:
                    up[d], costs[d] = 0, (costs[d] * 1.5 if costs[d] > 0 else cost)
                elif down[d] >= cfg.cost_patience:
                    down[d], costs[d] = 0, costs[d] / 1.5 ** 1.5
            if history is not None:
                history.append([{"rate": rate[d].item(), "mean_size": mean_size[d].item(),
                                 "best_size": best[d]["mean_size"] if best[d] else None, "cost": costs[d],
                                 "raw_mask": raw_mask[d].detach().cpu().clone(),
                                 "raw_pattern": raw_pattern[d].detach().cpu().clone()} for d in range(n_dir)])
    for found in best:
        if found is not None:
            del found["mean_size"]
            found["size"] = found["mask"].sum().item()
    return best


def _to_tanh_space(values: torch.Tensor) -> torch.Tensor:
    """MOTH's inverse of the tanh parametrisation: ``atanh((clip(v, 0, 1) - 0.5) (2 - 1e-7))``.

    A value clipped to 0 or 1 lands at |raw| ~ 8.66, where tanh is flat: the pixel stays pinned there
    (the reference's restart pins the near-zero pixels of a sparse mask this way). DECREE's version
    clamps to [1e-4, 1 - 1e-4] first, which keeps such pixels movable; MOTH's reference does not.
    """
    return torch.atanh((values.clamp(0, 1) - 0.5) * (2 - EPS))


def _restart_noise(shape: tuple[int, ...], eps: float, generator: torch.Generator) -> torch.Tensor:
    """U(-eps, eps) noise added to a new best trigger before the inversion restarts from it."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * eps


# ----------------------------------------------------------------- pair schedule

def select_pair(improvement: torch.Tensor, pair_step: int, cfg: MothConfig, generator) -> tuple[int, int, bool]:
    """The next pair ``(source, target, by_improvement)``.

    With probability ``random_pair_share`` an ordered pair drawn uniformly;
    otherwise the unordered pair with the largest
    ``(1 - a) * 2 + a * (D[s, t] + D[t, s])``, ``a = min(pair_step /
    improvement_ramp, 1)``, where D is the distance-improvement table (the
    constant 2 is the reference's warm-up term, see the parity page); ties go
    to the first pair in row-major order, so source < target.
    """
    k = len(improvement)
    if torch.rand(1, generator=generator).item() < cfg.random_pair_share:
        s, t = torch.randperm(k, generator=generator)[:2].tolist()
        return s, t, False
    alpha = min(pair_step / cfg.improvement_ramp, 1.0) if cfg.improvement_ramp > 0 else 1.0
    score = (1 - alpha) * 2.0 + alpha * (improvement + improvement.t())
    score = score.masked_fill(~torch.ones(k, k, dtype=torch.bool).triu(1), float("-inf"))
    s, t = divmod(int(score.flatten().argmax()), k)
    return s, t, True


def update_distance(distance: torch.Tensor, improvement: torch.Tensor, source: int, target: int, size: float) -> None:
    """After a round: ``D <- (D + (size - last) / last) / 2`` and ``last <- size`` for direction source -> target.

    A direction with no earlier distance (its universal trigger was not found)
    only records the size.
    """
    last = distance[source, target].item()
    if last > 0:
        improvement[source, target] = (improvement[source, target] + (size - last) / last) / 2
    distance[source, target] = size


# ----------------------------------------------------------------- hardening

def _pick(pool: torch.Tensor, n: int, generator) -> torch.Tensor:
    return pool[torch.randperm(len(pool), generator=generator)[:n]]


def moth_harden(encoder: Encoder, images: torch.Tensor, cfg: MothConfig, ctx):
    """Harden ``encoder`` in place on uint8 clean ``images``.

    Returns ``(encoder, triggers, stats)``: ``triggers`` lists every trigger
    that was stamped (dicts with ``source`` (None for a universal one),
    ``target``, ``mask``, ``pattern``, ``size``), ``stats`` is JSON-able.
    """
    device = ctx.device
    original = frozen_copy(encoder).to(device)
    centroids, labels = kmeans(encode(original, images, device), cfg.clusters, cfg.kmeans_iters, ctx.generator)
    centroids = F.normalize(centroids, dim=1).to(device)
    k = len(centroids)
    h, w = images.shape[-2:]
    max_size = cfg.max_mask_share * h * w
    augment = SimCLRAugment()
    # BatchNorm stays in eval mode throughout, inversion and training alike (as in the reference)
    model = encoder.to(device).eval()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    batch_size = min(cfg.batch_size, len(images))
    sizes = torch.bincount(labels, minlength=k)
    per_class = int(min(cfg.warmup_per_class, sizes.min().item()))
    warm_set = torch.cat([_pick(torch.nonzero(labels == j).flatten(), per_class, ctx.generator) for j in range(k)])
    distance = torch.zeros(k, k)  # last trigger size per direction (source, target)
    improvement = torch.zeros(k, k)
    universal: dict[int, dict] = {}
    latest: dict[tuple[int, int], dict] = {}  # last successful trigger per direction
    used: list[dict] = []
    stats = {"clusters": k, "cluster_sizes": sizes.tolist(), "warmup_set": len(warm_set), "inversions": 0,
             "found": 0, "pairs": [], "random_pairs": 0, "loss": []}

    def current(s: int, t: int) -> dict | None:
        return latest.get((s, t)) or universal.get(t)

    def found(trig: dict | None, source, target) -> dict | None:
        stats["inversions"] += 1
        if trig is not None:
            stats["found"] += 1
            trig.update(source=source, target=target)
        return trig

    batches: list[torch.Tensor] = []
    pass_loss, pass_steps = 0.0, 0
    pair, failures, round_sizes, inv_steps, inv_cost = None, 0, [], cfg.inv_steps, cfg.init_cost
    for step in ctx.progress(range(cfg.steps), desc="moth", total=cfg.steps):
        if not batches:
            if pass_steps:
                stats["loss"].append(pass_loss / pass_steps)
            pass_loss, pass_steps = 0.0, 0
            batches = ctx.batches(len(images), batch_size)
        idx = batches.pop(0)
        batch_labels = labels[idx]
        stamps: list[tuple[torch.Tensor, dict]] = []  # (positions in the batch, trigger)
        if step < k:  # warm-up: a universal trigger for pseudo-class t
            t = step
            members = warm_set[labels[warm_set] != t]
            start = universal.get(0)  # the reference starts later warm-ups from the first one's trigger
            init = [(start["mask"], start["pattern"])] if start and t > 0 else None
            trig = found(invert_triggers(model, images[members], torch.zeros(len(members), dtype=torch.long), [t],
                                         centroids, cfg.warmup_inv_steps, cfg.warmup_success, cfg.init_cost, cfg, ctx,
                                         init, reduction="mean", keep_last=True)[0], None, t)
            if trig is not None:
                universal[t] = trig
                distance[:, t] = trig["size"]
                if trig["size"] < max_size:
                    pool = torch.nonzero(batch_labels != t).flatten()
                    stamps.append((_pick(pool, int(len(pool) * cfg.warm_ratio), ctx.generator), trig))
            distance.fill_diagonal_(0)
            if step == k - 1:
                top = distance.max()
                improvement = distance / top if top > 0 else distance.clone()
        else:
            phase = (step - k) % cfg.round_steps
            if phase == 0:
                s, t, by_improvement = select_pair(improvement, step - k, cfg, ctx.generator)
                pair = (s, t)
                stats["pairs"].append([s, t])
                stats["random_pairs"] += not by_improvement
                failures, round_sizes, inv_steps, inv_cost = 0, [], cfg.inv_steps, cfg.init_cost
            s, t = pair
            src = torch.nonzero(batch_labels == s).flatten()
            tgt = torch.nonzero(batch_labels == t).flatten()
            length = int(min(len(src), len(tgt)) * cfg.portion)
            if length > 0:
                if phase > 0:
                    if failures:
                        failures, inv_steps, inv_cost = 0, cfg.inv_steps, cfg.init_cost
                    else:
                        inv_steps, inv_cost = cfg.reuse_inv_steps, cfg.reuse_cost
                members = torch.cat([src, tgt])
                direction = torch.cat([torch.zeros(len(src), dtype=torch.long), torch.ones(len(tgt), dtype=torch.long)])
                init = [(c["mask"], c["pattern"]) if c else None for c in (current(s, t), current(t, s))]
                result = invert_triggers(model, images[idx[members]], direction, [t, s], centroids, inv_steps,
                                         cfg.success_bound, inv_cost, cfg, ctx, init, reduction="sum", keep_last=False)
                for (a, b, pool), trig in zip(((s, t, src), (t, s, tgt)), result):
                    trig = found(trig, a, b)
                    if trig is None:
                        failures += 1
                        continue
                    latest[(a, b)] = trig
                    if trig["size"] < max_size:
                        stamps.append((_pick(pool, length, ctx.generator), trig))
                round_sizes.append([c["size"] if c else 0.0 for c in (current(s, t), current(t, s))])
            if phase == cfg.round_steps - 1 and round_sizes:
                avg = torch.tensor(round_sizes).mean(0).tolist()
                update_distance(distance, improvement, s, t, avg[0])
                update_distance(distance, improvement, t, s, avg[1])
        # --- one hardening step
        x = to_float(images[idx], device)
        v1, v2 = augment(x), augment(x)
        v2_stamped, sel = v2.clone(), None
        for pick, trig in stamps:
            if len(pick):
                pick = pick.to(device)
                v2_stamped[pick] = stamp(v2[pick], trig["mask"].to(device), trig["pattern"].to(device))
                used.append(trig)
        picks = [pick for pick, _ in stamps if len(pick)]
        if picks:
            sel = torch.cat(picks).to(device)
        feats_model = model.features(torch.cat([v1, v2_stamped]))
        z1, z2 = model.head(feats_model).chunk(2)
        loss = nt_xent(z1, z2, cfg.temperature)
        if cfg.consistency_weight:
            with torch.no_grad():
                ref = F.normalize(original.features(v1 if sel is None else torch.cat([v1, v2[sel]])), dim=1)
            f1, f2 = F.normalize(feats_model, dim=1).chunk(2)
            consistency = 1 - (f1 * ref[:len(x)]).sum(1).mean()
            if sel is not None:
                consistency = consistency + 1 - (f2[sel] * ref[len(x):]).sum(1).mean()
            loss = loss + cfg.consistency_weight * consistency
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pass_loss += loss.item()
        pass_steps += 1
    if pass_steps:
        stats["loss"].append(pass_loss / pass_steps)
    unique = list({id(t): t for t in used}.values())
    stats["stamped_triggers"] = len(unique)
    stats["trigger_sizes"] = [round(t["size"], 2) for t in unique]
    stats["distance"] = distance.tolist()
    stats["improvement"] = improvement.tolist()
    return model.eval(), unique, stats


# what sets the compute: model updates and the three inversion pass counts; tiny and ci divide
# every one of them by one factor (docs/methods/moth.md), nothing else changes
BUDGET = ("steps", "warmup_inv_steps", "inv_steps", "reuse_inv_steps")
SHRINK = {"tiny": 10, "ci": 25}


@register_defense("moth", config=MothConfig,
                  summary="harden by inverting triggers between k-means pseudo-classes and training them away",
                  profiles={name: {field: getattr(MothConfig, field) // factor for field in BUDGET}
                            for name, factor in SHRINK.items()},
                  budget=BUDGET)
def moth(encoder, clean, cfg: MothConfig, ctx):
    encoder, triggers, stats = moth_harden(encoder, clean.images, cfg, ctx)
    for key, value in stats.items():
        ctx.record(f"moth_{key}", value)
    return encoder
