"""DECREE's trigger inversion against its authors' code (GiantSeaweed/DECREE ``main.py`` ``main``): the first
eight Adam updates of ``defenses/decree.py`` ``invert_trigger`` on the trace's encoder, batch and initial trigger
(``decree.json``, ``decree_init.npz``; how they were recorded: there).

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
"""
from __future__ import annotations

import numpy as np
import torch

from defbench.defenses.decree import DecreeConfig, invert_trigger
from defbench.encoders import RunContext

from ._ssl_common import (HERE, compare, compare_params, load_inputs, load_release, load_trace, param_record,
                          release_shapes, release_state, state_checksum)

COS_ATOL, L1_RTOL, RTOL = 1e-5, 1e-4, 2e-3


def run_defbench(trace: dict, **overrides):
    """invert_trigger on the trace's inputs; returns per-update records, the trace list and the result info."""
    state = release_state("suspect", release_shapes())
    encoder, _ = load_release(state)
    images = torch.from_numpy(load_inputs()["images"]).permute(0, 3, 1, 2).contiguous()
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
                                monitor=monitor)
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
