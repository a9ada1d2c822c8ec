"""``bassl-sslbkd``'s poisons against UMBCvision/SSL-Backdoor's own ``generate_poison`` / ``add_watermark``
(trace in bassl-sslbkd.json).

The reference ran with the released HTBA cfg's values (alpha composite with alpha 0.00, random placement in
0.25-0.75 for the poisons and 0.10-0.90 for test images, injection rate 1.0, targeted) on a two-class folder of
the fixed images, its trigger image being defbench's own 10 x 10 HTBA pattern (the released trigger PNGs are
other patterns; defbench draws its grid from ``pattern_seed``, a difference by design). The reference places
each patch with ``random.randint``; defbench with a hash of the image's pixels (the same place for an image in
every run, docs/methods/bassl-sslbkd.md), so the test compares, exactly (uint8, no tolerance: both sides
copy the patch's pixels):

- the allowed corner range of both regions (the reference's ``loc_min_w .. loc_max_w`` rule);
- each poisoned and each test image, defbench pasting the patch at the corner the reference drew;
- which images are poisoned: every target-class image (rate 1.0), none of the other class;
- that defbench's own (hashed) corners for these images fall in the reference's ranges.
"""
from __future__ import annotations

import torch

from . import _poison_common as P
from defbench.attacks import AttackInputs, bassl
from defbench.attacks.bassl_sslbkd import HTBATrigger, SSLBackdoorConfig, poisoning_inputs

REF = P.load_trace("bassl-sslbkd")
TRACE = REF["trace"]
SIZE = 32


def _inputs(trigger, target_images=None, pretrain_images=None) -> AttackInputs:
    return AttackInputs(encoder_config=None, pretrain_images=pretrain_images, target_images=target_images,
                        trigger=trigger, pretrain_recipe=None)


def _triggers() -> dict[str, HTBATrigger]:
    """defbench's poison trigger (train region, as ``poisoning_inputs`` hands it to the poisons) and test trigger."""
    cfg = SSLBackdoorConfig(trigger_size=REF["settings"]["watermark_width"])
    test = cfg.make_trigger(SIZE)
    return {"train": poisoning_inputs(_inputs(test), cfg).trigger, "test": test}


def test_the_patch_is_the_one_the_reference_pasted():
    assert torch.equal(_triggers()["train"].pattern(), torch.from_numpy(P.inputs()["htba_patch"]))


def test_corner_ranges_match_the_reference():
    for split, trigger in _triggers().items():
        first, last = trigger.corner_range
        for entry in TRACE[split]:
            assert entry["region"] == [first, last, first, last], f"{split} image {entry['image']}"


def test_poisons_and_test_images_match_the_reference_at_its_corners():
    images = P.images()
    for split, trigger in _triggers().items():
        for entry in TRACE[split]:
            col, row = entry["location"]  # PIL's (x, y)
            ours = trigger.paste(images[entry["image"]][None], torch.tensor([row]), torch.tensor([col]))[0]
            ref = P.unhex(entry["pixels"])
            assert torch.equal(ours, ref), f"{split} image {entry['image']}: columns {P.differing_columns(ours, ref)}"


def test_every_target_image_is_poisoned_as_in_the_reference():
    images, trigger = P.images(), _triggers()["train"]
    assert TRACE["poisoned_images"] == TRACE["target_images"] and TRACE["clean_listed_images"] == TRACE["other_images"]
    inputs = _inputs(trigger, images[TRACE["target_images"]], images[TRACE["other_images"]])
    cfg = SSLBackdoorConfig()
    assert cfg.poison_fraction == TRACE["poison_injection_rate"]
    poisons = bassl.poison_set(inputs, cfg.poison_fraction, cfg.max_poison, torch.Generator().manual_seed(0))
    expected = trigger.apply(images[TRACE["target_images"]])
    assert sorted(map(_key, poisons)) == sorted(map(_key, expected))


def test_defbench_corners_lie_in_the_reference_ranges():
    images = P.images()
    for split, trigger in _triggers().items():
        first, last = trigger.corner_range
        rows, cols = trigger.corners(images[[e["image"] for e in TRACE[split]]])
        assert all(first <= int(v) <= last for v in torch.cat([rows, cols])), split


def _key(image: torch.Tensor) -> bytes:
    return image.contiguous().numpy().tobytes()
