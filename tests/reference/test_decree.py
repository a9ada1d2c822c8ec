"""DECREE's trigger inversion against its authors' code (GiantSeaweed/DECREE ``main.py`` ``main``): the first
eight Adam updates of ``defenses/decree.py`` ``invert_trigger`` on the trace's encoder, batch and initial trigger
(``decree.json``, ``decree_init.npz``; how they were recorded: there), and its lambda schedule through every branch
the reference can take, to the reference's early stop (``decree_long.json``).

Tolerance: both keep the trigger, its Adam state and the stamped images in float64 and run the encoder in
fp32; the reference normalises the stamped batch in float64 before the cast, defbench after it (in the
encoder), and the encoder's fp32 backward rounds differently. The first update agrees to 1e-7 (gradient
norms) and 1e-12 (mask update). After it the pattern is not comparable entry by entry: its gradients sit near
Adam's eps (1e-8) on this encoder (max 7e-5), where Adam's g / (sqrt(v) + eps) turns a rounding difference of
1e-10 into a different step of size ~lr for that entry, so the raw patterns drift apart by O(0.1) in a few
updates while what they do to the images does not (the cosine agrees to 6e-6 and |m|_1 to 1.2e-5 over all
eight updates, the mask's updates to 5e-4). The test compares the pattern at update 1 and the mask, the
cosine, |m|_1 and the schedule at every update: 1e-5 absolute on the cosine, 1e-4 relative on |m|_1, 2e-3
relative on gradient norms and updates. Every step's cosine stays >= 2e-3 from the 0.99 success threshold,
so the schedule's decisions cannot flip on rounding.

The long trace (``decree_long.json``, 2 images, 39 updates to the reference's own early stop) scripts the cosine the
schedule reads (the threshold +- 0.005, so no decision can flip on rounding) and keeps the real cosine's gradient.
Measured gaps over its 39 updates: the real cosine 7.2e-6 absolute, 3|m|_1 1.1e-4 relative (the pattern drifts as
above; |m|_1 follows it through the cosine's gradient); compared to 2e-5 and 3e-4, lambda exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from defbench.defenses import decree
from defbench.defenses.decree import DecreeConfig, invert_trigger, offdiag_cosine
from defbench.encoders import RunContext

from ._ssl_common import (HERE, compare, compare_params, load_inputs, load_release, load_trace, param_record,
                          release_shapes, release_state, state_checksum)

COS_ATOL, L1_RTOL, RTOL = 1e-5, 1e-4, 2e-3
LONG_COS_ATOL, LONG_L1_RTOL = 2e-5, 3e-4  # decree_long.json: see the docstring


def run_defbench(trace: dict, record_params: bool = True, **overrides):
    """invert_trigger on the trace's inputs (its batch: the first ``batch_size`` images, all in one batch); returns
    per-update records (empty unless ``record_params``), the trace list, the result info and the weights' checksum."""
    state = release_state("suspect", release_shapes())
    encoder, _ = load_release(state)
    images = load_inputs()["images"][:trace["inputs"]["batch_size"]]
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with np.load(HERE / "decree_init.npz") as data:
        init_mask = torch.from_numpy(data["mask"])
        init_pattern = torch.from_numpy(data["patch"]).permute(2, 0, 1)  # theirs is H x W x 3
    s = trace["settings"]
    values = dict(inv_batch_size=trace["inputs"]["batch_size"], inv_lr=tuple(s["lr"]),
                  inv_lr_steps=tuple(s["lr_epochs"]), inv_epoch_steps=1, inv_max_steps=s["steps"],
                  success_threshold=s["thres"])
    cfg = DecreeConfig(**{**values, **overrides})
    ctx = RunContext(device=torch.device("cpu"), seed=0)
    ctx.batches = lambda n, batch_size, **k: [torch.arange(n)]  # the reference's one fixed batch per epoch
    start = {"mask": init_mask, "patch": init_pattern.permute(1, 2, 0)}
    records, trace_list = [], []

    def monitor(raw_mask, raw_pattern):
        # the pattern in the reference's layout (H x W x 3) so that the probes line up
        records.append(param_record({"mask": raw_mask, "patch": raw_pattern.permute(1, 2, 0)}, start,
                                    {"mask": raw_mask.grad, "patch": raw_pattern.grad.permute(1, 2, 0)}))

    _, _, info = invert_trigger(encoder, images, cfg, ctx, trace=trace_list, init=(init_mask, init_pattern),
                                monitor=monitor if record_params else None)
    return records, trace_list, info, state_checksum(state)


