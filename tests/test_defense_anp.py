"""ANP: masks stay in [0, 1], perturbations respect eps, pruned channels get zero scale."""
from __future__ import annotations

import torch

from defbench.defenses import get_defense
from defbench.defenses import anp as anp_module
from defbench.encoders import Encoder, build_encoder, frozen_copy, load_encoder, save_encoder


def test_perturbation_is_the_reference_noisy_batchnorm_and_respects_eps():
    torch.manual_seed(0)
    model = frozen_copy(build_encoder(width=8))
    pert = anp_module.NeuronPerturbation(model, eps=0.4)
    assert pert.n_neurons == 75 * 8  # 4,800 at width 64
    x = torch.rand(4, 3, 32, 32)
    # masks at 1 and no perturbation: the unmodified encoder
    assert torch.allclose(pert.features(x, perturbed=False), model.features(x), atol=1e-6)
    pert.reset(torch.Generator().manual_seed(0))
    assert pert.max_perturbation() <= 0.4
    loss = pert.features(x, perturbed=True).pow(2).sum()
    pert.ascend(loss)
    assert pert.max_perturbation() <= 0.4 + 1e-7
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
    assert 0 < stats["max_perturbation"] <= cfg.eps + 1e-6

    threshold = float(torch.quantile(masks, 0.05))  # prune the lowest ~5% whatever the short run reached
    encoder = suspect.clone()
    pruned = anp_module.prune_neurons(encoder, masks, threshold, prune_beta=False)
    assert sum(pruned.values()) == int((masks < threshold).sum()) > 0
    offset = 0
    for (name, bn), (_, bn0) in zip(anp_module.neuron_layers(encoder), anp_module.neuron_layers(suspect)):
        m = masks[offset:offset + bn.num_features]
        offset += bn.num_features
        low = m < threshold
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
    assert stats["max_perturbation"] <= cfg.eps + 1e-6
