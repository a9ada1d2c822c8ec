"""FP's pruning rule against SCLBD/BackdoorBench's own ``FinePrune.defense`` (trace in fp.json).

The reference ran end to end on the first 24 fixed images and the suspect encoder's weights (in a CIFAR
ResNet-18 with a fixed linear head, the layer it masks): its forward hook read the pooled layer4 output,
it ranked the channels by mean activation (``torch.argsort``), walked its pruning loop (the clean accuracy
its stop rule reads was scripted: no labels exist for an encoder) and built its fine-tuning. Compared here
with defbench's own ``rank_channels`` and ``choose_ratio``: the mean activation of every channel, the order,
the order of tied (dead) channels, and the set of channels pruned at every count both visit; and that FP's
fine-tuning recipe is FT's (whose updates tests/reference/test_ft.py traces). The stopping rule, the
candidate counts and the pruning op differ by design (as recorded in the JSON's ``parts``;
docs/methods/fp.md); the test checks the recorded reference behaviour they are documented from.

Tolerance: activations to ``1e-5`` relative (fp32 forward, the same convolutions; the mean taken as
per-image pooling then a sum in the reference, one sum in defbench: measured 1.7e-7 apart at most); orders
and sets exactly (the recorded activations' smallest gap between distinct values is checked to exceed that
tolerance).
"""
from __future__ import annotations

import math

import torch

from . import _classic_common as C
from defbench.defenses import fp
from defbench.defenses.ft import FTConfig

RTOL, ATOL = 1e-5, 1e-7
REF = C.load_trace("fp")
RUN = REF["run"]
CPU = torch.device("cpu")


def _images() -> torch.Tensor:
    return C.uint8("images")[:24]


def _distinct_gap(values: list[float]) -> float:
    ordered = sorted(set(values))
    return min(b - a for a, b in zip(ordered, ordered[1:]))


def test_mean_activation_and_ranking_match_the_reference():
    order, act = fp.rank_channels(C.encoder("suspect"), _images(), "layer4", CPU)
    C.assert_close(act.tolist(), RUN["activation"], RTOL, ATOL, "mean activation")
    assert _distinct_gap(RUN["activation"]) > 10 * (RTOL * max(RUN["activation"]) + ATOL)  # the order is robust
    assert order.tolist() == RUN["seq_sort"]


def test_tied_channels_take_the_reference_place_in_index_order():
    ties = REF["ties"]
    dead = torch.tensor(ties["dead_channels"])
    n = len(dead)
    encoder = C.encoder("suspect")
    fp.prune_channels(encoder, "layer4", dead)  # the same BN weights and biases zeroed as in the reference
    order, act = fp.rank_channels(encoder, _images(), "layer4", CPU)
    assert torch.all(act[dead] == 0) and [ties["activation"][i] for i in dead] == [0.0] * n
    C.assert_close(act.tolist(), ties["activation"], RTOL, ATOL, "mean activation with dead channels")
    # the reference's unstable argsort put the tied group first in an order of its own (recorded: 2, 20, 9);
    # defbench puts the same group in the same place, by index; every other position is the reference's
    assert set(ties["seq_sort"][:n]) == set(dead.tolist()) and ties["seq_sort"][:n] != sorted(dead.tolist())
    assert order[:n].tolist() == sorted(dead.tolist())
    assert order[n:].tolist() == ties["seq_sort"][n:]


def test_pruned_channels_at_every_count_match_the_reference(monkeypatch):
    encoder = C.encoder("suspect")
    order, _ = fp.rank_channels(encoder, _images(), "layer4", CPU)
    tried: dict[int, list[int]] = {}
    real = fp.prune_channels

    def recording(enc, stage, pruned):
        tried[len(pruned)] = sorted(pruned.tolist())
        real(enc, stage, pruned)

    monkeypatch.setattr(fp, "prune_channels", recording)
    cfg = fp.FPConfig(min_similarity=-1.0)  # the paper's steps and cap; every candidate accepted
    fp.choose_ratio(encoder, order, _images(), "layer4", cfg, CPU)
    cap = math.floor(cfg.max_ratio * 32)
    assert set(range(1, cap + 1)) <= set(tried)  # 32 channels: every count up to the cap is a candidate
    compared = 0
    for cand in RUN["candidates"]:
        zeroed = cand["zeroed"]
        assert cand["weight_zero_columns"] == zeroed  # the reference's mask is what its classifier sees
        if 0 < len(zeroed) <= cap:
            assert tried[len(zeroed)] == zeroed, f"{len(zeroed)} channels pruned"
            compared += 1
    assert compared == len(RUN["candidates"]) - 2  # all but num_pruned 0 and 1 (both zero nothing)
    # what pruning those channels leaves: the feature dimensions the reference's mask removes are exactly 0
    pruned = C.encoder("suspect")
    real(pruned, "layer4", torch.tensor(RUN["candidates"][-1]["zeroed"]))
    with torch.no_grad():
        feats = pruned.features(C.floats("images")[:24])
    assert torch.all(feats[:, RUN["candidates"][-1]["zeroed"]] == 0)


def test_recorded_reference_behaviour_is_what_the_parity_page_says():
    """What docs/methods/fp.md records of the reference's own run (its candidate counts, what it fine-tunes after
    the stop, its mask holding through fine-tuning), read off that run."""
    cands = RUN["candidates"]
    step = math.ceil(RUN["channels"] * REF["settings"]["once_prune_ratio"])
    assert [c["num_pruned"] for c in cands] == list(range(0, step * len(cands), step))
    assert all(len(c["zeroed"]) == max(0, c["num_pruned"] - 1) for c in cands)  # seq_sort[0:num_pruned - 1]
    assert all(c["zeroed"] == sorted(RUN["seq_sort"][:len(c["zeroed"])]) for c in cands)  # least active first
    stop = RUN["stop"]
    assert stop["stopped_at_num_pruned"] == cands[-1]["num_pruned"] > stop["last_accepted_num_pruned"]
    assert stop["fine_tuned_zeroed"] == cands[-1]["zeroed"]  # the rejected count is what gets fine-tuned
    assert stop["zero_columns_after_fine_tuning"] == stop["fine_tuned_zeroed"]  # the mask holds through SGD
    grid = REF["grid_512"]
    assert [c["n_zeroed"] for c in grid["candidates"]] == \
        [max(0, n - 1) for n in range(0, 512, math.ceil(512 * 0.01))][:len(grid["candidates"])]
    assert [round(i * fp.FPConfig().ratio_step * 512) for i in range(1, 6)] == [5, 10, 15, 20, 26]


def test_fine_tuning_is_fts_recipe_as_in_the_reference():
    ref = RUN["fine_tuning"]
    ft_ref = C.load_trace("ft")["settings"]
    assert ref["optimizer"] == {k: ft_ref[k] for k in ref["optimizer"]}  # FP's YAML builds FT's optimiser
    assert (ref["scheduler"], ref["T_max"], ref["eta_min"]) == (ft_ref["scheduler"], ft_ref["T_max"], 0)
    # 2 epochs of one batch: the cosine at T_max = 100, stepped per epoch as FT's
    C.assert_close(ref["lr_per_step"], [0.01, 0.01 * (1 + math.cos(math.pi / 100)) / 2], 1e-8, 0, "fp lr")
    assert fp.FPConfig().fine_tuning() == FTConfig()  # and defbench's FP fine-tunes with FT's recipe
