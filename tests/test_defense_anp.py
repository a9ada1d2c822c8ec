"""ANP: masks stay in [0, 1], perturbations follow the reference (random start + one unprojected signed step,
so up to 2 eps), BatchNorm uses batch statistics during mask optimisation, pruned channels get zero scale."""
from __future__ import annotations

import dataclasses

import torch

from defbench.defenses import get_defense
from defbench.defenses import anp as anp_module
from defbench.defenses import CleanData
from defbench.encoders import Encoder, build_encoder, frozen_copy, load_encoder, save_encoder


def test_perturbation_is_the_reference_noisy_batchnorm_and_the_ascent_is_not_projected():
    torch.manual_seed(0)
    model = frozen_copy(build_encoder(width=8))
    pert = anp_module.NeuronPerturbation(model, eps=0.4)
    assert pert.n_neurons == 75 * 8  # 4,800 at width 64
    x = torch.rand(4, 3, 32, 32)
    # masks at 1 and no perturbation: the unmodified encoder
    assert torch.allclose(pert.features(x, perturbed=False), model.features(x), atol=1e-6)
    pert.reset(torch.Generator().manual_seed(0))
    assert pert.max_perturbation() <= 0.4
    start = [t.detach().clone() for t in pert.delta + pert.xi]
    loss = pert.features(x, perturbed=True).pow(2).sum()
    pert.ascend(loss)
    # random start in [-eps, eps] plus one step of size eps, not projected back: beyond eps, within 2 eps
    assert 0.4 < pert.max_perturbation() <= 0.8 + 1e-6
    steps = torch.cat([(t.detach() - t0).abs() for t, t0 in zip(pert.delta + pert.xi, start)])
    assert torch.allclose(steps[steps > 0], torch.full_like(steps[steps > 0], 0.4))  # exactly one step of eps
    # the scale perturbations moved (a fresh encoder has beta = 0, so xi gets no gradient and stays put)
    moved = torch.cat([d.detach() != d0 for d, d0 in zip(pert.delta, start)])
    assert moved.float().mean() > 0.9
    # perturbed parameters follow gamma (m + delta), beta (1 + xi)
    name, bn = pert.layers[3]
    params = pert.parameters(perturbed=True)
    assert torch.allclose(params[f"{name}.weight"], bn.weight * (1 + pert.delta[3]))
    assert torch.allclose(params[f"{name}.bias"], bn.bias * (1 + pert.xi[3]))
    # the encoder itself is untouched: no hooks, no new modules
    assert set(model.state_dict()) == set(build_encoder(width=8).state_dict())


def test_anp_masks_stay_in_unit_interval_and_pruning_zeroes_scale(backdoored, clean_data, ctx):
    suspect = backdoored[0]
    cfg = get_defense("anp").make_config("ci", {"iterations": 10})
    masks, stats = anp_module.optimize_masks(suspect, clean_data, cfg, ctx)
    assert masks.shape == (stats["n_neurons"],)
    assert masks.min() >= 0 and masks.max() <= 1
    assert masks.min() < 1  # the robust term moved some masks
    assert cfg.eps < stats["max_perturbation"] <= 2 * cfg.eps + 1e-6

    threshold = float(torch.quantile(masks, 0.05))  # prune the lowest ~5% whatever the short run reached
    encoder = suspect.clone()
    pruned = anp_module.prune_neurons(encoder, masks, threshold, prune_beta=False)
    assert sum(pruned.values()) == int((masks <= threshold).sum()) > 0
    offset = 0
    for (name, bn), (_, bn0) in zip(anp_module.neuron_layers(encoder), anp_module.neuron_layers(suspect)):
        m = masks[offset:offset + bn.num_features]
        offset += bn.num_features
        low = m <= threshold
        assert torch.all(bn.weight[low] == 0), name
        assert torch.equal(bn.weight[~low], bn0.weight[~low]) and torch.equal(bn.bias, bn0.bias)

    both = suspect.clone()
    anp_module.prune_neurons(both, masks, threshold, prune_beta=True)
    zero_bias = sum(int((bn.bias == 0).sum()) for _, bn in anp_module.neuron_layers(both))
    assert zero_bias >= sum(pruned.values())


