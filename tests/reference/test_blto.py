"""BLTO's trigger against jsrdcht/SSL-Backdoor's ``GeneratorResnet`` and ``AdaptivePoisoningAgent`` (trace in
blto.json).

No code that trains a BLTO generator is public, so what is traced is the part the reference shares: the generator
and how it stamps images. A seeded defbench generator (width 4, six residual blocks, BatchNorm statistics nudged
so that eval and train mode differ) is stored in ``blto_generator.npz``; the reference ran it, mapped into its
``GeneratorResnet``, through its own agent and datasets on the fixed images of ``poison_inputs.npz``. defbench's
``BLTOTrigger`` rebuilt from the same weights must reproduce:

- the generator's output (six blocks, and two: the reference's ``dim='low'``), the eps-ball projection at 8/255
  and at 32/255, to ``ATOL`` pixel levels;
- the uint8 poisons and triggered test images, byte for byte once defbench's float stamp is truncated as the
  reference truncates; as shipped (defbench rounds) at most one level above, exactly where the fraction is >= 0.5.

``ATOL`` = 1e-2 of a pixel level: the reference's own fp32 generator output is within ``fp64_gap_levels``
(recorded: the largest |fp32 - fp64| over the 32 images, 1.5e-3 of a level) of its float64 rerun, so two fp32
implementations of the same arithmetic differ by at most about twice that (3e-3); 1e-2 is about three times
that. (On the recording machine defbench agrees with the reference to the 8 digits recorded.) A byte may then
differ only where G(x) lies within ``ATOL`` of an integer level; every other byte must be equal: the bounds
x -+ eps are computed by the same fp32 operations from the same bytes on both sides.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import _poison_common as P
from defbench.attacks import blto

REF = P.load_trace("blto")
TRACE = REF["trace"]
SETTINGS = REF["settings"]
GENERATOR = Path(__file__).parent / REF["generator"]["file"]
ATOL = 1e-2  # pixel levels (0..255), see the module docstring
SUM_ATOL = 3072 * ATOL  # an image's 3,072 values, each within ATOL
EPS = 8.0  # pixel units, the trace's 8/255


def _stored() -> dict[str, torch.Tensor]:
    assert hashlib.sha256(GENERATOR.read_bytes()).hexdigest() == REF["generator"]["sha256"], \
        f"{GENERATOR.name} is not the generator blto.json was recorded with"
    with np.load(GENERATOR) as data:
        return {k: torch.from_numpy(data[k]).float() for k in data.files}


def _generator(blocks: int) -> blto.Generator:
    """defbench's generator with the stored weights, each tensor at the place the trace's weight map gives it."""
    pairs = TRACE["weight_map" if blocks == SETTINGS["blocks"] else "weight_map_low"]
    g = blto.Generator(SETTINGS["ngf"], blocks)
    state, stored = g.state_dict(), _stored()
    names = [k for k, v in state.items() if v.is_floating_point()]
    assert len(names) == len(pairs), f"{len(names)} float tensors, the weight map pairs {len(pairs)}"
    for name, (_, source) in zip(names, pairs):
        state[name] = stored[source]
    g.load_state_dict(state)
    return g


@lru_cache(maxsize=2)
def _trigger(eps: float = EPS) -> blto.BLTOTrigger:
    """defbench's trigger as the attack hands it over: packed weights, rebuilt by ``generator()`` (eval mode)."""
    return blto.BLTOTrigger(weights=blto.pack_weights(_generator(SETTINGS["blocks"])), eps=eps,
                            width=SETTINGS["ngf"], blocks=SETTINGS["blocks"], image_size=SETTINGS["image_size"])


def _floats(index) -> torch.Tensor:
    return P.images()[index].float() / 255.0


def _stamp(index, eps: float = EPS) -> torch.Tensor:
    """defbench's float stamp (before any rounding) in pixel scale, float64."""
    with torch.no_grad():
        return (blto.stamp(_trigger(eps).generator(), _floats(index), eps / 255.0) * 255.0).double()


