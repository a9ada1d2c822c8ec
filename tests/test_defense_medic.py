"""MEDIC: a random-init student cloned from an untouched teacher, hooks registered once and removed."""
from __future__ import annotations

import torch

from defbench.defenses import get_defense
from defbench.defenses import medic as medic_module
from defbench.encoders import Encoder, build_encoder, frozen_copy, load_encoder, save_encoder


def _no_hooks(encoder) -> bool:
    return all(not m._forward_hooks for m in encoder.modules())


def test_importance_is_a_per_sample_distribution():
    torch.manual_seed(0)
    h, g = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    mu, sigma = torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1)
    w = medic_module.importance(h, g, mu, sigma, 5.0)
    assert w.shape == h.shape and (w > 0).all()
    total = w.flatten(1).sum(1)
    assert (total <= 1 + 1e-6).all()  # sqrt(a*b) <= (a+b)/2: at most a distribution's mass
    # where both factors agree, the weight is the softmax itself
    same = medic_module.importance(h, h, mu, sigma, 5.0)
    assert torch.allclose(same.flatten(1).sum(1), torch.ones(3), atol=1e-5)


def test_taps_hook_every_conv_once_and_collect_only_when_asked():
    encoder = build_encoder(width=8).eval()
    modules = medic_module._hooked_modules(encoder, "conv")
    assert len(modules) == 20  # conv1 + 16 block convs + 3 shortcut convs
    tap = medic_module.ActivationTap(modules)
    x = torch.rand(2, 3, 32, 32)
    encoder.features(x)
    assert tap.outputs == []
    for _ in range(2):  # the same hooks serve every batch
        acts, feature = medic_module.activations(encoder, x, "conv", tap)
        assert len(acts) == 20 and acts[0].shape == (2, 8, 32, 32) and feature.shape == (2, 64)
    assert sum(len(m._forward_hooks) for m in encoder.modules()) == 20
    tap.remove()
    assert _no_hooks(encoder)
    acts, _ = medic_module.activations(encoder, x, "stages", None)
    assert [a.shape[1] for a in acts] == [8, 16, 32, 64]


def test_student_starts_random_and_the_teacher_is_untouched(backdoored, clean_data, ctx, tmp_path):
    suspect = backdoored[0]
    snapshot = {k: v.clone() for k, v in suspect.state_dict().items()}
    component = get_defense("medic")
    # epochs=0: the returned student is exactly the fresh model MEDIC starts from
    start = component.fn(suspect, clean_data, component.make_config("ci", {"epochs": 0}), ctx)
    assert start is not suspect and type(start) is Encoder
    differs = [k for k, v in start.state_dict().items()
               if v.is_floating_point() and "running" not in k and not torch.equal(v, snapshot[k])]
    weights = [k for k, v in snapshot.items() if k.endswith(".weight") and v.ndim >= 2]
    assert set(weights) <= set(differs)  # every conv/linear weight is a fresh random draw

    cfg = component.make_config("ci", {"epochs": 1, "stat_batches": 2})
    student = component.fn(suspect, clean_data, cfg, ctx)
    assert type(student) is Encoder and not student.training and student is not suspect
    for key, value in suspect.state_dict().items():  # the teacher (the suspect itself) never changed
        assert torch.equal(value, snapshot[key]), key
    assert _no_hooks(suspect) and _no_hooks(student)
    assert ctx.records["medic_n_hooked"] == 20 and len(ctx.records["medic_clone"]) == 1
    save_encoder(student, tmp_path / "medic.pt")
    loaded = load_encoder(tmp_path / "medic.pt")
    for name, value in student.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_clone_loss_vanishes_for_a_perfect_copy_and_teacher_gets_no_parameter_gradients(ctx):
    torch.manual_seed(0)
    teacher = frozen_copy(build_encoder(width=8))
    student = teacher.clone()
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()  # same BN behaviour as the teacher: identical activations
    cfg = get_defense("medic").make_config("ci", {"layers": "bn"})
    taps = tuple(medic_module.ActivationTap(medic_module._hooked_modules(m, "bn")) for m in (teacher, student))
    views = torch.rand(8, 3, 32, 32)
    stats = [(torch.zeros(1, m.num_features, 1, 1), torch.ones(1, m.num_features, 1, 1))
             for m in medic_module._hooked_modules(teacher, "bn")]
    total, task, clone, feature = medic_module.medic_step_losses(student, teacher, views, stats, cfg, taps)
    assert clone.item() < 1e-10 and feature.item() < 1e-5
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