def test_decree_inversion_matches_the_reference():
    trace = load_trace("decree")
    records, updates, info, checksum = run_defbench(trace)
    compare("weights from the shared generator", checksum, trace["inputs"]["weights"]["suspect"], 1e-9, 0)
    assert len(records) == len(trace["steps"])
    for k, (rec, (cos, l1, lam), want) in enumerate(zip(records, updates, trace["steps"])):
        compare(f"update {k + 1}: cosine term", -cos, want["terms"]["loss_cos"], 0.0, COS_ATOL)
        compare(f"update {k + 1}: L1 term (the mask summed over 3 channels)", 3 * l1, want["terms"]["loss_reg"],
                L1_RTOL, 0.0)
        compare(f"update {k + 1}: lambda", lam, want["terms"]["lambda"], 1e-12, 0.0)
        compared = ("mask", "patch") if k == 0 else ("mask",)  # the pattern: update 1 only (see the docstring)
        compare_params(f"update {k + 1}", {n: rec[n] for n in compared}, {n: want["params"][n] for n in compared},
                       RTOL)
    after = trace["steps"][-1]["after"]
    compare("lambda after the last update", info["lambda"], after["loss_lambda"], 1e-12, 0.0)
    compare("best trigger's 3|m|_1", 3 * info["mask_l1"], after["regular_best"], L1_RTOL, 0.0)
    assert info["found"] and info["steps"] == len(trace["steps"])


def schedule_branches(trace: dict) -> set[str]:
    """The branches of the lambda schedule that the reference took in ``trace``, read from its own counters after
    each update (``after``): a raise (x factor), a lowering (/ factor), a lowering skipped because lambda is already
    below lambda_min, a raise from below lambda_min (the update where a reset after ``patience`` instead of
    ``2 patience`` successes would fire), and the early stop (main() returned before the update cap)."""
    s, found = trace["settings"], set()
    for step in trace["steps"]:
        before, after = step["terms"]["lambda"], step["after"]["loss_lambda"]
        success = -step["terms"]["loss_cos"] > s["thres"]
        if after > before:
            found.add("raise from below lambda_min" if before < s["lambda_min"] else "raise")
        elif after < before:
            found.add("lower")
        elif not success and step["after"]["adaptor_down_cnt"] == 0 and before < s["lambda_min"]:
            found.add("lowering skipped below lambda_min")
    if trace["stopped_early"]:
        found.add("early stop")
    return found


def scripted_cosine(trace: dict, real: list[float]):
    """``offdiag_cosine`` as the long trace's reference ran it: the value is the trace's scripted cosine of that update,
    the gradient the real cosine's; the real values are appended to ``real``."""
    values = [-step["terms"]["loss_cos"] for step in trace["steps"]]

    def cosine(features: torch.Tensor) -> torch.Tensor:
        value = offdiag_cosine(features)
        real.append(value.item())
        if len(real) > len(values):  # past the reference's early stop: the real value (the update count then fails)
            return value
        return value + (values[len(real) - 1] - value).detach()

    return cosine


def test_decree_lambda_schedule_matches_a_longer_reference_run(monkeypatch):
    """The whole schedule on ``decree_long.json``: the reference's loop run to its own early stop, the cosine its
    schedule reads scripted (3 successes, 24 failures, then successes; the gradient is the real cosine's), so that
    lambda is lowered below lambda_min, stays there while the failures go on, and is raised back by the successes
    (DECREE's reset to init_lambda after 2 patience successes below lambda_min cannot fire: the raise after
    patience + 1 successes lifts lambda above lambda_min first). Compared at every update: lambda exactly, the real
    cosine to LONG_COS_ATOL and 3|m|_1 to LONG_L1_RTOL (measured gaps: see the module docstring); the early stop at
    the same update and the best trigger's 3|m|_1."""
    trace = load_trace("decree_long")
    s = trace["settings"]
    assert schedule_branches(trace) == {"raise", "lower", "lowering skipped below lambda_min",
                                        "raise from below lambda_min", "early stop"}
    real: list[float] = []
    monkeypatch.setattr(decree, "offdiag_cosine", scripted_cosine(trace, real))
    _, updates, info, _ = run_defbench(trace, lambda_min=s["lambda_min"], patience=s["patience"],
                                       early_stop_patience=s["early_stop_patience"], record_params=False)
    for k, ((_, l1, lam), cos, want) in enumerate(zip(updates, real, trace["steps"])):
        compare(f"update {k + 1}: lambda", lam, want["terms"]["lambda"], 1e-12, 0.0)
        compare(f"update {k + 1}: real cosine", cos, want["terms"]["real_cos"], 0.0, LONG_COS_ATOL)
        compare(f"update {k + 1}: L1 term", 3 * l1, want["terms"]["loss_reg"], LONG_L1_RTOL, 0.0)
    assert len(updates) == info["steps"] == len(trace["steps"]) < s["steps"], "not the reference's early stop"
    after = trace["steps"][-1]["after"]
    compare("lambda after the last update", info["lambda"], after["loss_lambda"], 1e-12, 0.0)
    compare("best trigger's 3|m|_1", 3 * info["mask_l1"], after["regular_best"], LONG_L1_RTOL, 0.0)
    compare("best trigger's 3|m|_1, as main() returns it", 3 * info["mask_l1"], trace["returned"], LONG_L1_RTOL, 0.0)
