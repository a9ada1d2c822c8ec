"""DRUPE: the sliced-Wasserstein term and what it does to a BadEncoder-style attack."""
import pytest
import torch

from defbench.attacks import ATTACKS, AttackInputs
from defbench.attacks.drupe import DRUPEConfig, sliced_wasserstein
from defbench.encoders import SimCLRConfig


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sliced_wasserstein_is_small_for_matched_and_large_for_mismatched_distributions():
    a = torch.randn(256, 32, generator=_gen(1))
    b = torch.randn(256, 32, generator=_gen(2))  # same distribution, other sample
    shifted = torch.randn(256, 32, generator=_gen(3)) + 1.0
    collapsed = torch.randn(256, 32, generator=_gen(4)) * 0.05 + 0.5  # a tight far cluster, as BadEncoder makes
    assert sliced_wasserstein(a, a, 50, _gen()) < 1e-6
    matched = sliced_wasserstein(a, b, 50, _gen())
    assert matched < 0.5 * sliced_wasserstein(a, shifted, 50, _gen())
    assert matched < 0.5 * sliced_wasserstein(a, collapsed, 50, _gen())
    with pytest.raises(ValueError, match="equally sized"):
        sliced_wasserstein(a, a[:10])


def test_sliced_wasserstein_gradient_moves_one_cloud_onto_the_other():
    target = torch.randn(128, 16, generator=_gen(1))
    x = (torch.randn(128, 16, generator=_gen(2)) * 0.1 + 2.0).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    start = sliced_wasserstein(x, target, 50, _gen()).item()
    for step in range(50):
        loss = sliced_wasserstein(x, target, 50, _gen(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sliced_wasserstein(x, target, 50, _gen()).item() < 0.2 * start


def test_config_has_profiles_and_checks_the_assignment():
    comp = ATTACKS.get("drupe")
    assert {"paper", "tiny", "ci"} <= set(comp.profiles) and comp.options["needs_clean_encoder"] is True
    paper = comp.make_config("paper")
    assert (paper.epochs, paper.lr, paper.n_reference, paper.n_projections) == (200, 1e-3, 3, 50)
    with pytest.raises(ValueError, match="reference_assignment"):
        DRUPEConfig(reference_assignment="closest")


def _bn_state(encoder):
    return {n: t.clone() for n, t in encoder.state_dict().items() if any(k in n for k in ("bn", "downsample.1"))}


def _run(start_encoder, clean_data, task_data, trigger, ctx, **overrides):
    train, _ = task_data
    targets = train.images[train.labels == 9]
    comp = ATTACKS.get("drupe")
    cfg = comp.make_config("ci", {"epochs": 3, "shadow_images": 256, "batch_size": 64, **overrides})
    inputs = AttackInputs(start_encoder.config, clean_data.images, targets, trigger, SimCLRConfig(),
                          clean_encoder=start_encoder)
    encoder = comp.fn(inputs, cfg, ctx.reseed(0))
    return encoder, [epoch[3] for epoch in ctx.records["loss_history"]]


@pytest.mark.slow
def test_drupe_keeps_batchnorm_frozen_and_hides_triggered_embeddings_better_than_badencoder(
        clean_encoder, backdoored, clean_data, task_data, ctx):
    trigger = backdoored[1]
    attacked, sw_drupe = _run(clean_encoder, clean_data, task_data, trigger, ctx)
    before, after = _bn_state(clean_encoder), _bn_state(attacked)
    assert before.keys() == after.keys() and len(before) > 40
    assert all(torch.equal(before[n], after[n]) for n in before), "a BatchNorm drifted during DRUPE"
    assert torch.equal(clean_encoder.head[0].weight, attacked.head[0].weight)  # only the backbone trains
    assert not torch.equal(clean_encoder.backbone.conv1.weight, attacked.backbone.conv1.weight)
    _, sw_plain = _run(clean_encoder, clean_data, task_data, trigger, ctx, lambda_sw=0.0)
    assert sw_drupe[-1] < sw_plain[-1], (sw_drupe, sw_plain)


@pytest.mark.slow
def test_sw_term_decreases_when_training_starts_from_a_collapsed_backdoor(backdoored, clean_data, task_data, ctx):
    """BadEncoder's triggered embeddings sit in a tight cluster; DRUPE's term spreads them back out."""
    encoder, trigger = backdoored[0], backdoored[1]
    _, sw = _run(encoder, clean_data, task_data, trigger, ctx)
    assert sw[-1] < sw[0], sw
