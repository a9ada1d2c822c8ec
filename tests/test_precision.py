"""bf16 autocast (``encoder.precision = "bf16"``) computes what fp32 computes, to bf16's rounding.

Checked where the comparison is deterministic: the same weights give the same features, the same probe
predictions and so the same ACC/ASR; the same attack from the same start follows the same loss curve. A whole
ci cell trained in each precision is not compared here: two trainings that differ in rounding drift apart like
two seeds, and at ci one seed's ASR spreads by tens of points (measured cells: docs/gpu.md).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import PRETRAIN, TASK
from defbench.attacks import ATTACKS
from defbench.attacks.base import AttackInputs
from defbench.benchmark.pipeline.evaluate import extract_features, predict, score, train_probe
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.settings import ConfigError, load_profile
from defbench.encoders import SimCLRConfig, build_encoder


def test_paper_runs_fp32_and_bf16_only_when_asked(monkeypatch):
    """The references run fp32; the paper profile does too, on a GPU as well (no automatic bf16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    paper = load_profile("paper")
    assert paper.encoder.precision == "fp32"
    assert load_profile("paper", {"encoder.precision": "bf16"}).encoder.precision == "bf16"
    with pytest.raises(ConfigError, match="fp32, bf16") as err:
        load_profile("paper", {"encoder.precision": "auto"})  # the former automatic choice is gone
    assert "\n" not in str(err.value)


def _in_bf16(encoder):
    twin = build_encoder(encoder.config, precision="bf16")
    twin.load_state_dict(encoder.state_dict())
    return twin.eval()


def test_precision_is_part_of_every_stage_key(ci_profile):
    bf16 = load_profile("ci", {"encoder.precision": "bf16"})
    assert ci_profile.encoder.precision == "fp32" and bf16.encoder.precision == "bf16"
    fp32_stages = cell_stages(ci_profile, "badencoder", "ft", PRETRAIN, TASK)
    bf16_stages = cell_stages(bf16, "badencoder", "ft", PRETRAIN, TASK)
    assert fp32_stages.keys() == bf16_stages.keys()
    assert all(fp32_stages[r].key != bf16_stages[r].key for r in fp32_stages)


def test_bf16_features_predictions_and_scores_match_fp32(backdoored, task_data, ci_profile, ctx):
    encoder, trigger, target, _ = backdoored
    twin = _in_bf16(encoder)
    train, test = task_data
    cfg = ci_profile.evaluate
    feats = {}
    for name, model in (("fp32", encoder), ("bf16", twin)):
        feats[name] = [extract_features(model, test.images, ctx, cfg.feature_batch, trigger=t) for t in (None, trigger)]
    for clean_or_stamped in (0, 1):
        cos = F.cosine_similarity(feats["fp32"][clean_or_stamped], feats["bf16"][clean_or_stamped], dim=1)
        assert cos.min() > 0.98 and cos.mean() > 0.995, (clean_or_stamped, cos.min(), cos.mean())
    probe = train_probe(extract_features(encoder, train.images, ctx, cfg.feature_batch), train.labels,
                        train.num_classes, cfg, ctx.reseed(1))
    preds = {name: [predict(probe, f, ctx.device) for f in feats[name]] for name in feats}
    for i in (0, 1):
        agreement = (preds["fp32"][i] == preds["bf16"][i]).float().mean().item()
        assert agreement > 0.97, (i, agreement)
    fp32, bf16 = (score(*preds[name], test.labels, target) for name in ("fp32", "bf16"))
    print(f"same probe, fp32 vs bf16 features: {fp32} / {bf16}")
    assert abs(fp32["acc"] - bf16["acc"]) <= 2 and abs(fp32["asr_all"] - bf16["asr_all"]) <= 2, (fp32, bf16)


def test_a_bf16_attack_follows_the_fp32_loss_curve(clean_encoder, backdoored, clean_data, task_data, ctx):
    _, trigger, target, _ = backdoored
    train, _ = task_data
    comp = ATTACKS.get("badencoder")
    cfg = comp.make_config("ci", {"epochs": 2, "shadow_images": 256})
    curves = {}
    for name, start in (("fp32", clean_encoder.clone()), ("bf16", _in_bf16(clean_encoder))):
        inputs = AttackInputs(start.config, clean_data.images, train.images[train.labels == target], trigger,
                              SimCLRConfig(), clean_encoder=start)
        comp.fn(inputs, cfg, ctx.reseed(0))
        curves[name] = torch.tensor(ctx.records["final_losses"])
    print(f"final [L0, L1, L2]: fp32 {curves['fp32'].tolist()}, bf16 {curves['bf16'].tolist()}")
    assert torch.allclose(curves["fp32"], curves["bf16"], atol=0.02), curves
