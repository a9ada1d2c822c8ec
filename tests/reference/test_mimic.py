"""MIMIC against its authors' code (wssun/MIMIC ``MIMIC.py`` and ``models/scheduler.py``), on the trace
``mimic.json`` (how it was recorded: there). Checked in fp32, all before any optimiser update:

- **MI localisation** on the fresh student (``mi_source="student"``, where MIMIC.py measures it): the stage
  outputs and normalised features of ``stage_table`` on both MINE batches, then per stage the first DV bound of
  ``defenses/mutual_information.py`` on the trace's permutation and the gradient norms of its first MINE step;
- **weight scheduler**: ``mi_weights`` on the trace's MI values;
- **distillation**: the first step of ``mimic_loss`` (each view its own student pass, as ``snet(im_1)``,
  ``snet(im_2)``) on the trace's views: every loss term, the gradient norm of every student parameter and the
  size |w1 - w0| of Adam's first update.

In float64 (the trace's ``float64`` section: the reference run with weights, images, views, statistics networks
and Adam states in float64): the three distillation steps (every loss term, gradient norm, |w - w0| and probe of
w - w0) within 1e-9 relative [measured: 2.5e-13 terms, 1.4e-12 gradient norms, 1.7e-12 of |w - w0| for the
probes], and every MINE call (32 DV bounds) and training step (16: loss, gradient norms, updates) within 1e-9
relative + 1e-10 (bounds) [9.8e-13] and 1e-6 relative (steps) [6.7e-10, on the last bias of T: its update is
driven by weight decay, 1e-5 * b ~ 3e-7, against the float64 rounding ~1e-15 of its zero DV gradient; 4.6e-11
on every other parameter].

Why fp32 stops at the first update: Adam's first update is ``lr * g / (|g| + eps)``, i.e. ``lr * sign(g)`` per entry.
defbench's own fp32 step-1 gradient flips sign against its float64 gradient on 404 of 11,497,664 student entries
(498 have |g| < 1e-6), so the direction of the first update (the trace's probe of w - w0) already differs by rounding:
defbench fp32 vs defbench float64 differ by 0.21 of |w1 - w0| (probe), as much as defbench fp32 vs the reference
(0.21); every later step inherits it (step 3: 0.24 fp32 vs float64, 0.31 vs the reference). Its size |w1 - w0|
does not depend on the signs and is checked. In MINE, the last bias of T has an analytically zero DV gradient
(d/db [mean T0 - log mean exp T1] = 1 - 1): the recorded 1.2e-7 is rounding, of the size of its weight decay
(1e-5 * b ~ 3e-7), so the sign of its first Adam step is rounding too: its gradient is checked to be ~0, and in
fp32 no MINE update or later bound is compared.

Tolerances (measured gaps, fp32 on both sides, in brackets): loss terms 5e-5 relative [2.4e-6]; distillation
gradient norms 2e-3 relative [4.5e-4 on BatchNorm scales of layer1; defbench's own fp32 vs float64 differ by 4.8e-4
on the same one]; |w1 - w0| 1e-4 relative [3.4e-6]; first DV bound 1e-6 absolute [1.0e-7; it is the difference of
two means of T values of size ~0.1-0.4, rounded at ~1e-8 each]; MINE gradient norms 1e-4 relative [1.3e-5]; the
zero-gradient bias 1e-6 absolute [1.2e-7].
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from defbench.defenses.mimic import MIMICConfig, distill_optimizer, mi_weights, mimic_loss, stage_table
from defbench.defenses.mutual_information import (MINEConfig, StatisticsNetwork, dv_bound, mine_bound, mine_input,
                                                  mine_network, mine_step)
from defbench.encoders import frozen_copy

from ._ssl_common import (compare, compare_params, load_inputs, load_release, load_trace, param_record, release_shapes,
                          release_state, state_checksum, tnet_state, tnet_to_defbench, to_float_nchw)

RTOL_TERMS, RTOL_GRAD, RTOL_STEP, RTOL_FLOAT64 = 5e-5, 2e-3, 1e-4, 1e-9
RTOL_MINE_FLOAT64, ATOL_BOUND_FLOAT64 = 1e-6, 1e-10
ATOL_BOUND, RTOL_MINE_GRAD, ATOL_ZERO_GRAD = 1e-6, 1e-4, 1e-6
LAYERS = ("layer1", "layer2", "layer3", "layer4")
ZERO_GRAD = "dense3.bias"  # T's last bias: the DV bound does not depend on it


def encoders():
    shapes = release_shapes()
    teacher_state, student_state = release_state("teacher", shapes), release_state("student", shapes)
    teacher, _ = load_release(teacher_state)
    student, mapping = load_release(student_state)
    return teacher, student, mapping, {"teacher": state_checksum(teacher_state),
                                       "student": state_checksum(student_state)}


def tnet_layout(net, get) -> dict[str, torch.Tensor]:
    """``get`` of each parameter of defbench's statistics network, in the reference's layout (dense1 on [a, z])."""
    return {"dense1.weight": torch.cat([get(net.w_a), get(net.w_z)], 1), "dense1.bias": get(net.b1),
            "dense2.weight": get(net.tail[1].weight), "dense2.bias": get(net.tail[1].bias),
            "dense3.weight": get(net.tail[3].weight), "dense3.bias": get(net.tail[3].bias)}


def tnet_grads(net) -> dict[str, torch.Tensor]:
    return tnet_layout(net, lambda p: p.grad)


def tnet_values(net) -> dict[str, torch.Tensor]:
    return tnet_layout(net, lambda p: p.detach())


def first_mine_steps(trace: dict, student) -> dict[str, dict]:
    """Per stage, defbench's MINE on the reference's first call (batch 0, its permutation), before any update:
    {layer: {"sums": [[a_sum, z_sum] of batch 0, of batch 1], "bound": DV bound, "grads": {name: norm}}}."""
    images = torch.from_numpy(load_inputs()["images"]).permute(0, 3, 1, 2).contiguous()
    table, feature = stage_table(student, images, torch.device("cpu"))
    hidden, b = trace["settings"]["mi_hidden"], trace["inputs"]["batch_size"]
    out = {}
    for layer in LAYERS:
        a = table[layer]
        net = StatisticsNetwork(a.shape[1], feature.shape[1], hidden)
        net.load_state_dict(tnet_to_defbench(tnet_state(f"mimic/{layer}", a.shape[1], feature.shape[1]), a.shape[1]))
        call = next(c for c in trace["mine"]["calls"] if c["layer"] == layer)
        bound = dv_bound(*net.joint_and_marginal(a[:b], feature[:b], torch.tensor(call["perm"])))
        (-bound).backward()
        sums = [[float(a[r].double().sum()), float(feature[r].double().sum())] for r in (slice(0, b), slice(b, 2 * b))]
        out[layer] = {"sums": sums, "bound": bound.item(),
                      "grads": {k: float(g.double().norm()) for k, g in tnet_grads(net).items()}}
    return out


def as_float64(encoder):
    """The encoder in float64, its normalisation constants too (from the config, not the fp32 buffers)."""
    encoder.double()
    encoder._mean = torch.tensor(encoder.config.mean, dtype=torch.float64).view(1, 3, 1, 1)
    encoder._std = torch.tensor(encoder.config.std, dtype=torch.float64).view(1, 3, 1, 1)
    return encoder


def views_float64(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float64 N x 3 x H x W in [0, 1] (ToTensor in float64)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).double().div(255.0)


def distillation_steps(trace: dict, teacher, student, mapping, n_steps: int, float64: bool = False) -> list[dict]:
    """defbench's distillation steps on the trace's views ([0..3], [4..7], [0..3]): per step the loss terms (the
    reference's names) and per parameter [gradient norm, |w - w0|, probe of w - w0] (release names)."""
    inp, s = load_inputs(), trace["settings"]
    cfg = MIMICConfig(lr=s["lr"], weight_decay=s["weight_decay"], temperature=s["temperature"])
    beta = dict(zip(LAYERS, trace["beta"]))
    if float64:
        teacher, student = as_float64(teacher), as_float64(student)
    views = views_float64 if float64 else to_float_nchw
    teacher = frozen_copy(teacher)
    student.train()
    opt = distill_optimizer(student, cfg)
    named = {mapping[k]: p for k, p in student.named_parameters()}
    start = {k: p.detach().clone() for k, p in named.items()}
    steps = []
    for rows in (slice(0, 4), slice(4, 8), slice(0, 4))[:n_steps]:
        loss, parts = mimic_loss(student, teacher, views(inp["view1"][rows]), views(inp["view2"][rows]), beta, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        terms = {"loss": loss.item(), "conloss": parts["l1"].item(), "cloneloss": parts["l0"].item()}
        terms.update({f"at{i + 1}_loss": beta[layer] * parts[f"at_{layer}"].item() for i, layer in enumerate(LAYERS)})
        steps.append({"terms": terms, "params": param_record(named, start)})
    return steps


def mine_float64(trace: dict, student) -> tuple[list[float], list[dict]]:
    """defbench's MINE in float64 on every call of the trace's float64 run (stage table of the float64 student in
    eval mode; per stage and epoch: train on batches 0, 1 with ``mine_step``, then evaluate them with
    ``mine_bound``, on the recorded permutations): (bound per call, per training step {"loss", "params"})."""
    images = load_inputs()["images"]
    student = as_float64(student).eval()
    with torch.no_grad():
        out = student.stages(views_float64(images))
    feature = F.normalize(out["feature"], dim=1)
    s, b = trace["settings"], trace["inputs"]["batch_size"]
    cfg = MINEConfig(lr=s["mi_lr"], weight_decay=s["mi_weight_decay"], hidden=s["mi_hidden"])
    bounds, steps = [], []
    for layer in LAYERS:
        a = out[layer].flatten(1)
        assert torch.equal(mine_input(out[layer]).double(), a.float().double())  # the flattening MINE's input uses
        torch.set_default_dtype(torch.float64)
        try:
            net, opt = mine_network(a.shape[1], feature.shape[1], cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        net.load_state_dict(tnet_to_defbench(tnet_state(f"mimic/{layer}", a.shape[1], feature.shape[1]), a.shape[1]))
        start = {f"{layer}/{k}": v.clone() for k, v in tnet_values(net).items()}
        calls = [c for c in trace["float64"]["mine"]["calls"] if c["layer"] == layer]
        for i, call in enumerate(calls):
            rows, perm = slice((i % 2) * b, (i % 2 + 1) * b), torch.tensor(call["perm"])
            if call["train"]:
                bound = mine_step(net, opt, a[rows], feature[rows], perm)
                named = {f"{layer}/{k}": v for k, v in tnet_values(net).items()}
                grads = {f"{layer}/{k}": g for k, g in tnet_grads(net).items()}
                steps.append({"loss": -bound.item(), "params": param_record(named, start, grads)})
            else:
                bound = mine_bound(net, a[rows], feature[rows], perm)
            bounds.append(bound.item())
    return bounds, steps


def test_mimic_mi_localisation_first_step_matches_the_reference():
    trace = load_trace("mimic")
    _, student, _, checksums = encoders()
    compare("weights from the shared generator", checksums, trace["inputs"]["weights"], 1e-9, 0)
    got = first_mine_steps(trace, student)
    for layer in LAYERS:
        calls = [c for c in trace["mine"]["calls"] if c["layer"] == layer]
        step = next(st for st in trace["mine"]["steps"] if st["layer"] == layer)
        for k, (a_sum, z_sum) in enumerate(got[layer]["sums"]):  # calls 1 and 2 read batches 0 and 1
            compare(f"{layer} batch {k}: sum of the stage outputs", a_sum, calls[k]["a_sum"], 1e-5, 1e-3)
            compare(f"{layer} batch {k}: sum of the normalised features", z_sum, calls[k]["z_sum"], 1e-6, 1e-4)
        compare(f"{layer}: first DV bound", got[layer]["bound"], calls[0]["value"], 0.0, ATOL_BOUND)
        compare(f"{layer}: first MINE loss", -got[layer]["bound"], step["loss"], 0.0, ATOL_BOUND)
        for name, norm in got[layer]["grads"].items():
            want = step["params"][f"{layer}/{name}"][0]
            if name == ZERO_GRAD:
                assert norm <= ATOL_ZERO_GRAD and want <= ATOL_ZERO_GRAD, f"{layer} {name}: {norm}, {want} not ~0"
            else:
                compare(f"{layer}: first MINE gradient norm of {name}", norm, want, RTOL_MINE_GRAD, 0.0)


def test_mimic_weight_scheduler_matches_the_reference():
    trace = load_trace("mimic")
    mi = dict(zip(LAYERS, trace["mi_given"].values()))
    compare("beta", list(mi_weights(mi, 1000.0, 10000.0).values()), trace["beta"], 1e-12, 0.0)


def test_mimic_first_distillation_step_matches_the_reference():
    trace = load_trace("mimic")
    teacher, student, mapping, _ = encoders()
    got, want = distillation_steps(trace, teacher, student, mapping, n_steps=1)[0], trace["steps"][0]
    compare("step 1 loss terms", got["terms"], want["terms"], RTOL_TERMS, 0.0)
    assert set(got["params"]) == set(want["params"])
    for name, (grad, size, _) in got["params"].items():
        compare(f"step 1 gradient norm of {name}", grad, want["params"][name][0], RTOL_GRAD, 0.0)
        compare(f"step 1 |w1 - w0| of {name}", size, want["params"][name][1], RTOL_STEP, 0.0)


def test_mimic_distillation_in_float64_matches_the_reference_for_three_steps():
    trace = load_trace("mimic")
    teacher, student, mapping, _ = encoders()
    want = trace["float64"]["steps"]
    got = distillation_steps(trace, teacher, student, mapping, n_steps=len(want), float64=True)
    for k, (g, w) in enumerate(zip(got, want)):
        compare(f"float64 step {k + 1} loss terms", g["terms"], w["terms"], RTOL_FLOAT64, 0.0)
        compare_params(f"float64 step {k + 1}", g["params"], w["params"], RTOL_FLOAT64)


def test_mimic_mine_in_float64_matches_the_reference_for_every_step():
    trace = load_trace("mimic")
    _, student, _, _ = encoders()
    bounds, steps = mine_float64(trace, student)
    want = trace["float64"]["mine"]
    compare("float64 DV bounds", bounds, [c["value"] for c in want["calls"]], RTOL_FLOAT64, ATOL_BOUND_FLOAT64)
    assert len(steps) == len(want["steps"])
    for k, (g, w) in enumerate(zip(steps, want["steps"])):
        compare(f"float64 MINE step {k + 1} loss", g["loss"], w["loss"], RTOL_FLOAT64, ATOL_BOUND_FLOAT64)
        compare_params(f"float64 MINE step {k + 1}", g["params"], w["params"], RTOL_MINE_FLOAT64)
