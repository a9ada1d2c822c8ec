"""DRUPE against its authors' code (Gwinhen/DRUPE ``main.py`` ``train``, mode ``drupe``): one step in each phase
of ``attacks/drupe.py`` (warm-up epoch 1, stage 1 epoch 2, main phase epoch 21) on the fixed batches and
sliced-Wasserstein directions of the trace ``drupe.json``, then the weight adaptation after epoch 21.

The release's ``spread`` (``(S - diag_embed(S)).mean()``, which broadcasts to (1 - 1/B) x the mean over all
pairs of the cosine matrix S, diagonal included) differs from defbench's by design (the mean over distinct
pairs; docs/methods/drupe.md). The test checks the exact relation between the two, then traces the main phase
with the release's expression in place of defbench's, so that every other part of the arithmetic is compared.

Tolerance: as for BadEncoder (tests/reference/test_badencoder.py): 1e-5 absolute on the loss terms, 2e-3
relative on gradient norms and updates (rounding magnified by the near-parallel random embeddings; measured
gaps up to 5e-4).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from defbench.attacks import drupe as drupe_mod
from defbench.attacks.badencoder import poisoning_optimizer
from defbench.attacks.drupe import DRUPEConfig, DRUPEState, drupe_loss
from defbench.encoders import frozen_copy

from ._ssl_common import (compare, compare_params, det_tensor, load_inputs, load_release, load_trace,
                          param_record, poisoning_batch, release_shapes, release_state, state_checksum)

LOSS_ATOL, RTOL = 1e-5, 2e-3
STEPS = ((1, [0, 1, 2, 3]), (2, [4, 5, 6, 7]), (21, [0, 1, 2, 3]))  # (epoch, batch) of the trace


def release_spread(feats: torch.Tensor) -> torch.Tensor:
    """The release's sim_backdoor2backdoor: (S - diag_embed(S)).mean() = sum(S) (B - 1) / B^3."""
    z = F.normalize(feats, dim=1)
    b = len(z)
    return (z @ z.t()).sum() * (b - 1) / b ** 3


def run_defbench(trace: dict, monkeypatch, spread_as_release: bool = True):
    inp = load_inputs()
    state_dict = release_state("clean", release_shapes())
    clean, mapping = load_release(state_dict)
    s = trace["settings"]
    cfg = DRUPEConfig(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], lambda1=s["lambda1"],
                      lambda2=s["lambda2"], n_reference=trace["inputs"]["n_reference"])
    model, frozen = clean.clone(), frozen_copy(clean)
    opt = poisoning_optimizer(model, cfg)
    state = DRUPEState(cfg)
    named = {mapping[k]: p for k, p in model.named_parameters() if k.startswith("backbone.")}
    start = {k: p.detach().clone() for k, p in named.items()}
    trigger = cfg.make_trigger(32)
    real_sw = drupe_mod.sliced_wasserstein
    if spread_as_release:
        monkeypatch.setattr(drupe_mod, "mean_pairwise_cosine", release_spread)
    steps, schedule = [], []
    for (epoch, idx), want in zip(STEPS, trace["steps"]):
        directions = det_tensor(want["sw_directions"], (clean.feature_dim, cfg.n_projections), -1.0, 1.0)
        monkeypatch.setattr(drupe_mod, "sliced_wasserstein", functools.partial(real_sw, directions=directions))
        state.epoch = epoch
        x, x_trig, refs, refs_aug = poisoning_batch(inp, idx, cfg.n_reference, trigger)
        total, l0, l1, l2, sw, spread, ref_std, ref_sim = drupe_loss(model, frozen, x, x_trig, refs, refs_aug,
                                                                      cfg, state)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        terms = {"loss": total.item(), "loss_0": l0.item(), "loss_1": l1.item(), "loss_2": l2.item(),
                 "loss_3": ref_sim.item(), "std_refs": ref_std.item(), "sim_backdoor2backdoor": spread.item(),
                 "loss_b2c": state.last_sw, "backdoored_clean_dev": state.last_sw / sw.item()}
        steps.append({"terms": terms, "params": param_record(named, start), "sw_directions": want["sw_directions"]})
        state.end_epoch(epoch, model, [t.item() for t in (l0, l1, l2, sw, spread, ref_std, ref_sim)])
        schedule.append({"epoch": epoch, "cost": state.angular_weight, "cost_1": state.sw_weight,
                         "cost_up_counter": state.up, "cost_down_counter": state.down,
                         "cost_up_counter_1": state.up_sw, "cost_down_counter_1": state.down_sw})
    return steps, schedule, state_checksum(state_dict)


def test_drupe_steps_and_schedule_match_the_reference(monkeypatch):
    trace = load_trace("drupe")
    steps, schedule, checksum = run_defbench(trace, monkeypatch)
    compare("weights from the shared generator", checksum, trace["inputs"]["weights"]["clean"], 1e-9, 0)
    for k, (got, want) in enumerate(zip(steps, trace["steps"])):
        compare(f"epoch {STEPS[k][0]} loss terms", got["terms"], want["terms"], 0.0, LOSS_ATOL)
        compare_params(f"epoch {STEPS[k][0]}", got["params"], want["params"], RTOL)
    for got, want in zip(schedule, trace["schedule"]):
        compare(f"weights after epoch {want['epoch']}", got, {k: v for k, v in want.items() if k != "measure"},
                1e-12, 0.0)


def test_drupe_spread_is_the_off_diagonal_mean_of_the_release_matrix():
    """defbench's spread m (distinct pairs) and the release's value r on one batch:
    r = (B - 1)(B + B(B - 1) m) / B^3 for unit-norm embeddings (the diagonal holds B ones)."""
    feats = det_tensor("drupe/spread", (6, 32), -1.0, 1.0)
    b = len(feats)
    m = drupe_mod.mean_pairwise_cosine(feats)
    compare("release spread from defbench's", (b - 1) * (b + b * (b - 1) * m.item()) / b ** 3,
            release_spread(feats).item(), 0.0, 1e-6)
