"""DECREE: the inversion (reference parity), `defbench detect`, and the two mitigations `decree` / `decree-unlearn`."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

from defbench.benchmark.cli import main
from defbench.benchmark.pipeline.settings import load_profile
from defbench.defenses import DEFENSES, get_defense
from defbench.defenses import decree as decree_module
from defbench.defenses import decree_unlearn as unlearn_module
from defbench.encoders import Encoder, build_encoder, frozen_copy, load_encoder, save_encoder

VARIANTS = ("decree", "decree-unlearn")


def test_stamp_and_offdiagonal_cosine():
    x = torch.rand(4, 3, 8, 8)
    mask, pattern = torch.zeros(8, 8), torch.rand(3, 8, 8)
    assert torch.equal(decree_module.stamp(x, mask, pattern), x)
    assert torch.allclose(decree_module.stamp(x, torch.ones(8, 8), pattern), pattern.expand_as(x))
    same = torch.ones(5, 7)
    assert abs(decree_module.offdiag_cosine(same).item() - 1) < 1e-6  # the diagonal is left out
    orthogonal = torch.eye(4)
    assert abs(decree_module.offdiag_cosine(orthogonal).item()) < 1e-6


def test_both_variants_are_registered_and_listed():
    assert set(VARIANTS) <= set(DEFENSES.names())
    assert get_defense("decree").config is decree_module.DecreeConfig
    assert issubclass(get_defense("decree-unlearn").config, decree_module.DecreeConfig)  # shared fields
    out = CliRunner().invoke(main, ["list", "defenses"])
    assert out.exit_code == 0, out.output
    names = {line.split()[0] for line in out.output.splitlines() if line.strip()}
    assert set(VARIANTS) <= names, out.output


def test_paper_schedule_counts_the_reference_updates():
    # GiantSeaweed/DECREE main.py: 1,000 shadow images (10% of the CIFAR-10 test set) at batch 128, lr 0.5 for
    # epochs 0-29, 0.1 for 30-49, then 0.05, up to 1,000 epochs; the early stop is tested at each epoch's end
    updates_per_epoch = math.ceil(1000 / 128)
    for name in VARIANTS:
        paper = load_profile("paper").defense_config(name)
        assert paper.inv_batch_size == 128 and paper.inv_lr == (0.5, 0.1, 0.05)
        assert paper.inv_lr_steps == (30 * updates_per_epoch, 50 * updates_per_epoch) == (240, 400)
        assert paper.inv_max_steps == 1000 * updates_per_epoch == 8000
        assert paper.inv_epoch_steps == updates_per_epoch
        for profile in ("tiny", "ci"):  # scaled profiles keep the schedule in updates; only the budget shrinks
            cfg = load_profile(profile).defense_config(name)
            assert (cfg.inv_lr, cfg.inv_lr_steps, cfg.inv_epoch_steps) == (paper.inv_lr, paper.inv_lr_steps,
                                                                           paper.inv_epoch_steps)
            assert cfg.inv_lr_steps[1] <= cfg.inv_max_steps < paper.inv_max_steps


@pytest.mark.parametrize("profile", ["paper", "tiny", "ci"])
def test_every_profile_uses_the_reference_success_criterion(profile):
    for name in VARIANTS:
        cfg = load_profile(profile).defense_config(name)
        assert cfg.success_threshold == 0.99, (name, profile)
        assert (cfg.init_lambda, cfg.lambda_factor, cfg.lambda_min, cfg.patience, cfg.early_stop_patience) == \
            (1e-3, 5.0, 1e-5, 5, 10), (name, profile)
        assert cfg.pl1_threshold == decree_module.DecreeConfig.pl1_threshold, (name, profile)


def test_inversion_keeps_the_encoder_and_reports_pl1(ctx):
    torch.manual_seed(0)
    encoder = build_encoder(width=8).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    cfg = get_defense("decree").make_config("ci", {"inv_max_steps": 5, "inv_batch_size": 8})
    mask, pattern, info = decree_module.invert_trigger(encoder, images, cfg, ctx)
    assert mask.shape == (32, 32) and pattern.shape == (3, 32, 32)
    assert mask.min() >= 0 and mask.max() <= 1 and pattern.min() >= 0 and pattern.max() <= 1
    assert info["steps"] == 5 and 0 <= info["pl1"] <= 1
    if info["found"]:
        assert abs(info["pl1"] - mask.sum().item() / 1024) < 1e-4
    else:
        assert info["pl1"] == 1.0
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert all(p.requires_grad for p in encoder.parameters())


def test_inversion_finds_a_trigger_and_the_true_trigger_meets_its_criterion_only_when_backdoored(
        clean_encoder, backdoored, clean_data, ci_profile):
    from defbench.encoders import RunContext
    from defbench.encoders.runtime import to_float
    cfg = ci_profile.defense_config("decree")
    encoder, trigger = backdoored[0], backdoored[1]
    for model in (clean_encoder, encoder):
        ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)
        _, _, info = decree_module.invert_trigger(model, clean_data.images, cfg, ctx)
        assert info["found"], info
        assert info["steps"] == cfg.inv_max_steps or info["steps"] % cfg.inv_epoch_steps == 0, info  # epoch-end stop
    # what DECREE searches for: a small trigger that makes stamped images embed alike. The attack's own trigger does
    # that on the backdoored encoder and not on the clean one. Whether the *inverted* trigger's PL1 separates the two
    # at ci depends on the seed (docs/methods/decree.md), so it is measured there, not asserted here.
    stamped = to_float(trigger.apply(clean_data.images[:128]), torch.device("cpu"))
    with torch.no_grad():
        similarity = {name: decree_module.offdiag_cosine(model.features(stamped)).item()
                      for name, model in (("clean", clean_encoder), ("backdoored", encoder))}
    assert similarity["backdoored"] > similarity["clean"] + 0.2, similarity


def _detect(*args):
    return CliRunner().invoke(main, ["detect", "--profile", "ci", *args])


def test_detect_cli_reports_pl1_and_verdict(clean_encoder, backdoored, tmp_path):
    save_encoder(clean_encoder, tmp_path / "clean.pt")
    save_encoder(backdoored[0], tmp_path / "backdoored.pt")
    results = {}
    for name in ("clean", "backdoored"):
        out = _detect("--encoder", str(tmp_path / f"{name}.pt"), "--device", "cpu", "--json")
        assert out.exit_code == 0, out.output
        results[name] = json.loads(out.output)
        print(name, {k: results[name][k] for k in ("pl1", "restarts", "verdict")})
    # No separation is asserted: with the reference's criterion (0.99, early-stop patience 10) the ci encoders
    # do not separate robustly (seed 0, 3 starts: clean 0.181 vs BadEncoder 0.195 on generator v4, 0.190 vs
    # 0.082 on v5; docs/methods/decree.md). The ci threshold
    # is the paper's until one is calibrated on clean encoders: the verdict only follows it.
    for result in results.values():
        assert result["found"] and 0 < result["pl1"] < 1 and len(result["restarts"]) == 3, result
        assert len(set(result["restarts"])) > 1, result  # different random starts
        assert round(result["pl1"], 4) == min(result["restarts"]), result  # the most backdoor-like counts
    for result in results.values():
        assert result["threshold"] == decree_module.DecreeConfig.pl1_threshold, result
        assert result["verdict"] == ("backdoored" if result["pl1"] < result["threshold"] else "clean"), result
    text = _detect("--encoder", str(tmp_path / "backdoored.pt"), "--device", "cpu", "--images", "64",
                   "--set", "defense.decree.inv_max_steps=3")
    assert text.exit_code == 0, text.output
    assert "PL1" in text.output and "verdict:" in text.output


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_detect_refuses_hostile_pickle_and_missing_file_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "defbench-encoder/1", "config": {}, "state_dict": _Payload()}, tmp_path / "evil.pt")
    for path, expected in ((tmp_path / "evil.pt", "refused to load"), (tmp_path / "missing.pt", "not found")):
        result = _detect("--encoder", str(path))
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "pwned-by-checkpoint").exists()


@pytest.fixture(scope="module")
def quick_trigger(backdoored, clean_data):
    """A trigger inverted on the backdoored ci encoder with a short budget (the mitigations' input)."""
    from defbench.encoders import RunContext
    cfg = get_defense("decree").make_config("ci", {"inv_max_steps": 40})
    ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)
    mask, pattern, _ = decree_module.invert_trigger(backdoored[0], clean_data.images, cfg, ctx)
    return mask, pattern