def _undecided(index) -> torch.Tensor:
    """Pixels whose byte two fp32 implementations may legitimately disagree on: G(x) within ``ATOL`` of an
    integer level. Elsewhere the stamp is either G(x) away from an integer, or the bound x -+ eps, which both
    sides compute with the same fp32 operations from the same bytes (so they agree bit for bit)."""
    with torch.no_grad():
        g = (_trigger().generator()(_floats(index)) * 255.0).double()
    return (g - g.round()).abs() <= ATOL


def _assert_checksums(images: torch.Tensor, refs: list[dict], what: str) -> None:
    """Sum within ``SUM_ATOL`` and sum of squares within ``2 * 255 * SUM_ATOL`` (values up to 255)."""
    assert len(images) == len(refs), f"{what}: {len(images)} images, reference {len(refs)}"
    for i, (image, ref) in enumerate(zip(images, refs)):
        s, sq = float(image.sum()), float(image.pow(2).sum())
        assert abs(s - ref["sum"]) <= SUM_ATOL, f"{what}[{i}] sum: defbench {s} vs reference {ref['sum']}"
        assert abs(sq - ref["sq"]) <= 2 * 255 * SUM_ATOL, f"{what}[{i}] sum of squares: {sq} vs {ref['sq']}"


def _assert_bytes(index, reference: torch.Tensor, what: str) -> None:
    """floor(defbench's stamp) equals the reference's bytes, except for :func:`_undecided` pixels (one level)."""
    ours = _stamp(index).floor()
    diff = (ours - reference.double()).abs()
    assert int((diff > 1).sum()) == 0, f"{what}: {int((diff > 1).sum())} bytes differ by more than a level"
    bad = (diff > 0) & ~_undecided(index)
    assert not bad.any(), f"{what}: {int(bad.sum())} bytes differ from the reference's truncation"


def test_the_weight_map_pairs_every_tensor_in_order():
    """The reference's GeneratorResnet and defbench's Generator hold the same tensors in the same order."""
    ours = [k for k, v in blto.Generator(SETTINGS["ngf"], SETTINGS["blocks"]).state_dict().items()
            if v.is_floating_point()]
    assert [d for _, d in TRACE["weight_map"]] == ours
    low = [d for _, d in TRACE["weight_map_low"]]
    dropped = {k for k in ours if k.startswith(tuple(f"net.{i}." for i in range(12, 16)))}
    assert low == [k for k in ours if k not in dropped]  # dim='low': residual blocks 3-6 left out
    stored = _stored()
    assert set(stored) == set(ours)


def test_generator_output_matches_the_reference():
    with torch.no_grad():
        out = _trigger().generator()(_floats(slice(None))).double() * 255.0
    np.testing.assert_allclose(out[16].flatten().numpy(), np.array(TRACE["generator_image16"]), rtol=0, atol=ATOL,
                               err_msg="generator output, image 16")
    _assert_checksums(out, TRACE["generator_checksum"], "generator output")


def test_two_block_generator_matches_the_reference_low_variant():
    with torch.no_grad():
        out = _generator(2).eval()(_floats(slice(None))).double() * 255.0
    _assert_checksums(out, TRACE["generator_low_checksum"], "two-block generator output")


def test_eps_projection_matches_the_reference():
    """min(max(G(x), x - eps), x + eps), clamped to [0, 1], at the paper's 8/255 and at 32/255."""
    ours = _stamp(slice(None))
    np.testing.assert_allclose(ours[0].flatten().numpy(), np.array(TRACE["stamp_image0"]), rtol=0, atol=ATOL,
                               err_msg="stamp at 8/255, image 0")
    _assert_checksums(ours, TRACE["stamp_checksum"], "stamp at 8/255")
    _assert_checksums(_stamp(slice(None), 32.0), TRACE["stamp_eps32_checksum"], "stamp at 32/255")
    assert 0.0 < TRACE["interior_share"] < 1.0  # both branches of the projection occur in the trace


