"""MOTH's trigger inversion against Gwinhen/MOTH's ``Trigger`` and ``TriggerCombo`` (trace in moth.json).

The reference's ``generate`` ran with the encoder adaptation's loss (-cos to a pseudo-class centroid)
in the place of its cross-entropy, on a model whose logits are those cosines, so everything else of
the inversion is compared step by step: the success rate, the mean and best |m|_1, the cost schedule
and the mask and pattern each step hands to the next (after a restart from a new best trigger), for
the warm-up's universal trigger (14 steps) and for both directions of a pair (14 steps).

Fixed inputs: the centroids and image sets are stored in the JSON; the initial triggers and the
restart noise come from ``det_uniform`` on both sides (the reference's generator was replaced by the
same table). Tolerance: ``1e-5`` relative on sizes, costs and checksums (fp32: the same operations in
another order; a |m|_1 over 1,024 pixels sums to ~1e-6 relative) plus 10 x the recorded envelope;
success rates and the number of pinned tanh entries are counts and must agree exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from . import _classic_common as C
from defbench.defenses import moth
from defbench.encoders import RunContext

RTOL, SPREAD = 1e-5, 10.0
REF = C.load_trace("moth")
CFG = moth.MothConfig()
H = W = 32


def _init_trigger(salt: int, n_dir: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The driver's initial triggers: half the pixels at 0.004, half in [0.2, 0.9]; patterns uniform."""
    shape_m, shape_p = (n_dir, 1, H, W) if n_dir > 1 else (H, W), (n_dir, 3, H, W) if n_dir > 1 else (3, H, W)
    mask = np.where(C.det_uniform(shape_m, salt) < 0.5, 0.004, 0.2 + 0.7 * C.det_uniform(shape_m, salt + 1))
    mask, pattern = mask.astype(np.float32).reshape(n_dir, H, W), C.det_uniform(shape_p, salt + 2).astype(np.float32)
    pattern = pattern.reshape(n_dir, 3, H, W)
    return [(torch.from_numpy(mask[d]), torch.from_numpy(pattern[d])) for d in range(n_dir)]


def _replay_noise(monkeypatch) -> list:
    """Serve the restart noise from the driver's table (draw k: 0.02 u - 0.01); returns the shapes drawn."""
    shapes = []

    def noise(shape, eps, generator):
        assert eps == 0.01
        value = (C.det_uniform(shape, 1000 + len(shapes)) * 0.02 - 0.01).astype(np.float32)
        shapes.append(list(shape))
        return torch.from_numpy(value)

    monkeypatch.setattr(moth, "_restart_noise", noise)
    return shapes


def _record(history: list) -> list:
    out = []
    for step in history:
        entries = []
        for d in step:
            mask, pattern = moth._from_tanh_space(d["raw_mask"]), moth._from_tanh_space(d["raw_pattern"])
            entries.append({"rate": d["rate"], "mean_size": d["mean_size"], "best_size": d["best_size"],
                            "cost": d["cost"], "next_mask": C.checksum([mask]), "next_pattern": C.checksum([pattern]),
                            "pinned": int((d["raw_mask"].abs() > 8).sum() + (d["raw_pattern"].abs() > 8).sum())})
        out.append(entries)
    return out


def _best(found) -> tuple:
    mask = found["mask"] if found else torch.zeros(H, W)
    pattern = found["pattern"] if found else torch.zeros(3, H, W)
    return C.checksum([mask]), C.checksum([pattern]), float(mask.sum())


def _compare(ours: dict, ref: dict, envelope: dict, what: str) -> None:
    """Success rates, "no best yet" and the cost schedule must agree exactly (they are decisions); sizes,
    checksums and pinned counts within the tolerance."""
    for i, (mine, theirs) in enumerate(zip(ours["steps"], ref["steps"])):
        for d, (a, e) in enumerate(zip(mine, theirs)):
            got = (round(a["rate"], 6), a["best_size"] is None, float(f"{a['cost']:.9g}"))
            want = (round(e["rate"], 6), e["best_size"] is None, e["cost"])
            assert got == want, f"{what} step {i} direction {d}: (success rate, no best yet, cost) {got} vs " \
                                f"reference {want}"
    numeric = ("mean_size", "best_size", "next_mask", "next_pattern", "pinned")
    keys = ("best_mask", "best_pattern", "best_size")

    def pick(trace):
        steps = [[{k: (d[k] if d[k] is not None else 0.0) for k in numeric} for d in st] for st in trace["steps"]]
        return {"steps": steps, **{k: trace[k] for k in keys}}

    C.assert_trace(pick(ours), pick(ref), pick(envelope), RTOL, SPREAD, what)


def _invert(ref: dict, image_ids: list, direction: torch.Tensor, targets: list, reduction: str, keep_last: bool,
            monkeypatch) -> tuple[dict, list]:
    shapes = _replay_noise(monkeypatch)
    history = []
    found = moth.invert_triggers(C.encoder("suspect"), C.uint8("images")[image_ids], direction, targets,
                                 torch.tensor(REF["centroids"]), REF["steps"], ref["bound"], CFG.init_cost, CFG,
                                 RunContext(device=torch.device("cpu"), seed=0, show_progress=False),
                                 init=_init_trigger(ref["init_salt"], len(targets)), reduction=reduction,
                                 keep_last=keep_last, history=history)
    best = [_best(f) for f in found]
    return {"steps": _record(history), "best_mask": [b[0] for b in best], "best_pattern": [b[1] for b in best],
            "best_size": [b[2] for b in best]}, shapes


def test_universal_trigger_inversion_matches_the_reference(monkeypatch):
    ref = REF["universal"]
    ours, shapes = _invert(ref, ref["images"], torch.zeros(len(ref["images"]), dtype=torch.long), [ref["target"]],
                           "mean", True, monkeypatch)
    for key in ("best_mask", "best_pattern", "best_size"):  # one direction: the reference returns it bare
        ours[key] = ours[key][0]
    assert shapes == ref["noise_shapes"], "restarts (noise draws) differ from the reference's"
    _compare(ours, ref, REF["universal_envelope"], "universal")


def test_pair_inversion_matches_the_reference(monkeypatch):
    ref = REF["pair"]
    s, t = ref["pair"]
    images = ref["source_images"] + ref["target_images"]
    direction = torch.tensor([0] * len(ref["source_images"]) + [1] * len(ref["target_images"]))
    ours, shapes = _invert(ref, images, direction, [t, s], "sum", False, monkeypatch)
    assert [int(np.prod(x)) for x in shapes] == [int(np.prod(x)) for x in ref["noise_shapes"]], \
        "restarts (noise draws) differ from the reference's"
    _compare(ours, ref, REF["pair_envelope"], "pair")


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_tanh_space_keeps_the_references_end_points(value):
    """A trigger value clipped to 0 or 1 maps to the reference's arctanh((v - 0.5)(2 - 1e-7)) (|raw| ~ 8.66)."""
    raw = moth._to_tanh_space(torch.tensor([value]))
    assert raw.abs().item() == pytest.approx(8.6643, abs=1e-3)
