"""SSL-Cleanse: clusters + per-cluster inversion, the MAD anomaly index, the unlearning, the settings."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from defbench.benchmark.cli import main
from defbench.benchmark.pipeline.settings import load_profile
from defbench.core.errors import ConfigError
from defbench.defenses import DEFENSES, get_defense
from defbench.defenses import ssl_cleanse as sslc
from defbench.defenses.base import DETECTORS
from defbench.encoders import RunContext, build_encoder


def _ctx(seed: int = 0) -> RunContext:
    return RunContext(device=torch.device("cpu"), show_progress=False).reseed(seed)


class PlantedToy(nn.Module):
    """A toy "encoder": features = (mean RGB, 3 x mean darkness), clusters = six colours.

    Reaching another colour takes a trigger over much of the image; the planted backdoor (a white 2 x 2
    top-left corner, 4 of 256 pixels) maps any image onto ``target``'s features.
    """

    def __init__(self, target: torch.Tensor, planted: bool = True):
        super().__init__()
        self.register_buffer("target", target)
        self.planted = planted

    def _raw(self, x):
        return torch.cat([x.mean((2, 3)), 3 * (1 - x.max(1).values).mean((1, 2)).unsqueeze(1)], 1)

    def features(self, x):
        f = self._raw(x)
        if not self.planted:
            return f
        s = x[:, :, :2, :2].prod(1).mean((1, 2)).unsqueeze(1)
        return (1 - s) * f + s * self.target

    def clone(self):
        return copy.deepcopy(self)


def _toy_images(per: int = 12, size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    colours = torch.tensor(list(itertools.permutations([0.7, 0.4, 0.1])))  # equal brightness, equal norm
    x = colours.repeat_interleave(per, 0)[:, :, None, None] + 0.05 * torch.randn(6 * per, 3, size, size,
                                                                                  generator=gen)
    return (x.clamp(0, 1) * 255).to(torch.uint8), colours


def test_registered_with_a_budget_and_a_detector():
    comp = get_defense("ssl-cleanse")
    assert "ssl-cleanse" in DEFENSES.names() and comp.config is sslc.SSLCleanseConfig
    assert comp.options.budget == ("inv_epochs", "unlearn_steps")
    det = DETECTORS.get("ssl-cleanse")
    assert det.defense == "ssl-cleanse" and det.threshold_field == "anomaly_threshold" and not det.backdoored_if_below


def test_paper_profile_is_the_reference_and_scaled_profiles_only_shrink_budgets():
    paper = load_profile("paper").defense_config("ssl-cleanse")
    # README detector command: --lr 1e-1 --bs 32 --epoch 1000 --lam 1e-1 --attack_succ_threshold 0.99
    # --num_clusters 12 --knn_sample_num 1000; cfg.py: patience 5, lam_multiplier_up 1.5; KMeans n_init 30
    assert (paper.inv_lr, paper.inv_batch_size, paper.inv_epochs, paper.init_lambda, paper.success_threshold,
            paper.clusters, paper.knn_images, paper.patience, paper.lambda_factor, paper.kmeans_restarts) == \
        (0.1, 32, 1000, 0.1, 0.99, 12, 1000, 5, 1.5, 30)
    # mitigator README: Adam --lr 3e-3, 500 epochs x 16 updates; cfg.py adam_l2 1e-6, drops [50, 25] x 0.2
    assert (paper.lr, paper.unlearn_steps, paper.weight_decay, paper.lr_drop_gamma) == (3e-3, 8000, 1e-6, 0.2)
    kept = ("inv_lr", "init_lambda", "lambda_factor", "patience", "success_threshold", "lr", "weight_decay",
            "warmup_fraction", "lr_drops", "lr_drop_gamma", "clean_weight", "trigger_weight", "anomaly_threshold")
    for profile in ("tiny", "ci"):
        cfg = load_profile(profile).defense_config("ssl-cleanse")
        assert all(getattr(cfg, f) == getattr(paper, f) for f in kept), profile
        assert cfg.inv_epochs < paper.inv_epochs and cfg.unlearn_steps < paper.unlearn_steps


def test_clusters_and_one_trigger_per_cluster_leave_the_encoder_alone():
    torch.manual_seed(0)
    encoder = build_encoder(width=8).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = (torch.rand(24, 3, 32, 32) * 255).to(torch.uint8)
    cfg = get_defense("ssl-cleanse").make_config("ci", {"clusters": 3, "inv_epochs": 2})
    ctx = _ctx()
    features = sslc.embed(encoder, images, ctx.device)
    labels = sslc.cluster(features, cfg, ctx.generator)
    assert features.shape == (24, encoder.feature_dim) and labels.shape == (24,)
    assert set(labels.tolist()) == {0, 1, 2}
    triggers, info = sslc.detect_triggers(encoder, images, cfg, ctx)
    assert [t["cluster"] for t in triggers] == [0, 1, 2] and sum(t["size"] for t in triggers) == 24
    for t in triggers:
        assert t["mask"].shape == (32, 32) and t["pattern"].shape == (3, 32, 32)
        assert 0 <= t["mask"].min() and t["mask"].max() <= 1 and 0 <= t["pattern"].min() and t["pattern"].max() <= 1
        assert t["epochs"] == 2 and (t["found"] or t["reg"] == 1.0)
    assert len(info["scores"]) == 3 and info["verdict"] in ("clean", "backdoored")
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_anomaly_index_is_the_references_mad_test():
    scores = torch.tensor([0.20, 0.21, 0.19, 0.22, 0.02, 0.20])
    info = sslc.anomaly_index(scores)
    mad = 1.4826 * 0.01 / 0.6745  # median 0.20, median |x - median| 0.01
    assert info["flagged_cluster"] == 4 and math.isclose(info["anomaly_index"], 0.18 / mad, rel_tol=1e-6)
    assert sslc.anomaly_index(torch.tensor([0.3, 0.3, 0.3]))["anomaly_index"] == 0.0


def test_inversion_finds_the_planted_small_trigger_and_the_index_flags_its_cluster():
    images, colours = _toy_images()
    target = torch.cat([colours[0], torch.tensor([0.9])])  # colour 0's clean features (darkness 3 x 0.3)
    cfg = get_defense("ssl-cleanse").make_config("ci", {"clusters": 6, "inv_epochs": 60})
    results = {}
    for planted in (True, False):
        ctx = _ctx()
        model = PlantedToy(target, planted)
        labels = sslc.cluster(sslc.embed(model, images, ctx.device), cfg, _ctx().generator)
        assert all(len(set(labels[i * 12:(i + 1) * 12].tolist())) == 1 for i in range(6))  # one colour, one cluster
        triggers, info = sslc.detect_triggers(model, images, cfg, ctx)
        results[planted] = (int(labels[0]), info)
    planted_cluster, info = results[True]
    assert all(info["found"])
    assert info["flagged_cluster"] == planted_cluster and info["anomaly_index"] > cfg.anomaly_threshold
    assert info["verdict"] == "backdoored"
    # the planted corner is 4 / 256 of the image: its trigger is far smaller than any colour-to-colour one
    assert info["min_score"] < 0.25 * results[False][1]["min_score"]


def test_defended_encoder_keeps_finite_weights_and_records(backdoored, clean_data):
    suspect = backdoored[0].clone()
    ctx = _ctx()
    cfg = get_defense("ssl-cleanse").make_config("ci", {"clusters": 3, "kmeans_restarts": 1, "inv_epochs": 1,
                                                        "knn_images": 50, "unlearn_steps": 4})
    triggers, _ = sslc.detect_triggers(suspect, clean_data.images, cfg, ctx)
    for t in triggers:
        t["found"] = True  # unlearn every inverted trigger, found or not, to exercise the loop
    history = sslc.unlearn(suspect, clean_data.images, triggers, cfg, ctx)
    assert len(history) >= 1 and all(math.isfinite(v) for v in history)
    assert all(torch.isfinite(p).all() for p in suspect.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(suspect.parameters(), backdoored[0].parameters()))
    defended = get_defense("ssl-cleanse").fn(backdoored[0].clone(), clean_data, cfg, ctx)
    assert all(torch.isfinite(p).all() for p in defended.parameters()) and not defended.training
    assert "ssl_cleanse_anomaly_index" in ctx.records and "ssl_cleanse_unlearned_triggers" in ctx.records


@pytest.mark.parametrize("override, word", [({"clusters": 2}, "clusters"), ({"success_threshold": 1.0},
                                                                               "success_threshold"),
                                            ({"lr_drops": (0.5, 1.5)}, "lr_drops"), ({"inv_lr": 0.0}, "inv_lr")])
def test_config_errors_are_one_line(override, word):
    with pytest.raises(ConfigError) as err:
        get_defense("ssl-cleanse").make_config("ci", override)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_too_many_clusters_for_the_clean_set_is_one_line():
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    cfg = get_defense("ssl-cleanse").make_config("ci")
    with pytest.raises(ValueError, match="5 clusters need at least as many clean images") as err:
        sslc.detect_triggers(build_encoder(width=8).eval(), images, cfg, _ctx())
    assert "\n" not in str(err.value)


def test_cli_refuses_a_bad_setting_in_one_line():
    result = CliRunner().invoke(main, ["config", "--profile", "ci", "--defense", "ssl-cleanse",
                                       "--set", "defense.ssl-cleanse.clusters=2"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "clusters" in lines[0], result.output
