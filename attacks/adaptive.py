"""Adaptive BadEncoder against MIMIC (the MIMIC paper's adaptive-attack study, its Figure 11).

BadEncoder (same losses and loop: :func:`~defbench.attacks.badencoder.train_badencoder`) plus a
regulariser that pulls the per-layer mutual-information profile of triggered inputs onto the clean one::

    L = L0 + lambda1 L1 + lambda2 L2 + mi_weight * sum_l (I_l(x + t) - I_l(x))^2

``I_l`` is the Donsker-Varadhan bound of I(stage l output; feature), MIMIC's estimator
(``defenses/mutual_information.py``), measured on the batch by two statistics networks per stage (clean, triggered)
trained online: each step first takes one Adam ascent step on every network (detached inputs), then the
encoder's loss uses their bounds with the networks frozen. ``mi_pool > 0`` average-pools each stage
output to ``mi_pool x mi_pool`` first. Records the per-epoch losses ``[L0, L1, L2, R]`` and the last
batch's MI per layer, clean and triggered.

Parity with the reference: docs/methods/badencoder-adaptive.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..defenses.mutual_information import StatisticsNetwork, dv_bound, mine_input
from .badencoder import CI, TINY, BadEncoderConfig, badencoder_loss, train_badencoder
from .base import AttackInputs, register_attack


@dataclass
class AdaptiveBadEncoderConfig(BadEncoderConfig):
    mi_weight: float = 1.0
    mi_hidden: int = 512
    mi_lr: float = 1e-3
    mi_weight_decay: float = 1e-5
    mi_pool: int = 0  # 0: flattened stage outputs (MIMIC's reference estimator)


class _StagesTap:
    """Gives ``badencoder_loss`` the feature of a ``stages`` pass and keeps the stage outputs."""

    def __init__(self, model):
        self.model = model
        self.out: dict[str, torch.Tensor] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.out = self.model.stages(x)
        return self.out["feature"]


class MIProfileRegulariser:
    """Online MINE statistics networks per stage (clean and triggered) and the profile-matching loss."""

    def __init__(self, cfg: AdaptiveBadEncoderConfig, generator: torch.Generator):
        self.cfg = cfg
        self.generator = generator
        self.nets: dict[str, tuple[StatisticsNetwork, StatisticsNetwork]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.last_mi: dict[str, list[float]] = {}

    def _networks(self, name: str, a_dim: int, z_dim: int, device) -> tuple[StatisticsNetwork, StatisticsNetwork]:
        if name not in self.nets:
            pair = (StatisticsNetwork(a_dim, z_dim, self.cfg.mi_hidden).to(device),
                    StatisticsNetwork(a_dim, z_dim, self.cfg.mi_hidden).to(device))
            self.nets[name] = pair
            params = [p for net in pair for p in net.parameters()]
            self.optimizers[name] = torch.optim.Adam(params, lr=self.cfg.mi_lr, weight_decay=self.cfg.mi_weight_decay)
        return self.nets[name]

    def __call__(self, stages: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        """``stages`` from one pass over ``[x, x_triggered, ...]``: the loss, after one ascent step per network."""
        z = F.normalize(stages["feature"][:2 * b].float(), dim=1)
        perm = torch.randperm(b, generator=self.generator).to(z.device)
        total = z.new_zeros(())
        for name, fmap in stages.items():
            if name == "feature":
                continue
            a = mine_input(fmap[:2 * b], self.cfg.mi_pool)  # MIMIC's estimator input
            t_clean, t_trig = self._networks(name, a.shape[1], z.shape[1], a.device)
            pairs = ((t_clean, a[:b], z[:b]), (t_trig, a[b:], z[b:]))
            ascent = sum(-dv_bound(*net.joint_and_marginal(ai.detach(), zi.detach(), perm)) for net, ai, zi in pairs)
            self.optimizers[name].zero_grad(set_to_none=True)
            ascent.backward()
            self.optimizers[name].step()
            for net, _, _ in pairs:
                net.requires_grad_(False)
            mi_clean, mi_trig = (dv_bound(*net.joint_and_marginal(ai, zi, perm)) for net, ai, zi in pairs)
            for net, _, _ in pairs:
                net.requires_grad_(True)
            total = total + (mi_trig - mi_clean).pow(2)
            self.last_mi[name] = [mi_clean.item(), mi_trig.item()]
        return total


@register_attack("badencoder-adaptive", config=AdaptiveBadEncoderConfig, needs_clean_encoder=True,
                 summary="BadEncoder plus an MI regulariser that makes triggered inputs' per-layer MI profile "
                         "match the clean one (adaptive attack on MIMIC)",
                 profiles={"tiny": {**TINY, "mi_hidden": 128}, "ci": {**CI, "mi_hidden": 128}})
def badencoder_adaptive(inputs: AttackInputs, cfg: AdaptiveBadEncoderConfig, ctx):
    regulariser = MIProfileRegulariser(cfg, ctx.generator)

    def loss_fn(model, clean, x, x_triggered, refs, refs_aug):
        tap = _StagesTap(model)
        total, l0, l1, l2 = badencoder_loss(tap, clean, x, x_triggered, refs, refs_aug, cfg.lambda1, cfg.lambda2)
        reg = regulariser(tap.out, len(x))
        return total + cfg.mi_weight * reg, l0, l1, l2, reg

    model, history = train_badencoder(inputs, cfg, ctx, loss_fn, desc="badencoder-adaptive")
    ctx.record("loss_history", history)  # per epoch: [L0, L1, L2, R]
    ctx.record("mi_last_batch", {k: {"clean": v[0], "triggered": v[1]} for k, v in regulariser.last_mi.items()})
    return model