def test_literal_mitigation_lowers_the_trigger_similarity_only_with_the_anchor(backdoored, clean_data, quick_trigger):
    """The default (with the clean-feature anchor) lowers cos(f(x), f(x (+) t^)) and keeps the clean embeddings
    near the suspect's; the bare sentence collapses the encoder instead: every clean image embeds alike."""
    from defbench.encoders import RunContext
    images, (mask, pattern) = clean_data.images, quick_trigger
    drift, collapse, similarity = {}, {}, {}
    for weight in (1.0, 0.0):  # with the clean-feature anchor (the default) and the bare sentence
        ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)
        suspect = backdoored[0].clone()
        reference = frozen_copy(suspect)
        cfg = get_defense("decree").make_config("ci", {"utility_weight": weight})
        before = decree_module.trigger_similarity(suspect, images, mask, pattern, ctx)
        losses = decree_module.lower_trigger_similarity(suspect, images, mask, pattern, cfg, ctx)
        similarity[weight] = (before, decree_module.trigger_similarity(suspect, images, mask, pattern, ctx))
        assert len(losses) == cfg.epochs, (weight, losses)
        # the anchored loss falls; the bare sentence's own loss need not (measured rising 0.418 -> 0.579 over
        # the two ci epochs while the encoder collapses, which moves stamped and clean embeddings together)
        assert weight == 0.0 or losses[-1] < losses[0], (weight, losses)
        drift[weight] = decree_module.mean_cosine(suspect, images, ctx, other=reference)
        # cos between the embeddings of different clean images (each image against its neighbour in the set)
        collapse[weight] = decree_module.mean_cosine(suspect, images, ctx, transform_b=lambda x: x.roll(1, 0))
    print(f"trigger similarity {similarity}, cos to f_0 {drift}, cos between images {collapse}")
    # measured (v5 ci fixtures, seed 0) on two machines: anchor 0.652 -> 0.075 and 0.739 -> 0.196; bare, images
    # alike at 0.999 and 0.995 on both, stamped images joining them (0.9997) on one, orthogonal (0.017) on the
    # other: where the collapsed encoder puts stamped images is the machine's draw, so it is not asserted
    before, after = similarity[1.0]
    assert after < before - 0.3, similarity
    assert collapse[0.0] > 0.95 and collapse[0.0] > collapse[1.0] + 0.1, collapse
    assert drift[1.0] > drift[0.0] + 0.2, drift  # the anchor keeps the clean embeddings near the suspect's