def _reference_poisons() -> tuple[list[int], torch.Tensor]:
    train = TRACE["train"]
    return train["poison_sources"], torch.stack([P.unhex(p["pixels"]) for p in train["poisons"]])


def _reference_test_images() -> tuple[list[int], torch.Tensor]:
    items = sorted(TRACE["test"]["images"].items(), key=lambda kv: int(kv[0]))
    return [int(k) for k, _ in items], torch.stack([P.unhex(v) for _, v in items])


def test_poisons_and_test_images_truncated_are_the_reference_bytes():
    """The PNGs the reference's training set wrote and its triggered test images, given its truncation."""
    sources, poisons = _reference_poisons()
    _assert_bytes(sources, poisons, "training poisons")
    index, images = _reference_test_images()
    _assert_bytes(index, images, "test images")


def test_as_shipped_defbench_rounds_where_the_reference_truncates():
    """defbench's uint8 stamp is the reference's byte or one above: one above exactly where rounding goes up."""
    for what, (index, reference) in {"poisons": _reference_poisons(), "test images": _reference_test_images()}.items():
        ours = _trigger().apply(P.images()[index]).double()
        diff = ours - reference.double()
        assert set(diff.unique().tolist()) <= {0.0, 1.0}, f"{what}: differences {diff.unique().tolist()}"
        value, decided = _stamp(index), ~_undecided(index)
        up = value.round() > value.floor()
        assert torch.equal((diff == 1) & decided, up & decided), f"{what}: one level up elsewhere than rounding up"
        assert bool((up & decided).any()), f"{what}: no pixel rounds up, the comparison shows nothing"


def test_defbench_keeps_every_pixel_within_eps_where_truncation_does_not():
    """Rounding keeps |x' - x| <= eps in levels; the reference's truncation puts pixels one level below x - eps
    (255 * (x - eps) lands a rounding error below the integer), the reason defbench rounds."""
    x = P.images()
    assert int((_trigger().apply(x).int() - x.int()).abs().max()) <= EPS
    index, reference = _reference_test_images()
    assert int((reference.int() - x[index].int()).min()) == -EPS - 1


def test_poisoned_set_writes_the_reference_poisons_into_its_slots():
    """defbench's poisoned set, given the reference's choice of images, holds the stamps there and nothing else."""
    sources, reference = _reference_poisons()
    images = P.images()
    slots = torch.tensor(sorted(sources))
    data = blto.poisoned_set(images, images, _trigger(), slots, torch.tensor(sources))
    diff = data[slots].double() - reference.double()
    assert set(diff.unique().tolist()) <= {0.0, 1.0}
    clean = torch.ones(len(images), dtype=torch.bool)
    clean[slots] = False
    assert torch.equal(data[clean], images[clean])


def test_poison_count_selection_and_labels_are_the_recorded_reference():
    """The reference: num_reference target-class images, removed and appended stamped (the set keeps its size),
    relabelled as a new class; every test image labelled with the target. defbench poisons round(ratio * N)."""
    train, n = TRACE["train"], len(P.images())
    assert len(train["poisons"]) == SETTINGS["num_reference"] == len(train["chosen"])
    assert set(train["chosen"]) <= set(train["labels_of_target_class"])
    assert train["file_list_before"] == train["file_list_after"] == n
    assert train["poison_idxs"] == list(range(n - SETTINGS["num_reference"], n))
    assert TRACE["test"]["targets"] == [SETTINGS["attack_target"]]
    slots, picks = blto.poison_slots(n, len(train["labels_of_target_class"]), SETTINGS["num_reference"] / n,
                                     torch.Generator().manual_seed(0))
    assert len(slots) == len(set(slots.tolist())) == len(set(picks.tolist())) == SETTINGS["num_reference"]

