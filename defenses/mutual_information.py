"""MINE: a neural lower bound on the mutual information of paired samples.

Belghazi et al. (ICML 2018), in the Donsker-Varadhan form MIMIC uses::

    I(A; Z) >= E_joint[T(a, z)] - log E_marginal[exp T(a, z')]

where the marginal pairs (a, z') come from shuffling ``z`` inside a batch and
``T`` is a statistics network trained to maximise the bound. The estimate is
the mean of the per-epoch estimates over the last few epochs; a negative or
non-finite estimate means "no measurable dependence" and is reported as 0.

Reference settings (the MIMIC authors' code): ``T`` = MLP on the concatenation
``[a, z]`` with hidden sizes 512-512-1 and ReLU, Adam lr 1e-3, weight decay
1e-5, batch 128, 200 epochs, the batches in a fixed order, each epoch's
estimate = the bound averaged over all batches in a separate pass after the
epoch's training, result = the mean of the last 10 epochs.

Implementation notes (same estimator, less arithmetic or better numerics):

- ``T``'s first layer is stored as two blocks, one for ``a`` and one for
  ``z``; this is exactly a Linear on the concatenation (same parameters, same
  initialisation), but the joint and the shuffled pairs share ``a``'s block,
  so the widest product (``a`` can be 65,536 wide) is computed once per batch
  instead of twice.
- ``log mean exp`` is computed with ``logsumexp`` (the reference exponentiates
  directly, which overflows once ``T`` grows).
- Batches are visited in a fresh seeded order each epoch (the reference uses a
  fixed order); the final, possibly smaller, batch is kept.
- The clipping of negative/NaN values to 0 is applied to the final estimate
  (the reference clips each batch's value before averaging, which turns pure
  estimator noise into a positive MI).
- The plain (biased-gradient) DV objective is used, as in the reference; the
  moving-average gradient correction of the MINE paper is not.

Everything works on tensors already in memory (``a``: N x Da, ``z``: N x Dz),
so callers extract their features once and the estimator never re-runs the
network that produced them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MINEConfig", "MINEResult", "StatisticsNetwork", "dv_bound", "estimate_mi", "mine_bound", "mine_network",
           "mine_step"]


def mine_input(fmap: torch.Tensor, pool: int = 0) -> torch.Tensor:
    """A stage output as MINE's input: flattened (the reference), or first average-pooled to
    ``pool x pool`` when ``pool`` > 0 and the map is larger."""
    if pool and fmap.ndim == 4 and (fmap.shape[2] > pool or fmap.shape[3] > pool):
        fmap = F.adaptive_avg_pool2d(fmap, pool)
    return fmap.flatten(1).float()


@dataclass
class MINEConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    hidden: int = 512
    last: int = 10  # the estimate is the mean of the last `last` epochs' estimates
    eval_pass: bool = True  # per-epoch estimate from a separate no-grad pass (reference); False: training batches


@dataclass
class MINEResult:
    mi: float  # >= 0, finite
    raw: float  # the mean of the last epochs before clipping (may be negative or NaN)
    history: list[float] = field(default_factory=list)  # one estimate per epoch


class StatisticsNetwork(nn.Module):
    """``T(a, z)``: Linear(Da + Dz, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, 1).

    The first layer's weight is kept as two blocks (``a`` part and ``z`` part);
    they are initialised as the two slices of one ``nn.Linear(Da + Dz, h)``.
    """

    def __init__(self, a_dim: int, z_dim: int, hidden: int = 512):
        super().__init__()
        first = nn.Linear(a_dim + z_dim, hidden)
        self.w_a = nn.Parameter(first.weight.detach()[:, :a_dim].clone())
        self.w_z = nn.Parameter(first.weight.detach()[:, a_dim:].clone())
        self.b1 = nn.Parameter(first.bias.detach().clone())
        self.tail = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.tail(F.linear(a, self.w_a, self.b1) + F.linear(z, self.w_z)).squeeze(1)

    def joint_and_marginal(self, a: torch.Tensor, z: torch.Tensor, perm: torch.Tensor):
        """T on the joint pairs (a_i, z_i) and on the shuffled pairs (a_i, z_perm(i)), sharing a's product."""
        ha = F.linear(a, self.w_a, self.b1)
        hz = F.linear(z, self.w_z)
        t = self.tail(torch.cat([ha + hz, ha + hz[perm]])).squeeze(1)
        return t.chunk(2)


