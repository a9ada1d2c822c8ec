"""CorruptEncoder: each poison holds a reference object and the trigger within one crop-sized window,
the poisons are poison_ratio x the pre-training set, added; the same seed gives the same poisons; a bad
setting is refused in one line."""
import math

import pytest
import torch
from click.testing import CliRunner

from defbench.attacks import ATTACKS, AttackInputs, PatchTrigger
from defbench.attacks import corruptencoder as ce_module
from defbench.attacks.corruptencoder import CorruptEncoderConfig, make_poisons
from defbench.benchmark.cli import main
from defbench.benchmark.pipeline.plan import attack_stage
from defbench.benchmark.pipeline.settings import load_profile
from defbench.encoders import SimCLRConfig, build_encoder

S = 32


def _images(n, seed):
    return torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _inputs(n_pretrain=400, n_targets=30, cfg=None):
    cfg = cfg or ATTACKS.get("corruptencoder").make_config("paper")
    # references never hold the trigger's grey value, so a 255 pixel in the object strip would be a bug
    targets = _images(n_targets, 3) % 200
    return AttackInputs(build_encoder(width=8).config, _images(n_pretrain, 2), targets, cfg.make_trigger(S),
                        SimCLRConfig(epochs=1))


def _poisons(seed=0, **kw):
    cfg = CorruptEncoderConfig(**kw)
    inputs = _inputs(cfg=cfg)
    poisons, info = make_poisons(inputs, cfg, torch.Generator().manual_seed(seed))
    return inputs, cfg, poisons, info


def test_paper_defaults_are_the_reference_settings():
    cfg = ATTACKS.get("corruptencoder").make_config("paper")
    assert (cfg.poison_ratio, cfg.num_references, cfg.object_fraction) == (0.005, 3, 0.5)
    assert (cfg.object_marginal, cfg.trigger_marginal) == (0.05, 0.25)
    comp = ATTACKS.get("corruptencoder")
    assert comp.options.needs_clean_encoder is False and {"paper", "tiny", "ci"} <= set(comp.profiles)
    for profile in ("tiny", "ci"):  # nothing of the attack shrinks: its count follows the pre-training set
        assert comp.make_config(profile) == cfg


def test_poison_count_is_the_ratio_of_the_set_and_poisons_are_added(monkeypatch, ctx):
    seen = {}

    def fake_train(encoder, images, cfg, ctx, desc=""):
        seen["images"], seen["cfg"] = images, cfg
        return [0.0]
    monkeypatch.setattr(ce_module, "train_simclr", fake_train)
    comp = ATTACKS.get("corruptencoder")
    for n, ratio, expected in ((2000, 0.005, 10), (400, 0.02, 8), (32, 0.005, 1)):
        cfg = CorruptEncoderConfig(poison_ratio=ratio)
        inputs = _inputs(n_pretrain=n, cfg=cfg)
        comp.fn(inputs, cfg, ctx.reseed(0))
        data = seen["images"]
        assert seen["cfg"] is inputs.pretrain_recipe  # the victim's own recipe
        assert len(data) == n + expected and ctx.records["n_poison"] == expected
        assert torch.equal(data[:n], inputs.pretrain_images)  # the clean set is untouched; poisons are added
        assert ctx.records["poison_ratio"] == pytest.approx(expected / (n + expected))


def test_each_poison_holds_a_reference_object_strip_and_the_trigger_on_the_other_side():
    inputs, cfg, poisons, info = _poisons(seed=1, poison_ratio=0.1)
    assert len(poisons) == 40 and len(info["reference_indices"]) == cfg.num_references
    w, t = 16, inputs.trigger.size
    sides = set()
    for img, ref, where in zip(poisons, info["references_used"], info["layouts"]):
        assert ref in info["reference_indices"]
        o_x, t_x, t_y = where["object_x"], where["trigger_x"], where["trigger_y"]
        strip = inputs.target_images[ref, :, :, info["strip_x"]:info["strip_x"] + w]
        assert torch.equal(img[:, :, o_x:o_x + w], strip)  # the object, exactly, full height
        assert (img[:, t_y:t_y + t, t_x:t_x + t] == 255).all()  # the whole trigger
        assert (img == 255).all(0).sum() >= t * t
        assert t_x >= o_x + w or t_x + t <= o_x  # trigger and object do not overlap
        # the reference's layout: the object at an edge (within object_marginal; positions are floored to
        # whole pixels as the reference's int() does), the trigger in the rest
        assert o_x <= cfg.object_marginal * S or o_x + w >= S - cfg.object_marginal * S - 1
        assert cfg.trigger_marginal * S <= t_y + 1 and t_y + t <= S - cfg.trigger_marginal * S + 1
        sides.add(where["object_left"])
    assert sides == {True, False}  # both left-right and right-left layouts