def test_anp_defense_returns_plain_encoder_that_round_trips(backdoored, clean_data, ctx, tmp_path):
    suspect = backdoored[0]
    component = get_defense("anp")
    cfg = component.make_config("ci", {"iterations": 3, "threshold": 0.9999})
    defended = component.fn(suspect.clone(), clean_data, cfg, ctx)
    assert type(defended) is Encoder
    zero_scale = sum(int(((bn.weight == 0) & (bn0.weight != 0)).sum()) for (_, bn), (_, bn0)
                     in zip(anp_module.neuron_layers(defended), anp_module.neuron_layers(suspect)))
    assert zero_scale == ctx.records["anp_n_pruned"] > 0
    save_encoder(defended, tmp_path / "anp.pt")
    loaded = load_encoder(tmp_path / "anp.pt")
    for name, value in defended.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_anp_nt_xent_loss_runs(clean_data, ctx):
    encoder = build_encoder(width=8).eval()
    cfg = get_defense("anp").make_config("ci", {"iterations": 2, "batch_size": 16, "loss": "nt_xent"})
    masks, stats = anp_module.optimize_masks(encoder, clean_data, cfg, ctx)
    assert masks.min() >= 0 and masks.max() <= 1 and masks.min() < 1
    assert stats["max_perturbation"] <= 2 * cfg.eps + 1e-6


def test_mask_optimisation_uses_batch_statistics_and_leaves_the_suspect_alone(backdoored, clean_data, ctx,
                                                                               monkeypatch):
    suspect = backdoored[0].clone().eval()
    before = {k: v.clone() for k, v in suspect.state_dict().items()}
    modes = []
    features = anp_module.NeuronPerturbation.features

    def spy(self, x, perturbed):
        modes.append(self.model.training and all(bn.training for _, bn in self.layers))
        return features(self, x, perturbed)

    monkeypatch.setattr(anp_module.NeuronPerturbation, "features", spy)
    # lr 0 (refused by validation, so set past it): the masks stay at 1 and the clean term is exactly
    # the drift from f_0, i.e. zero
    cfg = dataclasses.replace(get_defense("anp").make_config("ci", {"iterations": 3}), lr=0.0)
    masks, stats = anp_module.optimize_masks(suspect, clean_data, cfg, ctx)
    assert modes and all(modes)  # every forward of the masked network: train mode (batch statistics)
    assert torch.all(masks == 1)
    assert all(abs(point["natural"]) < 1e-5 for point in stats["curve"])
    assert all(point["robust"] > 0 for point in stats["curve"])
    for key, value in suspect.state_dict().items():  # running statistics included
        assert torch.equal(value, before[key]), key
    assert not suspect.training

    # batch statistics differ from the running ones: the masked network is not the eval-mode encoder
    model = anp_module.mask_model(suspect)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        train_mode = anp_module.NeuronPerturbation(model, 0.4).features(x, perturbed=False)
        assert torch.allclose(train_mode, model.features(x), atol=1e-6)
        assert not torch.allclose(train_mode, suspect.features(x), atol=1e-3)


def test_reference_augmentation_is_a_padded_random_crop_and_flip():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    out = anp_module.random_crop(x, 4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # each output is one 32 x 32 window of the zero-padded image
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))
    assert not torch.equal(out, x)
    aug = anp_module.reference_augment(x)
    assert aug.shape == x.shape and aug.min() >= 0 and aug.max() <= 1


def test_pruning_threshold_is_inclusive_and_profiles_keep_the_reference_lr():
    encoder = build_encoder(width=8)
    n = sum(bn.num_features for _, bn in anp_module.neuron_layers(encoder))
    masks = torch.ones(n)
    masks[:3] = torch.tensor([0.2, 0.1, 0.25])
    pruned = anp_module.prune_neurons(encoder, masks, 0.2, prune_beta=False)
    assert sum(pruned.values()) == 2  # mask <= threshold, as the reference's pruning by threshold
    component = get_defense("anp")
    paper = component.make_config("paper")
    assert (paper.eps, paper.steps, paper.alpha, paper.iterations, paper.batch_size, paper.lr, paper.momentum,
            paper.threshold) == (0.4, 1, 0.2, 2000, 128, 0.2, 0.9, 0.2)
    for profile in ("tiny", "ci"):  # only the iteration budget shrinks
        cfg = component.make_config(profile)
        assert cfg.iterations < paper.iterations
        assert {**vars(cfg), "iterations": 0} == {**vars(paper), "iterations": 0}


def test_multi_step_ascent_and_sampling_with_replacement(ctx):
    encoder = build_encoder(width=8).eval()
    clean = CleanData((torch.rand(20, 3, 32, 32) * 255).to(torch.uint8))
    cfg = get_defense("anp").make_config("ci", {"iterations": 2, "batch_size": 32, "steps": 2})
    masks, stats = anp_module.optimize_masks(encoder, clean, cfg, ctx)  # a batch larger than the set
    assert stats["max_perturbation"] <= 2 * cfg.eps + 1e-6 and masks.min() < 1