def dv_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan: mean T(joint) - log mean exp T(marginal)."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, 0) - math.log(t_marginal.numel()))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in out if len(b) >= 2]  # a pair needs a partner to shuffle with


def _perm(n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randperm(n, generator=generator).to(device)


def mine_network(a_dim: int, z_dim: int, cfg: MINEConfig,
                 device=None) -> tuple[StatisticsNetwork, torch.optim.Optimizer]:
    """A fresh statistics network (global torch RNG) and its Adam optimiser (the reference's settings)."""
    net = StatisticsNetwork(a_dim, z_dim, cfg.hidden).to(device)
    return net, torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def mine_step(net: StatisticsNetwork, opt: torch.optim.Optimizer, a: torch.Tensor, z: torch.Tensor,
              perm: torch.Tensor) -> torch.Tensor:
    """One ascent step on the DV bound of the batch ``(a, z)`` with marginal pairs ``(a_i, z_perm(i))``;
    returns the bound before the step (detached)."""
    bound = dv_bound(*net.joint_and_marginal(a, z, perm))
    opt.zero_grad(set_to_none=True)
    (-bound).backward()
    opt.step()
    return bound.detach()


@torch.no_grad()
def mine_bound(net: StatisticsNetwork, a: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The DV bound of one batch without training (an epoch's estimate averages these)."""
    return dv_bound(*net.joint_and_marginal(a, z, perm))


def estimate_mi(a: torch.Tensor, z: torch.Tensor, cfg: MINEConfig | None = None,
                generator: torch.Generator | None = None, progress=None, desc: str = "mine") -> MINEResult:
    """Train a fresh statistics network on the pairs (a[i], z[i]) and return the DV estimate (nats).

    ``a`` and ``z`` are N x Da and N x Dz on the device to train on (flatten
    feature maps first). ``generator`` (CPU) seeds the batch orders and the
    shuffles; the network's initialisation uses the global torch RNG.
    ``progress`` is an optional wrapper such as ``ctx.progress``.
    """
    cfg = cfg or MINEConfig()
    if a.ndim != 2 or z.ndim != 2 or len(a) != len(z):
        raise ValueError(f"estimate_mi needs N x Da and N x Dz tensors, got {tuple(a.shape)} and {tuple(z.shape)}")
    if len(a) < 2:
        raise ValueError("estimate_mi needs at least two samples")
    if cfg.epochs < 1:
        return MINEResult(0.0, float("nan"), [])
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    a, z = a.detach().float(), z.detach().float()
    device = a.device
    net, opt = mine_network(a.shape[1], z.shape[1], cfg, device)
    batch_size = max(2, min(cfg.batch_size, len(a)))
    epochs = range(cfg.epochs)
    if progress is not None:
        epochs = progress(epochs, desc=desc, total=cfg.epochs)
    history: list[float] = []
    for _ in epochs:
        train_values = []
        for idx in _batches(len(a), batch_size, generator):
            idx = idx.to(device)
            train_values.append(mine_step(net, opt, a[idx], z[idx], _perm(len(idx), generator, device)))
        if cfg.eval_pass:
            values = [mine_bound(net, a[idx.to(device)], z[idx.to(device)], _perm(len(idx), generator, device))
                      for idx in _batches(len(a), batch_size, generator)]
        else:
            values = train_values
        history.append(torch.stack(values).mean().item())
    raw = sum(history[-cfg.last:]) / len(history[-cfg.last:])
    mi = raw if math.isfinite(raw) and raw > 0 else 0.0
    return MINEResult(mi, raw, history)
