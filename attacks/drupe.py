"""DRUPE (Tao et al., S&P 2024): BadEncoder made distribution-preserving.

BadEncoder's loop (:func:`~defbench.attacks.badencoder.train_badencoder`, same single forward pass and
L1/L2) with the authors' loss and schedule: each triggered input is pulled to its nearest reference (L0),
a sliced-Wasserstein term pulls the distribution of triggered embeddings onto the clean ones, an angular
term penalises the pairwise cosine among triggered embeddings, balance terms keep the references
equally used and apart; epoch 1 is a warm-up without L0, the SW and angular weights adapt after every
epoch past ``adapt_after``, and the epoch with the smallest SW among those that met the attack's goals
is returned. Records per epoch ``[L0, L1, L2, SW/std, spread, ref_std, ref_sim]`` and the weights.

Parity with the reference: docs/methods/drupe.md
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .badencoder import CI, TINY, BadEncoderConfig, badencoder_loss, train_badencoder
from .base import AttackInputs, register_attack


@dataclass
class DRUPEConfig(BadEncoderConfig):
    n_reference: int = 3
    shadow_images: int = 10000  # the authors' shadow_fraction 0.2 of 50,000 images; 0: the whole set
    reference_assignment: str = "nearest"  # nearest (the authors) or all (BadEncoder's mean over pairs)
    n_projections: int = 50  # random directions per SW evaluation (POT's default)
    warmup_epochs: int = 1  # epochs without L0 that push the references apart
    main_phase_from: int = 5  # first epoch with the SW and angular terms; before it: the stage-1 loss
    adapt_after: int = 20  # the weights adapt after every epoch > adapt_after
    select_after: int = 24  # an epoch > select_after may become the returned checkpoint
    select_best: bool = True  # False: return the last epoch
    sw_weight: float = 1e-3  # initial weight of SW / std (the authors' init_cost_1)
    angular_weight: float = 0.1  # initial weight of (ref_std + spread) (the authors' init_cost)
    weight_up: float = 1.25
    weight_down: float = 1.25 ** 1.25
    patience: int = 1  # consecutive epochs before a weight moves
    l0_threshold: float = -0.96  # the attack's goals that gate both weights: mean L0 below this,
    utility_threshold: float = -0.9  # mean L1 and L2 below this,
    spread_threshold: float = 0.6  # and (SW weight only) the last batch's spread below this

    def __post_init__(self):
        for f in dataclasses.fields(self):  # --set lr=1 arrives as an int: keep stage keys stable
            if f.type in ("float", float) and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))
        if self.reference_assignment not in ("nearest", "all"):
            raise ValueError(f"reference_assignment must be 'nearest' or 'all', got {self.reference_assignment!r}")


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 50,
                       generator: torch.Generator | None = None,
                       directions: torch.Tensor | None = None) -> torch.Tensor:
    """Sliced 2-Wasserstein distance between two equally sized point clouds (N x D), differentiable.

    The ``n_projections`` directions are Gaussian draws from ``generator``, each normalised to unit length;
    ``directions`` (D x n, normalised here) replaces the draw (the reference-trace test passes the trace's)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equally sized samples, got {tuple(a.shape)} and {tuple(b.shape)}")
    if directions is None:
        directions = torch.randn(a.shape[1], n_projections, generator=generator)
    directions = F.normalize(directions, dim=0).to(device=a.device, dtype=a.dtype)
    pa = torch.sort(a @ directions, dim=0).values
    pb = torch.sort(b @ directions, dim=0).values
    return (pa - pb).pow(2).mean().sqrt()


def mean_pairwise_cosine(feats: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the off-diagonal pairs of a batch (N x D, N >= 2): DRUPE's spread and DECREE's signal."""
    z = F.normalize(feats, dim=1)
    sim = z @ z.t()
    n = len(z)
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


class DRUPEState:
    """The authors' schedule: phase of the current epoch, the two adaptive weights, the checkpoint choice."""

    def __init__(self, cfg: DRUPEConfig):
        self.cfg = cfg
        self.epoch = 1
        self.sw_weight, self.angular_weight = cfg.sw_weight, cfg.angular_weight
        self.up = self.down = self.up_sw = self.down_sw = 0
        self.last_spread = self.last_sw = math.inf  # the epoch's last batch (the authors' rule reads those)
        self.measure = self.best = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.weights: list[list[float]] = []  # per epoch: [sw_weight, angular_weight] used in it

    @property
    def phase(self) -> str:
        if self.epoch <= self.cfg.warmup_epochs:
            return "warmup"
        return "stage1" if self.epoch < self.cfg.main_phase_from else "main"

    def _step(self, weight: float, init: float, up: bool) -> float:
        if up:
            return init if weight == 0 else weight * self.cfg.weight_up
        return weight / self.cfg.weight_down

    def end_epoch(self, epoch: int, model, means: list[float]) -> None:
        """After epoch ``epoch`` (from 1): adapt the weights, then maybe keep this epoch as the checkpoint."""
        cfg = self.cfg
        self.weights.append([self.sw_weight, self.angular_weight])
        if epoch > cfg.warmup_epochs and epoch > cfg.adapt_after:
            l0, l1, l2 = means[:3]
            met = l0 < cfg.l0_threshold and l1 < cfg.utility_threshold and l2 < cfg.utility_threshold
            self.up, self.down = (self.up + 1, 0) if met else (0, self.down + 1)
            if self.up >= cfg.patience:
                self.up = 0
                self.angular_weight = self._step(self.angular_weight, cfg.angular_weight, True)
            elif self.down >= cfg.patience:
                self.down = 0
                self.angular_weight = self._step(self.angular_weight, cfg.angular_weight, False)
            if met and self.last_spread < cfg.spread_threshold:
                self.up_sw, self.down_sw = self.up_sw + 1, 0
                if self.last_spread < cfg.spread_threshold - 0.1:
                    self.up -= 1  # spread already low: the angular weight skips its next increase
                self.measure = self.last_sw
            else:
                self.up_sw, self.down_sw = 0, self.down_sw + 1
            if self.up_sw >= cfg.patience:
                self.up_sw = 0
                self.sw_weight = self._step(self.sw_weight, cfg.sw_weight, True)
            elif self.down_sw >= cfg.patience:
                self.down_sw = 0
                self.sw_weight = self._step(self.sw_weight, cfg.sw_weight, False)
        if cfg.select_best and epoch > cfg.select_after and self.measure < self.best:
            self.best, self.best_epoch = self.measure, epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.epoch = epoch + 1


class _FeatureTap:
    """Forwards ``features`` to the model and keeps the raw output (badencoder_loss's one forward pass)."""

    def __init__(self, model):
        self.model = model
        self.out: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.out = self.model.features(x)
        return self.out


def drupe_loss(model, clean, x, x_triggered, refs, refs_aug, cfg: DRUPEConfig, state: DRUPEState,
               generator=None):
    """One batch: ``(total, L0, L1, L2, SW/std, spread, ref_std, ref_sim)`` with the terms of ``state.phase``.

    ``spread`` = mean pairwise cosine among triggered embeddings, ``ref_std`` = std over references of
    their mean cosine to the triggered embeddings, ``ref_sim`` = mean cosine between the references'
    embeddings over pairs i <= j (the diagonal included, as in the authors' code).
    """
    tap = _FeatureTap(model)
    _, l0_all, l1, l2 = badencoder_loss(tap, clean, x, x_triggered, refs, refs_aug, cfg.lambda1, cfg.lambda2)
    b, r = len(x), len(refs)
    f_clean, f_trig, f_ref = tap.out[:b], tap.out[b:2 * b], tap.out[2 * b:2 * b + r]
    z_trig, z_ref = F.normalize(f_trig, dim=1), F.normalize(f_ref, dim=1)
    cos = z_trig @ z_ref.t()  # B x R
    l0 = -cos.max(dim=1).values.mean() if cfg.reference_assignment == "nearest" else l0_all
    ref_std = cos.mean(0).std() if r > 1 else cos.new_zeros(())
    pairs = torch.triu_indices(r, r, device=cos.device)
    ref_sim = (z_ref @ z_ref.t())[pairs[0], pairs[1]].mean()
    spread = mean_pairwise_cosine(f_trig)
    sw_raw = sliced_wasserstein(f_trig, f_clean, cfg.n_projections, generator)
    sw = sw_raw / f_clean.std(0).mean()  # gradient through both clouds and the std, as the authors'
    separation = ref_sim if ref_sim > 0.5 else 0.2 * ref_sim if ref_sim > 0.4 else 0.0
    if state.phase == "warmup":
        total = cfg.lambda1 * l1 + cfg.lambda2 * l2 + (0.3 if ref_sim < 0.2 else 0.5) * ref_sim
    elif state.phase == "stage1":
        total = l0 + cfg.lambda1 * l1 + cfg.lambda2 * l2 + 2.0 * ref_std + separation
    else:
        total = (l0 + cfg.lambda1 * l1 + cfg.lambda2 * l2 + state.angular_weight * (ref_std + spread)
                 + state.sw_weight * sw + (2.0 if ref_std > 0.1 else 0.5) * ref_std + separation)
    state.last_spread, state.last_sw = spread.item(), sw_raw.item()
    return total, l0, l1, l2, sw, spread, ref_std, ref_sim


# tiny/ci: BadEncoder's scaled-down settings with the authors' three references and their schedule
# compressed into 6 epochs (warm-up 1, stage 1 = epochs 2-3, main phase 4-6 adapting after each epoch,
# checkpoint chosen among 4-6); weights and goals stay the authors'. Why: docs/methods/drupe.md.
SMALL = {"n_reference": 3, "epochs": 6, "main_phase_from": 4, "adapt_after": 3, "select_after": 3}


@register_attack("drupe", config=DRUPEConfig, needs_clean_encoder=True,
                 summary="model poisoning like BadEncoder, with distribution (sliced-Wasserstein) and angular "
                         "terms hiding the triggered embeddings among the clean ones",
                 profiles={"paper": {}, "tiny": {**TINY, "lr": 0.01, **SMALL}, "ci": {**CI, **SMALL}})
def drupe(inputs: AttackInputs, cfg: DRUPEConfig, ctx):
    state = DRUPEState(cfg)

    def loss_fn(model, clean, x, x_triggered, refs, refs_aug):
        return drupe_loss(model, clean, x, x_triggered, refs, refs_aug, cfg, state, ctx.generator)

    model, history = train_badencoder(inputs, cfg, ctx, loss_fn, desc="drupe", on_epoch_end=state.end_epoch)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    ctx.record("loss_history", history)  # per epoch: [L0, L1, L2, SW/std, spread, ref_std, ref_sim]
    ctx.record("weight_history", state.weights)  # per epoch: [sw_weight, angular_weight]
    ctx.record("selected_epoch", state.best_epoch if state.best_state is not None else len(history))
    ctx.record("selection_measure", None if state.best_state is None else state.best)
    return model
