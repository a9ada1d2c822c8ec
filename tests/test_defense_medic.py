"""MEDIC: a random-init student cloned from an untouched teacher, hooks registered once and removed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def test_taps_hook_the_main_path_once_and_collect_only_when_asked():
    encoder = build_encoder(width=8).eval()
    # the reference hooks no shortcut conv: conv1 + 16 block convs (the 3 downsample convs are left out)
    conv = medic_module.hook_sites(encoder, "conv")
    assert len(conv) == 17 and all(source is None for _, source in conv)
    names = {m: n for n, m in encoder.backbone.named_modules()}
    assert not any("downsample" in names[m] for m, _ in conv)
    sites = medic_module.hook_sites(encoder, "conv+bn")  # the paper default: conv and BN outputs, 17 + 17
    assert len(sites) == 34
    # BN sites compare where the reference's in-place ops leave them: stem bn1 -> ReLU -> input of layer1[0],
    # a block's bn1 -> ReLU -> input of its conv2, a block's bn2 -> += identity -> ReLU -> the block's output
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert {(names[m], names[s[0]], s[1]) for m, s in sites if s is not None} == \
        {("bn1", "layer1.0", "input")} | {(f"{b}.bn1", f"{b}.conv2", "input") for b in blocks} | \
        {(f"{b}.bn2", b, "output") for b in blocks}
    tap = medic_module.ActivationTap(sites)
    x = torch.rand(2, 3, 32, 32)
    encoder.features(x)
    assert all(t is None for t in tap.stat)
    for _ in range(2):  # the same hooks serve every batch
        stat, value, feature = medic_module.activations(encoder, x, "conv+bn", tap)
        assert len(stat) == len(value) == 34 and stat[0].shape == (2, 8, 32, 32) and feature.shape == (2, 64)
        for (module, source), h, v in zip(sites, stat, value):
            if source is None:
                assert v is h
            elif source[1] == "input":
                assert torch.equal(v, torch.relu(h)) and (h < 0).any()
            else:  # the block output relu(bn2 + shortcut): not relu(bn2) alone
                assert v.shape == h.shape and (v >= 0).all() and not torch.equal(v, torch.relu(h))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in encoder.modules()) == 34 + 9 + 8
    tap.remove()
    assert _no_hooks(encoder) and all(not m._forward_pre_hooks for m in encoder.modules())
    no_relu = medic_module.hook_sites(encoder, "conv+bn", bn_after_relu=False)
    assert len(no_relu) == 34 and all(c is None for _, c in no_relu)
    stat, value, _ = medic_module.activations(encoder, x, "stages", None)
    assert [a.shape[1] for a in stat] == [8, 16, 32, 64] and all(a is b for a, b in zip(stat, value))


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
    assert ctx.records["medic_n_hooked"] == 34 and len(ctx.records["medic_clone"]) == 1
    assert ctx.records["medic_layers"] == "conv+bn"
    save_encoder(student, tmp_path / "medic.pt")
    loaded = load_encoder(tmp_path / "medic.pt")
    for name, value in student.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


@pytest.mark.parametrize("layers", ["bn", "conv+bn"])
def test_clone_loss_vanishes_for_a_perfect_copy_and_teacher_gets_no_parameter_gradients(ctx, layers):
    torch.manual_seed(0)
    teacher = frozen_copy(build_encoder(width=8))
    student = teacher.clone()
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()  # same BN behaviour as the teacher: identical activations
    cfg = get_defense("medic").make_config("ci", {"layers": layers})
    sites = medic_module.hook_sites(teacher, layers)
    taps = tuple(medic_module.ActivationTap(medic_module.hook_sites(m, layers)) for m in (teacher, student))
    views = torch.rand(8, 3, 32, 32)
    stats = [(torch.zeros(1, c, 1, 1), torch.ones(1, c, 1, 1))
             for c in (getattr(m, "num_features", None) or m.out_channels for m, _ in sites)]
    total, task, clone, feature = medic_module.medic_step_losses(student, teacher, views, stats, cfg, taps)
    assert clone.item() < 1e-10 and feature.item() < 1e-5
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_paper_defaults_are_the_reference_run():
    paper = get_defense("medic").make_config("paper")
    # README command: --hook-plane conv+bn --imp_temp 5 --hookweight 10 --lr 0.01 --epochs 60 --converge;
    # argparse: batch 64, weight decay 1e-4; statistics loop breaks after batch 101; CE is a batch mean
    assert (paper.layers, paper.bn_after_relu, paper.importance_temperature, paper.clone_weight) == \
        ("conv+bn", True, 5.0, 10.0)
    assert (paper.lr, paper.epochs, paper.cosine, paper.batch_size, paper.weight_decay) == (0.01, 60, True, 64, 1e-4)
    assert (paper.stat_batches, paper.teacher_reduction) == (101, "mean")
    for profile, epochs in (("tiny", 12), ("ci", 3)):  # only the budget shrinks
        cfg = get_defense("medic").make_config(profile)
        assert cfg.epochs == epochs and {k: v for k, v in vars(cfg).items() if k != "epochs"} == \
            {k: v for k, v in vars(paper).items() if k != "epochs"}
    with pytest.raises(ValueError, match="teacher_reduction"):
        medic_module.MedicConfig(teacher_reduction="max").validate()
    with pytest.raises(ValueError, match="layers"):
        medic_module.MedicConfig(layers="relu").validate()


def test_teacher_loss_is_a_batch_mean_and_sum_scales_it_by_the_view_count():
    torch.manual_seed(0)
    teacher = frozen_copy(build_encoder(width=8))
    feature = torch.randn(6, 64)
    for kind in ("ntxent", "cosine"):
        mean = medic_module.teacher_loss(teacher, feature, medic_module.MedicConfig(teacher_loss=kind))
        total = medic_module.teacher_loss(teacher, feature, medic_module.MedicConfig(teacher_loss=kind,
                                                                                     teacher_reduction="sum"))
        assert total.item() == pytest.approx(6 * mean.item(), rel=1e-6)
    f1, f2 = feature.chunk(2)
    cos = medic_module.teacher_loss(teacher, feature, medic_module.MedicConfig(teacher_loss="cosine"))
    assert cos.item() == pytest.approx((1 - F.cosine_similarity(f1, f2)).mean().item(), rel=1e-6)


def test_bn_sites_take_the_gradient_after_the_relu_unmasked():
    """The reference's in-place ReLU: the gradient at a BN site is the one w.r.t. the ReLU output, so it is
    nonzero where the ReLU output is 0; the compared value is the ReLU output (of the BN, or for a block's bn2
    of the block, after ``+= identity``)."""
    torch.manual_seed(0)
    teacher = frozen_copy(build_encoder(width=8))
    cfg = medic_module.MedicConfig()
    sites = medic_module.hook_sites(teacher, "conv+bn")
    tap = medic_module.ActivationTap(sites)
    x = torch.rand(4, 3, 32, 32).requires_grad_(True)
    stat, value, feature = medic_module.activations(teacher, x, "conv+bn", tap)
    grads = torch.autograd.grad(medic_module.teacher_loss(teacher, feature, cfg), value)
    after = [i for i, (h, v) in enumerate(zip(stat, value)) if v is not h]
    assert len(after) == 17 and sum(sites[i][1][1] == "input" for i in after) == 9
    for i in after:
        dead = value[i] == 0
        assert (value[i] >= 0).all() and dead.any()
        if sites[i][1][1] == "input":
            assert torch.equal(dead, stat[i] <= 0)
        assert grads[i][dead].abs().sum() > 0  # a pre-ReLU gradient would be exactly 0 here
    tap.remove()


class _Ctx:
    """ctx.batches in order, without shuffling."""
    device = torch.device("cpu")

    def batches(self, n, batch_size, drop_last=True):
        return [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def test_statistics_average_per_batch_means_and_unbiased_variances_over_one_pass():
    torch.manual_seed(0)
    teacher = frozen_copy(build_encoder(width=8))
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    identity = lambda x: x  # noqa: E731
    cfg = medic_module.MedicConfig(batch_size=4, layers="stages")
    stats = medic_module.teacher_statistics(teacher, images, cfg, _Ctx(), None, identity)
    batches = [images[:4], images[4:8], images[8:]]  # one pass, the last batch kept (2 images)
    with torch.no_grad():
        outs = [teacher.stages(b.float() / 255)["layer1"].double() for b in batches]
    sizes = torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64)
    # the reference's Norm("exact") buffers start at running_var = 1, cnt = 1e-5
    count = sizes.sum() + 1e-5
    mean = sum(o.mean((0, 2, 3)) * s for o, s in zip(outs, sizes)) / count
    var = (1 + sum(o.var((0, 2, 3), unbiased=True) * s for o, s in zip(outs, sizes))) / count
    assert torch.allclose(stats[0][0].flatten().double(), mean, atol=1e-5)
    assert torch.allclose(stats[0][1].flatten().double(), var.sqrt(), atol=1e-5)
    # capped at stat_batches: only the first batch
    first = medic_module.teacher_statistics(teacher, images, medic_module.MedicConfig(
        batch_size=4, layers="stages", stat_batches=1), _Ctx(), None, identity)
    assert torch.allclose(first[0][0].flatten().double(), outs[0].mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first[0][1].flatten().double(), ((1 + 4 * outs[0].var((0, 2, 3))) / 4).sqrt(), atol=1e-5)


def test_every_batch_is_used_and_the_cosine_steps_once_per_epoch(monkeypatch, clean_data, ctx):
    calls, lrs = [], []
    real = medic_module.medic_step_losses

    def spy(student, teacher, views, stats, cfg, taps, entropies=None):
        calls.append(len(views) // 2)
        return real(student, teacher, views, stats, cfg, taps, entropies)
    monkeypatch.setattr(medic_module, "medic_step_losses", spy)
    real_step = torch.optim.Adam.step

    def adam_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
    clean = type(clean_data)(clean_data.images[:70])
    suspect = build_encoder(width=8)
    cfg = get_defense("medic").make_config("ci", {"batch_size": 32, "stat_batches": 1})
    medic_module.medic(suspect, clean, cfg, ctx)
    assert calls == [32, 32, 6] * 3  # no batch dropped, as the reference's DataLoader
    assert lrs == pytest.approx([0.01] * 3 + [0.0075] * 3 + [0.0025] * 3)
    entropy = ctx.records["medic_importance_entropy"]
    assert len(entropy["activation"]) == len(entropy["gradient"]) == 3
    assert all(0 < e <= 1 + 1e-6 for e in entropy["activation"] + entropy["gradient"])
