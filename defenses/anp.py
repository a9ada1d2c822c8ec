"""ANP — Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), adapted to label-free encoders.

Every BatchNorm2d channel k of the backbone is a neuron with a mask ``m_k``
(init 1) and perturbations ``delta_k``, ``xi_k`` of its scale and shift, so its
output is ``gamma_k (m_k + delta_k) x_hat + beta_k (1 + xi_k)`` (applied with
``torch.func.functional_call``; the encoder's modules never change). Per
iteration, on a batch drawn with replacement from the clean set and augmented
with random crop (padding 4) + horizontal flip: draw ``delta, xi ~ U(-eps,
eps)``, take ``steps`` signed-gradient ascent steps of size ``eps / steps``
without projecting back (so ``|delta|`` can reach ``2 eps``), then one SGD step
on the masks on ``alpha L(m) + (1 - alpha) L(m + delta, 1 + xi)`` and clamp them
to [0, 1]. The whole network runs in train mode (BatchNorm batch statistics)
on a frozen copy, so the suspect's running statistics are never touched.
Label-free loss: ``1 - cos(f_{m,delta,xi}(x), f_0(x))``, where ``f_0(x)`` is
the unmasked, unperturbed copy on the same batch in the same mode (zero at
m = 1), or NT-Xent on two SimCLR views (``loss="nt_xent"``). Finally channels
with ``m <= threshold`` get ``gamma = 0`` (and ``beta = 0`` if ``prune_beta``).
Records: pruned channels (total, per layer), mask quantiles, loss curve,
largest perturbation.

Parity with the reference: docs/methods/anp.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..encoders import Encoder, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment, horizontal_flip
from .base import register_defense
from .losses import cosine_distance, nt_xent


@dataclass
class ANPConfig:
    eps: float = 0.4
    steps: int = 1              # ascent steps per iteration, each of size eps / steps
    alpha: float = 0.2
    iterations: int = 2000
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    threshold: float = 0.2      # prune channels with mask <= threshold
    loss: str = "cosine"        # "cosine" (1 - cos to the frozen original) or "nt_xent"
    temperature: float = 0.5    # for loss = "nt_xent"
    prune_beta: bool = False    # False: zero gamma only (reference); True: zero gamma and beta


def neuron_layers(encoder: Encoder) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every BatchNorm2d of the backbone: ANP's neurons are their channels."""
    return [(f"backbone.{name}", m) for name, m in encoder.backbone.named_modules()
            if isinstance(m, nn.BatchNorm2d)]


class NeuronPerturbation:
    """Masks and perturbations on BatchNorm channels, applied via functional_call (no module change)."""

    def __init__(self, model: Encoder, eps: float):
        self.model = model
        self.eps = eps
        self.layers = neuron_layers(model)
        if not self.layers:
            raise ValueError("anp: the encoder has no BatchNorm2d layers, so it has no neurons to prune")
        device = next(model.parameters()).device
        self.masks = [torch.ones(bn.num_features, device=device, requires_grad=True) for _, bn in self.layers]
        self.delta = [torch.zeros(bn.num_features, device=device) for _, bn in self.layers]
        self.xi = [torch.zeros(bn.num_features, device=device) for _, bn in self.layers]

    @property
    def n_neurons(self) -> int:
        return sum(len(m) for m in self.masks)

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Fresh delta, xi ~ U(-eps, eps), ready for the ascent step."""
        self.delta = [self._uniform(len(m), m.device, generator) for m in self.masks]
        self.xi = [self._uniform(len(m), m.device, generator) for m in self.masks]

    def _uniform(self, n: int, device, generator) -> torch.Tensor:
        u = torch.rand(n, generator=generator).to(device)
        return ((2 * u - 1) * self.eps).requires_grad_(True)

    def parameters(self, perturbed: bool) -> dict[str, torch.Tensor]:
        out = {}
        for (name, bn), m, d, xi in zip(self.layers, self.masks, self.delta, self.xi):
            out[f"{name}.weight"] = bn.weight * (m + d if perturbed else m)
            out[f"{name}.bias"] = bn.bias * (1 + xi) if perturbed else bn.bias
        return out

    def features(self, x: torch.Tensor, perturbed: bool) -> torch.Tensor:
        return functional_call(self.model, self.parameters(perturbed), (x,))

    def ascend(self, loss: torch.Tensor, step_size: float | None = None) -> None:
        """One signed-gradient ascent step on delta and xi (size eps unless given), not projected back."""
        step = self.eps if step_size is None else step_size
        grads = torch.autograd.grad(loss, self.delta + self.xi)
        n = len(self.delta)
        with torch.no_grad():
            new = [(p + step * g.sign()).requires_grad_(True) for p, g in zip(self.delta + self.xi, grads)]
        self.delta, self.xi = new[:n], new[n:]

    def fix(self) -> None:
        """Stop tracking gradients of delta and xi once the ascent is done."""
        self.delta = [t.detach() for t in self.delta]
        self.xi = [t.detach() for t in self.xi]

    def max_perturbation(self) -> float:
        return max(float(t.detach().abs().max()) for t in self.delta + self.xi)

    @torch.no_grad()
    def clamp_masks(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    def mask_vector(self) -> torch.Tensor:
        return torch.cat([m.detach().cpu() for m in self.masks])


def random_crop(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) per image: zero-pad, then a random same-size window."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def reference_augment(x: torch.Tensor) -> torch.Tensor:
    """The reference's training transform: RandomCrop(32, padding=4) + RandomHorizontalFlip."""
    return horizontal_flip(random_crop(x, 4))


