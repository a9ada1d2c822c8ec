"""CTRL: the frequency trigger (faint, exactly the chosen DCT coefficients) and the clean-label poisoning."""
import json

import numpy as np
import pytest
import scipy.fft
import torch

from defbench.attacks import ATTACKS, TRIGGER_TYPES, AttackInputs, trigger_from_description
from defbench.attacks import ctrl as ctrl_module
from defbench.attacks.ctrl import CTRLConfig, CTRLTrigger, dct2, dct_matrix, idct2, rgb_to_yuv, yuv_to_rgb
from defbench.benchmark.pipeline.plan import attack_stage
from defbench.benchmark.pipeline.settings import load_profile
from defbench.encoders import SimCLRConfig, build_encoder


def _mid_grey(n=4, seed=0):
    """Float images well inside (0, 1), so the clamp never acts."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, 3, 32, 32, generator=g)


def test_dct_is_the_orthonormal_dct_ii():
    d = dct_matrix(32)
    assert torch.allclose(d @ d.t(), torch.eye(32), atol=1e-6)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert np.allclose(dct2(x).numpy(), ref, atol=1e-10)
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-10)
    assert torch.allclose(yuv_to_rgb(rgb_to_yuv(x)), x, atol=1e-10)


def test_trigger_changes_exactly_the_chosen_coefficients_of_u_and_v():
    t = CTRLConfig().make_trigger(32)
    assert t.positions == ((15, 15), (31, 31)) and t.channels == (1, 2) and t.magnitude == 100
    x = _mid_grey()
    y = t.apply(x)
    delta = dct2(rgb_to_yuv(y.double() * 255)) - dct2(rgb_to_yuv(x.double() * 255))
    expected = torch.zeros_like(delta)
    for ch in (1, 2):
        for r, c in ((15, 15), (31, 31)):
            expected[:, ch, r, c] = 100.0
    assert torch.allclose(delta, expected, atol=1e-2), (delta - expected).abs().max()


def test_trigger_is_nearly_invisible():
    x = _mid_grey(8)
    change = (CTRLTrigger().apply(x) - x).abs() * 255
    assert change.max() < 25 and change.mean() < 8  # pixel units: the patch trigger changes 100 pixels by ~128
    assert (CTRLTrigger(magnitude=50).apply(x) - x).abs().max() * 255 < 13  # linear in the magnitude


def test_uint8_and_float_inputs_get_the_same_stamp():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    before = images.clone()
    t = CTRLTrigger()
    out = t.apply(images)
    assert out.dtype == torch.uint8 and torch.equal(images, before)  # the input is not modified
    as_float = t.apply(images.float() / 255) * 255
    assert (out.float() - as_float).abs().max() <= 0.5 + 1e-3  # rounding only
    assert (out.float() - images.float()).abs().max() <= 25
    assert out.min() >= 0 and out.max() <= 255


def test_positions_scale_with_the_image_size_and_are_checked():
    assert CTRLConfig().make_trigger(64).positions == ((31, 31), (63, 63))
    assert CTRLConfig().make_trigger(16).positions == ((7, 7), (15, 15))
    assert CTRLConfig(positions=((3, 5),)).make_trigger(32).positions == ((3, 5),)
    t64 = CTRLConfig().make_trigger(64)
    assert t64.apply(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="positions"):
        CTRLTrigger(positions=((15, 32),))
    with pytest.raises(ValueError, match="channels"):
        CTRLTrigger(channels=(3,))
    with pytest.raises(ValueError, match="32px"):
        CTRLTrigger().apply(torch.zeros(1, 3, 64, 64))


def test_description_round_trip_through_json():
    t = CTRLTrigger(magnitude=60, positions=((7, 9), (31, 31)), channels=(2,), image_size=32)
    d = json.loads(json.dumps(t.describe()))
    assert d["type"] == "ctrl" and TRIGGER_TYPES.get("ctrl") is CTRLTrigger
    back = trigger_from_description(d)
    assert back == t and hash(back) == hash(t)
    x = _mid_grey(2)
    assert torch.equal(back.apply(x), t.apply(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trigger_runs_on_the_gpu():
    x = _mid_grey(2)
    t = CTRLTrigger()
    assert torch.allclose(t.apply(x.cuda()).cpu(), t.apply(x), atol=1e-5)


def test_poisons_replace_one_percent_with_stamped_target_images(monkeypatch, ctx):
    seen = {}

    def fake_train(encoder, images, cfg, ctx, desc=""):
        seen["images"], seen["cfg"] = images, cfg
        return [0.0]
    monkeypatch.setattr(ctrl_module, "train_simclr", fake_train)
    pretrain = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    comp = ATTACKS.get("ctrl")
    cfg = comp.make_config("paper")
    trigger = cfg.make_trigger(32)
    recipe = SimCLRConfig(epochs=1)
    inputs = AttackInputs(build_encoder(width=8).config, pretrain, targets, trigger, recipe)
    comp.fn(inputs, cfg, ctx)
    data = seen["images"]
    assert seen["cfg"] is recipe  # the victim's own recipe
    assert len(data) == 400 and ctx.records["n_poison"] == 4 and ctx.records["poison_ratio"] == 0.01
    slots = torch.tensor(ctx.records["poison_indices"])
    keep = torch.ones(400, dtype=torch.bool)
    keep[slots] = False
    assert torch.equal(data[keep], pretrain[keep])
    stamped = trigger.apply(targets)
    assert all(any(torch.equal(p, q) for q in stamped) for p in data[slots])  # every poison is a stamped target
    assert ctx.records["trigger_pixel_change"]["max"] <= 25
    assert comp.options.needs_clean_encoder is False
    assert {"paper", "tiny", "ci"} <= set(comp.profiles)


def test_plan_has_no_clean_encoder_dependency_and_overrides_reach_the_trigger():
    profile = load_profile("ci", {"attack.ctrl.magnitude": 50, "attack.ctrl.positions": [[7, 7], [31, 31]]})
    stage = attack_stage(profile, "ctrl", "synth-cifar10", "synth-stl10")
    assert stage.deps == ()
    trigger = trigger_from_description(stage.spec["trigger"])
    assert isinstance(trigger, CTRLTrigger) and trigger.magnitude == 50
    assert trigger.positions == ((7, 7), (31, 31))
    assert stage.spec["target"] == 9