def _window_holds(where, t, w, side, object_share):
    """Is there a side x side window with the whole trigger and object_share of the object's pixels?"""
    o_x, t_x, t_y = where["object_x"], where["trigger_x"], where["trigger_y"]
    for y0 in range(S - side + 1):
        for x0 in range(S - side + 1):
            if not (x0 <= t_x and t_x + t <= x0 + side and y0 <= t_y and t_y + t <= y0 + side):
                continue
            cols = max(0, min(x0 + side, o_x + w) - max(x0, o_x))
            if cols * side >= object_share * w * S:
                return True
    return False


def test_object_and_trigger_fall_within_one_crop_sized_window():
    """A window of half the image's area (the middle of the victim's crop scales, 0.08..1) holds the whole
    trigger and at least a third of the object in every poison; a victim's random crop often does too."""
    inputs, cfg, poisons, info = _poisons(seed=2, poison_ratio=0.1)
    side = round(S * math.sqrt(0.5))
    assert all(_window_holds(where, inputs.trigger.size, 16, side, 1 / 3) for where in info["layouts"])
    # the victim's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) boxes, clipped as encoders/augment.py does
    g = torch.Generator().manual_seed(0)
    k = 4000
    area = 0.08 + 0.92 * torch.rand(k, generator=g)
    aspect = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(k, generator=g))
    cw, ch = (torch.sqrt(area * aspect).clamp(max=1) * S), (torch.sqrt(area / aspect).clamp(max=1) * S)
    cx0, cy0 = torch.rand(k, generator=g) * (S - cw), torch.rand(k, generator=g) * (S - ch)
    t = inputs.trigger.size
    both = []
    for where in info["layouts"]:
        o_x, t_x, t_y = where["object_x"], where["trigger_x"], where["trigger_y"]
        has_trigger = (cx0 <= t_x) & (cx0 + cw >= t_x + t) & (cy0 <= t_y) & (cy0 + ch >= t_y + t)
        object_cols = (torch.minimum(cx0 + cw, torch.tensor(o_x + 16.0)) - torch.maximum(cx0, torch.tensor(float(o_x))))
        has_object = object_cols.clamp(min=0) * ch >= 0.25 * 16 * S
        both.append((has_trigger & has_object).float().mean().item())
    assert min(both) > 0.2, both  # measured: 0.31 to 0.35 of the victim's crops hold both


def test_same_seed_same_poisons_other_seed_other_poisons():
    _, _, a, info_a = _poisons(seed=5)
    _, _, b, info_b = _poisons(seed=5)
    _, _, c, _ = _poisons(seed=6)
    assert torch.equal(a, b) and info_a == info_b
    assert not torch.equal(a, c)


def test_plan_has_no_clean_encoder_dependency():
    stage = attack_stage(load_profile("ci"), "corruptencoder", "synth-cifar10", "synth-stl10")
    assert stage.deps == ()
    assert stage.spec["target"] == 9


def test_a_non_patch_trigger_is_refused():
    cfg = CorruptEncoderConfig()
    inputs = _inputs(cfg=cfg)
    inputs.trigger = object()
    with pytest.raises(ValueError, match="patch trigger"):
        make_poisons(inputs, cfg, torch.Generator())
    assert isinstance(_inputs().trigger, PatchTrigger)


@pytest.mark.parametrize("setting, fragment", [
    ("attack.corruptencoder.poison_ratio=0", "poison_ratio must be above 0"),
    ("attack.corruptencoder.poison_ratio=1.5", "between 0 and 1"),
    ("attack.corruptencoder.num_references=0", "num_references must be 1 or more"),
    ("attack.corruptencoder.object_fraction=1", "object_fraction must be in (0, 1)"),
    ("attack.corruptencoder.object_marginal=0.7", "object_marginal must be in [0, 0.5)"),
    ("attack.corruptencoder.trigger_marginal=-0.1", "trigger_marginal must be in [0, 0.5)"),
    ("attack.trigger_size=20", "does not fit the 16-pixel side"),
])
def test_a_bad_setting_is_refused_in_one_line(setting, fragment):
    result = CliRunner().invoke(main, ["config", "--profile", "ci", "--attack", "corruptencoder", "--set", setting])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit)
    assert len(lines) == 1 and lines[0].startswith("defbench: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