def mask_model(encoder: Encoder) -> Encoder:
    """The network the masks are optimised on: a frozen copy in train mode (BatchNorm batch statistics)."""
    return frozen_copy(encoder).train()


def _loss_fn(cfg: ANPConfig, model: Encoder):
    if cfg.loss == "cosine":
        def loss(pert: NeuronPerturbation, x: torch.Tensor, target: torch.Tensor, perturbed: bool):
            return cosine_distance(pert.features(x, perturbed), target)
    elif cfg.loss == "nt_xent":
        def loss(pert: NeuronPerturbation, x: torch.Tensor, target, perturbed: bool):
            z = model.head(pert.features(x, perturbed))
            return nt_xent(*z.chunk(2), temperature=cfg.temperature)
    else:
        raise ValueError(f"anp: loss must be 'cosine' or 'nt_xent', got {cfg.loss!r}")
    return loss


def mask_step(pert: NeuronPerturbation, opt: torch.optim.Optimizer, loss_fn, x: torch.Tensor, target,
              cfg: ANPConfig, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ANP iteration on batch ``x``; returns (loss, natural term, robust term).

    Step 1, the adversarial neuron perturbation: random start ``U(-eps, eps)``, ``cfg.steps``
    signed-gradient ascent steps, no projection. Step 2, the mask update: one optimiser step on
    ``alpha * L(m) + (1 - alpha) * L(m + delta, 1 + xi)``, then the masks are clamped to [0, 1].
    """
    if cfg.eps > 0:
        pert.reset(generator)
        for _ in range(cfg.steps):
            pert.ascend(loss_fn(pert, x, target, perturbed=True), cfg.eps / cfg.steps)
        pert.fix()
    loss_nat = loss_fn(pert, x, target, perturbed=False)
    loss_rob = loss_fn(pert, x, target, perturbed=True) if cfg.eps > 0 else torch.zeros((), device=x.device)
    loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    pert.clamp_masks()
    return loss, loss_nat, loss_rob


def mask_optimizer(pert: NeuronPerturbation, cfg: ANPConfig) -> torch.optim.SGD:
    """The reference's mask optimiser: SGD with momentum on the masks only."""
    return torch.optim.SGD(pert.masks, lr=cfg.lr, momentum=cfg.momentum)


def optimize_masks(encoder: Encoder, clean, cfg: ANPConfig, ctx) -> tuple[torch.Tensor, dict]:
    """Run ANP's mask optimisation on a frozen copy of ``encoder``; returns (masks, stats)."""
    device = ctx.device
    model = mask_model(encoder).to(device)  # train mode, no parameter gradients; also f_0
    pert = NeuronPerturbation(model, cfg.eps)
    loss_fn = _loss_fn(cfg, model)
    opt = mask_optimizer(pert, cfg)
    simclr = SimCLRAugment()
    images = clean.images
    curve, max_pert, total, count = [], 0.0, 0.0, 0
    log_every = max(1, cfg.iterations // 20)
    for it in ctx.progress(range(cfg.iterations), desc="anp", total=cfg.iterations):
        # the reference's RandomSampler(replacement=True): every batch drawn independently
        x = to_float(images[torch.randint(len(images), (cfg.batch_size,), generator=ctx.generator)], device)
        if cfg.loss == "nt_xent":
            x, target = torch.cat([simclr(x), simclr(x)]), None
        else:
            x = reference_augment(x)
            with torch.no_grad():  # f_0 on this batch, batch statistics like the masked network
                target = model.features(x)
        loss, loss_nat, loss_rob = mask_step(pert, opt, loss_fn, x, target, cfg, ctx.generator)
        if cfg.eps > 0:
            max_pert = max(max_pert, pert.max_perturbation())
        total += loss.item()
        count += 1
        if (it + 1) % log_every == 0 or it + 1 == cfg.iterations:
            curve.append({"iteration": it + 1, "loss": total / count, "natural": loss_nat.item(),
                          "robust": loss_rob.item()})
            total, count = 0.0, 0
    masks = pert.mask_vector()
    stats = {"curve": curve, "max_perturbation": max_pert, "n_neurons": pert.n_neurons,
             "layers": [(name, bn.num_features) for name, bn in pert.layers]}
    return masks, stats


@torch.no_grad()
def prune_neurons(encoder: Encoder, masks: torch.Tensor, threshold: float, prune_beta: bool) -> dict[str, int]:
    """Zero gamma (and beta if asked) of every BN channel whose mask is at most ``threshold``, in place."""
    pruned, offset = {}, 0
    for name, bn in neuron_layers(encoder):
        m = masks[offset:offset + bn.num_features].to(bn.weight.device)
        offset += bn.num_features
        idx = (m <= threshold).nonzero().flatten()
        bn.weight[idx] = 0
        if prune_beta:
            bn.bias[idx] = 0
        if len(idx):
            pruned[name] = int(len(idx))
    if offset != len(masks):
        raise ValueError(f"anp: {len(masks)} mask values for {offset} BatchNorm channels")
    return pruned


def _validate(cfg: ANPConfig) -> None:
    if cfg.eps < 0 or not 0 <= cfg.alpha <= 1:
        raise ValueError("anp: eps must be >= 0 and alpha in [0, 1]")
    if cfg.iterations < 0 or cfg.batch_size < 1 or cfg.steps < 1:
        raise ValueError("anp: iterations must be >= 0, batch_size >= 1 and steps >= 1")


@register_defense("anp", config=ANPConfig,
                  summary="prune BatchNorm channels whose learned masks fall under adversarial neuron perturbation",
                  profiles={"tiny": {"iterations": 500}, "ci": {"iterations": 100}}, budget=("iterations",))
def anp(encoder: Encoder, clean, cfg: ANPConfig, ctx) -> Encoder:
    _validate(cfg)
    encoder = encoder.to(ctx.device).eval()
    masks, stats = optimize_masks(encoder, clean, cfg, ctx)
    pruned = prune_neurons(encoder, masks, cfg.threshold, cfg.prune_beta)
    n_pruned = sum(pruned.values())
    ctx.record("anp_n_pruned", n_pruned)
    ctx.record("anp_n_neurons", stats["n_neurons"])
    ctx.record("anp_pruned_per_layer", pruned)
    ctx.record("anp_mask_quantiles", [round(float(q), 4) for q in
                                      torch.quantile(masks, torch.tensor([0.0, 0.01, 0.05, 0.25, 0.5]))])
    ctx.record("anp_loss_curve", stats["curve"])
    ctx.record("anp_max_perturbation", stats["max_perturbation"])
    ctx.logger.info("anp: pruned %d of %d BatchNorm channels", n_pruned, stats["n_neurons"])
    return encoder
