"""FP: the masked channels are exactly the least active ones and stay zero through fine-tuning and save/load."""
from __future__ import annotations

import torch

from defbench.defenses import get_defense
from defbench.defenses import fp as fp_module
from defbench.encoders import Encoder, build_encoder, load_encoder, save_encoder, to_float


def _ranking_images(clean_data, cfg, seed: int) -> torch.Tensor:
    """The clean images FP ranks on: what its first draw from ctx.generator leaves outside the hold-out."""
    n = len(clean_data.images)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return clean_data.images[perm[round(cfg.holdout_fraction * n):]]


@torch.no_grad()
def _features(encoder, images):
    encoder.eval()
    return torch.cat([encoder.features(to_float(c, torch.device("cpu"))) for c in images.split(256)])


def _stream_params(encoder):
    layer4 = encoder.backbone.layer4
    return [layer4[0].bn2, layer4[0].downsample[1], layer4[1].bn2]


def test_fp_prunes_least_active_channels_and_they_stay_zero(backdoored, clean_data, ctx, tmp_path):
    suspect = backdoored[0]
    component = get_defense("fp")
    cfg = component.make_config("ci")
    # independent ranking: layer4's mean activation = the mean of the pooled feature
    activation = _features(suspect, _ranking_images(clean_data, cfg, ctx.seed)).mean(0)

    defended = component.fn(suspect.clone(), clean_data, cfg, ctx)
    pruned = torch.tensor(ctx.records["fp_pruned_channels"], dtype=torch.long)
    k = len(pruned)
    assert 0 < k <= round(cfg.max_ratio * suspect.feature_dim)
    kept = torch.ones(suspect.feature_dim, dtype=torch.bool)
    kept[pruned] = False
    # every pruned channel is at most as active as every kept one (ties, e.g. dead channels, either way)
    assert activation[pruned].max() <= activation[kept].min() + 1e-6
    ordered = torch.sort(activation).values
    if ordered[k] - ordered[k - 1] > 1e-6:  # no tie at the boundary: the set is unique
        assert set(pruned.tolist()) == set(torch.argsort(activation)[:k].tolist())

    # after fine-tuning: a plain Encoder whose pruned channels are exactly zero everywhere
    assert type(defended) is Encoder
    assert set(defended.state_dict()) == set(build_encoder(suspect.config).state_dict())
    for bn in _stream_params(defended):
        assert torch.all(bn.weight[pruned] == 0) and torch.all(bn.bias[pruned] == 0)
        assert torch.any(bn.weight[kept] != 0)
    probe_images = clean_data.images[:64]
    feats = _features(defended, probe_images)
    assert torch.all(feats[:, pruned] == 0)
    assert feats[:, kept].abs().sum() > 0
    defended.train()
    with torch.no_grad():
        train_mode = defended.stages(to_float(probe_images, torch.device("cpu")))
    assert torch.all(train_mode["layer4"][:, pruned] == 0)
    # fine-tuning did change the encoder
    assert any(not torch.equal(a, b) for a, b in zip(defended.state_dict().values(), suspect.state_dict().values()))

    save_encoder(defended, tmp_path / "fp.pt")
    loaded = load_encoder(tmp_path / "fp.pt").eval()
    for name, value in defended.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert torch.all(_features(loaded, probe_images)[:, pruned] == 0)


def test_fp_similarity_rule_and_fixed_ratio(backdoored, clean_data, ctx):
    suspect = backdoored[0]
    component = get_defense("fp")
    cfg = component.make_config("ci", {"epochs": 0, "min_similarity": 0.95})
    component.fn(suspect.clone(), clean_data, cfg, ctx)
    curve, k = ctx.records["fp_similarity_curve"], ctx.records["fp_n_pruned"]
    assert curve, "the similarity rule walked no steps"
    accepted = [step for step in curve if step["n_pruned"] <= k]
    assert all(step["similarity"] >= cfg.min_similarity for step in accepted)
    rejected = [step for step in curve if step["n_pruned"] > k]
    assert len(rejected) <= 1 and all(step["similarity"] < cfg.min_similarity for step in rejected)
    if not rejected:
        assert k == max(step["n_pruned"] for step in curve)  # stopped by max_ratio
    assert ctx.records["fp_ratio"] <= cfg.max_ratio + 1e-9

    fixed = component.make_config("ci", {"epochs": 0, "prune_by": "ratio", "ratio": 0.5})
    defended = component.fn(suspect.clone(), clean_data, fixed, ctx)
    assert ctx.records["fp_n_pruned"] == suspect.feature_dim // 2
    assert (_features(defended, clean_data.images[:32]) == 0).all(0).sum() >= suspect.feature_dim // 2


def test_fp_masks_survive_an_optimizer_step():
    encoder = build_encoder(width=8)
    pruned = torch.tensor([0, 3, 5])
    fp_module.attach_masks(encoder, "layer4", pruned)
    opt = torch.optim.Adam(encoder.parameters(), lr=0.1, weight_decay=0.1)
    loss = encoder.features(torch.rand(4, 3, 32, 32)).sum() + encoder.backbone.layer4[1].bn2.bias.sum()
    loss.backward()
    opt.step()
    fp_module.detach_masks(encoder, "layer4")
    for bn in _stream_params(encoder):
        assert torch.all(bn.weight[pruned] == 0) and torch.all(bn.bias[pruned] == 0)
    assert set(encoder.state_dict()) == set(build_encoder(width=8).state_dict())


def test_fp_walks_the_similarity_rule_in_one_percent_steps(ctx):
    """BackdoorBench's once_prune_ratio: the rule tries every 1% of the channels (paper's ratio_step)."""
    from defbench.defenses import CleanData

    assert get_defense("fp").make_config("paper").ratio_step == 0.01
    encoder = build_encoder(width=8).eval()  # layer4: 64 channels
    clean = CleanData((torch.rand(40, 3, 32, 32) * 255).to(torch.uint8))
    cfg = get_defense("fp").make_config("ci", {"epochs": 0, "min_similarity": -1.0, "max_ratio": 0.2})
    get_defense("fp").fn(encoder, clean, cfg, ctx)
    expected = sorted({round(i * 0.01 * 64) for i in range(1, 21)} - {0})
    assert [step["n_pruned"] for step in ctx.records["fp_similarity_curve"]] == expected
    assert ctx.records["fp_n_pruned"] == round(0.2 * 64)