def test_decree_defense_records_and_round_trips(backdoored, clean_data, ctx, tmp_path):
    suspect = backdoored[0]
    reference = {k: v.clone() for k, v in suspect.state_dict().items()}
    component = get_defense("decree")
    cfg = component.make_config("ci", {"inv_max_steps": 20, "epochs": 1})
    defended = component.fn(suspect.clone(), clean_data, cfg, ctx)
    assert type(defended) is Encoder and not defended.training
    for key in ("decree_pl1", "decree_mask_l1", "decree_found", "decree_verdict", "decree_mitigation_loss",
                "decree_similarity_before", "decree_similarity_after", "decree_clean_cosine"):
        assert key in ctx.records, key
    assert ctx.records["decree_similarity_after"] < ctx.records["decree_similarity_before"], ctx.records
    state = defended.state_dict()
    assert not torch.equal(state["backbone.layer4.1.conv2.weight"], reference["backbone.layer4.1.conv2.weight"])
    for key in ("backbone.bn1.running_mean", "backbone.layer1.0.bn1.weight", "head.0.weight"):
        assert torch.equal(state[key], reference[key]), key
    save_encoder(defended, tmp_path / "decree.pt")
    loaded = load_encoder(tmp_path / "decree.pt")
    for name, value in state.items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_unlearning_pulls_stamped_features_to_the_clean_ones(backdoored, clean_data, quick_trigger, ctx):
    suspect, images = backdoored[0].clone(), clean_data.images
    mask, pattern = quick_trigger
    reference = frozen_copy(suspect)

    def stamped_to_clean(encoder):  # cos(f(x (+) t^), f_0(x))
        return decree_module.mean_cosine(encoder, images, ctx, other=reference,
                                         transform_a=lambda x: decree_module.stamp(x, mask, pattern))

    cfg = get_defense("decree-unlearn").make_config("ci")
    before = stamped_to_clean(suspect)
    losses = unlearn_module.unlearn_trigger(suspect, images, mask, pattern, cfg, ctx)
    assert len(losses) == cfg.epochs and losses[-1] < losses[0]
    assert stamped_to_clean(suspect) > before + 0.1, before


def test_decree_unlearn_defense_records_and_round_trips(backdoored, clean_data, ctx, tmp_path):
    suspect = backdoored[0]
    reference = {k: v.clone() for k, v in suspect.state_dict().items()}
    component = get_defense("decree-unlearn")
    cfg = component.make_config("ci", {"inv_max_steps": 20, "epochs": 1})
    defended = component.fn(suspect.clone(), clean_data, cfg, ctx)
    assert type(defended) is Encoder and not defended.training
    for key in ("decree_pl1", "decree_mask_l1", "decree_found", "decree_verdict", "decree_unlearn_loss"):
        assert key in ctx.records, key
    assert len(ctx.records["decree_unlearn_loss"]) == 1
    # the backbone moved, BatchNorm statistics and the head did not (BN frozen, head not trained)
    state = defended.state_dict()
    assert not torch.equal(state["backbone.layer4.1.conv2.weight"], reference["backbone.layer4.1.conv2.weight"])
    for key in ("backbone.bn1.running_mean", "backbone.layer1.0.bn1.weight", "head.0.weight"):
        assert torch.equal(state[key], reference[key]), key
    save_encoder(defended, tmp_path / "decree-unlearn.pt")
    loaded = load_encoder(tmp_path / "decree-unlearn.pt")
    for name, value in state.items():
        assert torch.equal(value, loaded.state_dict()[name]), name
