"""NAD: the attention loss falls during distillation, the frozen teacher is never updated, and teacher and
student train with NAD's optimiser and lr schedule (0.1, then 0.01 after lr_drop_epoch epochs) at every profile."""
from __future__ import annotations

import pytest
import torch

from defbench.defenses import CleanData, get_defense
from defbench.defenses import nad as nad_module
from defbench.encoders import Encoder, build_encoder, load_encoder, save_encoder


def test_nad_distillation_reduces_attention_loss_and_leaves_teacher_alone(backdoored, clean_data, ctx):
    suspect = backdoored[0]
    cfg = get_defense("nad").make_config("ci")
    teacher = nad_module.make_teacher(suspect, clean_data, cfg, ctx)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}  # weights and BN statistics

    student = suspect.clone()
    probe = clean_data.images[:256]
    at_before = nad_module.attention_distance(student, teacher, probe, cfg, ctx.device)
    history = nad_module.distill(student, teacher, clean_data, cfg, ctx)
    at_after = nad_module.attention_distance(student, teacher, probe, cfg, ctx.device)

    assert at_after < at_before
    assert len(history["at"]) == cfg.epochs and history["at"][-1] < history["at"][0]
    assert all(len(history[f"at_{s}"]) == cfg.epochs for s in cfg.at_stages)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before_teacher[key]), f"teacher changed: {key}"
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), suspect.state_dict().values()))


def test_nad_defense_returns_plain_encoder_that_round_trips(backdoored, clean_data, ctx, tmp_path):
    suspect = backdoored[0]
    component = get_defense("nad")
    cfg = component.make_config("ci", {"teacher_epochs": 1, "epochs": 1})
    defended = component.fn(suspect.clone(), clean_data, cfg, ctx)
    assert type(defended) is Encoder
    assert len(ctx.records["nad_at_loss"]) == 1 and "nad_teacher_loss" in ctx.records
    save_encoder(defended, tmp_path / "nad.pt")
    loaded = load_encoder(tmp_path / "nad.pt")
    for name, value in defended.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_nad_rejects_mismatched_stage_weights(backdoored, clean_data, ctx):
    cfg = get_defense("nad").make_config("ci", {"at_stages": ["layer3", "layer4"]})
    try:
        get_defense("nad").fn(backdoored[0].clone(), clean_data, cfg, ctx)
    except ValueError as err:
        assert "betas" in str(err)
    else:
        raise AssertionError("mismatched at_stages/betas was accepted")


@pytest.mark.parametrize("profile", ["paper", "tiny", "ci"])
def test_nad_optimizer_follows_the_reference_schedule_at_every_profile(profile, ctx, monkeypatch):
    cfg = get_defense("nad").make_config(profile)
    assert (cfg.lr, cfg.lr_after, cfg.lr_drop_epoch) == (0.1, 0.01, 2)
    assert (cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.nesterov) == (64, 0.9, 1e-4, True)
    assert cfg.epochs > cfg.lr_drop_epoch and cfg.teacher_epochs > cfg.lr_drop_epoch  # both phases run
    # the real loop, shortened to the schedule's two phases on a small encoder and set
    short = get_defense("nad").make_config(profile, {"teacher_epochs": 3, "epochs": 3, "batch_size": 16})
    clean = CleanData((torch.rand(40, 3, 32, 32) * 255).to(torch.uint8))  # 2 steps per epoch
    runs = []
    make = nad_module.make_optimizer

    def spy(model, c):
        opt = make(model, c)
        group = opt.param_groups[0]
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, True)
        lrs, step = [], opt.step
        runs.append(lrs)

        def recording_step(*args, **kwargs):
            lrs.append(group["lr"])
            return step(*args, **kwargs)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(nad_module, "make_optimizer", spy)
    defended = nad_module.nad(build_encoder(width=8), clean, short, ctx)
    assert type(defended) is Encoder
    assert len(runs) == 2  # the teacher's fine-tuning, then the student's distillation
    for lrs in runs:
        assert lrs == [0.1] * 4 + [0.01] * 2
    assert ctx.records["nad_lr"] == [0.1, 0.1, 0.01]
    assert len(ctx.records["nad_teacher_loss"]) == 3
