"""DeDe: a decoder from the suspect's embedding, a threshold from held-out clean images, an input screen that
survives the artifact store, and the evaluation's accounting of rejected inputs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import PRETRAIN, TASK
from defbench.benchmark.pipeline import evaluate as evaluation
from defbench.benchmark.pipeline import screening
from defbench.benchmark.pipeline.keys import code_version
from defbench.benchmark.pipeline.plan import attack_stage, defend_stage, evaluate_stage
from defbench.benchmark.pipeline.scheduler import run_grid
from defbench.benchmark.pipeline.settings import load_profile
from defbench.benchmark.pipeline.stages import INPUTS, SCREENING, load_stage_encoder, record_evaluation
from defbench.defenses import CleanData, get_defense
from defbench.defenses import dede as dede_module
from defbench.encoders import RunContext, build_encoder, load_encoder, save_encoder, to_float
from defbench.encoders.screening import ScreenedEncoder, accepts, is_screened, load_screen, save_screen


def _ctx(seed: int = 0) -> RunContext:
    return RunContext(device=torch.device("cpu"), show_progress=False).reseed(seed)


# a decoder small enough for a unit test (the mechanism, not the reference's size)
SMALL = {"steps": 3, "batch_size": 16, "emb_dim": 24, "encoder_layers": 1, "decoder_layers": 1, "holdout": 0.25}


def _small_run(n: int = 40, **overrides):
    torch.manual_seed(0)
    suspect = build_encoder(width=8, channels_last=False).eval()
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    cfg = get_defense("dede").make_config("ci", {**SMALL, **overrides})
    ctx = _ctx(3)
    out = get_defense("dede").fn(suspect.clone(), CleanData(images), cfg, ctx)
    return suspect, images, cfg, ctx, out


def test_paper_is_the_reference_and_tiny_ci_only_shrink_the_budget():
    component = get_defense("dede")
    paper = component.make_config("paper")
    # tardisblue9/DeDe src/main.py: 200 epochs over 50,000 images, batch 256, drop_last -> 195 updates per epoch
    assert paper.steps == 200 * (50_000 // 256) == 39_000
    assert (paper.patch_size, paper.emb_dim, paper.encoder_layers, paper.decoder_layers) == (4, 192, 12, 4)
    assert (paper.encoder_heads, paper.decoder_heads, paper.mask_ratio, paper.test_mask_ratio) == (3, 3, 0.9, 0.99)
    assert (paper.lr, paper.weight_decay, paper.batch_size) == (1e-3, 1e-6, 256)
    assert component.options.budget == ("steps",) and component.options.screens is True
    for profile in ("tiny", "ci"):
        cfg = component.make_config(profile)
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(paper, f.name)}
        assert changed == {"steps", "batch_size"}, (profile, changed)


@pytest.mark.parametrize("field, value, message", [
    ("mask_ratio", 1.0, "mask_ratio"), ("test_mask_ratio", 0.0, "test_mask_ratio"), ("holdout", 0.0, "holdout"),
    ("threshold_rule", "median", "threshold_rule"), ("quantile", 1.0, "quantile"), ("emb_dim", 100, "divisible"),
    ("steps", 0, "steps"), ("factor", 0.0, "factor")])
def test_validate_rejects_bad_settings_in_one_line(field, value, message):
    cfg = dataclasses.replace(get_defense("dede").make_config("ci"), **{field: value})
    with pytest.raises(ValueError, match=message) as err:
        cfg.validate()
    assert "\n" not in str(err.value)


def test_the_decoder_reconstructs_from_the_embedding_when_every_patch_is_masked():
    cfg = get_defense("dede").make_config("paper")
    encoder = build_encoder(width=8, channels_last=False)
    decoder = dede_module.DeDeDecoder(dede_module.decoder_config(encoder, cfg, mask_seed=5))
    assert decoder.tokens == 64 and decoder.detection_visible(2, "cpu").shape == (2, 0)  # int(64 * 0.01) = 0
    x = torch.rand(2, 3, 32, 32)
    f = torch.randn(2, encoder.feature_dim)
    # with nothing visible, the image enters only through the error: the prediction depends on the feature alone
    visible = decoder.detection_visible(2, "cpu")
    a, b = decoder(decoder.normalise(x), f, visible), decoder(decoder.normalise(torch.rand(2, 3, 32, 32)), f, visible)
    assert torch.equal(a, b) and not torch.equal(a, decoder(decoder.normalise(x), f.flip(0), visible))
    errors = decoder.score(x, f)
    assert errors.shape == (2,)
    expected = (a - decoder.patches(decoder.normalise(x))).square().sum((1, 2))
    assert torch.allclose(errors, expected)


def test_the_threshold_is_the_quantile_of_held_out_clean_errors():
    suspect, images, cfg, ctx, out = _small_run()
    assert isinstance(out, ScreenedEncoder) and out.kind == "dede"
    order = torch.randperm(len(images), generator=_ctx(3).generator)  # the defense's own draw: its held-out images
    n_hold = round(cfg.holdout * len(images))
    held, train = images[order[:n_hold]], images[order[n_hold:]]
    errors = out.scores(to_float(held, "cpu")).double()
    assert out.threshold == pytest.approx(float(torch.quantile(errors, cfg.quantile)), rel=1e-6)
    assert ctx.records["dede_holdout_images"] == n_hold
    assert ctx.records["dede_holdout_rejected"] == pytest.approx(float((errors > out.threshold).float().mean()))
    assert ctx.records["dede_train_error_mean"] == pytest.approx(float(out.scores(to_float(train, "cpu")).mean()),
                                                                 rel=1e-5)
    # the mean-factor rule (jsrdcht/SSL-Backdoor's "original paper mode"): factor x the held-out mean
    *_, other = _small_run(threshold_rule="mean-factor")
    assert other.threshold == pytest.approx(1.5 * float(other.scores(to_float(held, "cpu")).double().mean()), rel=1e-5)


def test_the_screen_changes_no_feature_and_no_weight():
    suspect, images, _, _, out = _small_run()
    x = to_float(images[:8], "cpu")
    assert torch.equal(out.features(x), suspect.features(x))
    assert out.state_dict().keys() == suspect.state_dict().keys()
    assert all(torch.equal(v, suspect.state_dict()[k]) for k, v in out.state_dict().items())
    assert evaluation.weights_digest(out) == evaluation.weights_digest(suspect)  # the same probe seed
    assert accepts(suspect, x).all() and accepts(out, x).dtype == torch.bool


def test_the_screened_encoder_round_trips_through_save_and_load(tmp_path):
    _, images, _, _, out = _small_run()
    x = to_float(images, "cpu")
    save_encoder(out, tmp_path / "encoder.pt")
    save_screen(out, tmp_path / "screen.pt")
    plain = load_encoder(tmp_path / "encoder.pt")
    assert not is_screened(plain) and accepts(plain, x).all()  # the checkpoint alone: the encoder it wraps
    back = load_screen(plain, tmp_path / "screen.pt")
    assert back.threshold == out.threshold and back.kind == "dede"
    assert torch.equal(back.scores(x), out.scores(x)) and torch.equal(back.accept(x), out.accept(x))
    copy = out.clone().to("cpu").eval()
    assert copy.screen is not out.screen and torch.equal(copy.accept(x), out.accept(x))


def test_rejections_are_counted_as_defined():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    pred_clean = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3])  # 7 of 8 right
    ok_clean = torch.tensor([True, True, False, True, True, True, True, False])  # 2 rejected, both right
    pred_trig = torch.tensor([3, 3, 3, 3, 3, 3, 0, 0])  # target 3: six hits
    ok_trig = torch.tensor([False, False, True, True, True, True, True, True])  # two of the hits rejected
    m = screening.score_screened(pred_clean, ok_clean, pred_trig, ok_trig, labels, target=3)
    assert m["acc"] == pytest.approx(100 * 5 / 8)  # a rejected clean image is a miss
    assert m["acc_accepted"] == pytest.approx(100 * 5 / 6)
    assert m["asr_all"] == pytest.approx(100 * 4 / 8)  # a rejected triggered image is not attacked
    assert m["asr_excl"] == pytest.approx(100 * 3 / 6)  # non-target images 0,1,2,4,5,6: hits 0,1,2,4,5, 0,1 rejected
    assert m["rejected_clean"] == pytest.approx(25.0) and m["rejected_triggered"] == pytest.approx(25.0)
    # a screen that accepts everything gives exactly the plain scores
    everything = torch.ones(8, dtype=torch.bool)
    plain = evaluation.score(pred_clean, pred_trig, labels, 3)
    screened = screening.score_screened(pred_clean, everything, pred_trig, everything, labels, 3)
    assert {k: screened[k] for k in plain} == plain
    assert screened["rejected_clean"] == screened["rejected_triggered"] == 0.0


def test_a_plain_encoder_evaluates_exactly_as_before(backdoored, task_data, ci_profile):
    encoder, trigger, target, _ = backdoored
    cfg = dataclasses.replace(ci_profile.evaluate, epochs=2)
    before = evaluation.evaluate_encoder(encoder, *task_data, trigger, target, cfg, _ctx(1))
    through = screening.evaluate_screened_encoder(encoder, *task_data, trigger, target, cfg, _ctx(1))
    assert {k: through[k] for k in before} == before
    assert through["rejected_train"] == through["rejected_clean"] == through["rejected_triggered"] == 0.0


def test_only_a_screening_defense_puts_the_screening_rules_in_an_evaluate_key():
    profile = load_profile("ci")
    suspect = attack_stage(profile, "badencoder", PRETRAIN, TASK)  # planned, not run
    plain_eval = evaluate_stage(profile, defend_stage(profile, "ft", suspect, PRETRAIN), TASK, None, None)
    assert plain_eval.code == code_version("defbench.benchmark.pipeline.evaluate", INPUTS)  # as before this change
    dede_eval = evaluate_stage(profile, defend_stage(profile, "dede", suspect, PRETRAIN), TASK, None, None)
    assert dede_eval.code == code_version("defbench.benchmark.pipeline.evaluate", INPUTS, SCREENING)


# ----------------------------------------------------------------- on the ci BadEncoder encoder

@pytest.fixture(scope="module")
def ci_dede(ci_env, ci_stages):
    """DeDe at the ci profile on the ci BadEncoder encoder, through the pipeline (defend + evaluate stages)."""
    profile = load_profile("ci")
    suspect = ci_stages[1]
    defended = defend_stage(profile, "dede", suspect, PRETRAIN)
    evaluation_stage = evaluate_stage(profile, defended, TASK, suspect.spec["trigger"], suspect.spec["target"],
                                      role="defended", defense="dede", attack="badencoder", pretrain=PRETRAIN)
    outcomes = run_grid([evaluation_stage], ci_env, show_progress=False)
    assert all(o.status in ("ran", "cached") for o in outcomes), [o.error for o in outcomes]
    return defended, evaluation_stage


@pytest.mark.slow
def test_triggered_inputs_reconstruct_worse_than_clean_ones(ci_dede, ci_env, backdoored, task_data):
    screened = load_stage_encoder(ci_env, ci_dede[0]).eval()
    assert is_screened(screened)
    _, trigger, _, _ = backdoored
    x = to_float(task_data[1].images, "cpu")
    clean, triggered = screened.scores(x), screened.scores(trigger.apply(x))  # the test stamps; the defense never did
    assert triggered.mean() > clean.mean()
    # the clean-image error that sets the threshold: triggered images are rejected more often than clean ones
    assert (triggered > screened.threshold).float().mean() > (clean > screened.threshold).float().mean()


@pytest.mark.slow
def test_the_pipeline_stores_the_screen_and_counts_its_rejections(ci_dede, ci_env):
    defended, evaluation_stage = ci_dede
    folder = ci_env.store.path(defended.kind, defended.key)
    assert (folder / "screen.pt").is_file() and (folder / "encoder.pt").is_file()
    first, second = load_stage_encoder(ci_env, defended), load_stage_encoder(ci_env, defended)
    x = torch.rand(16, 3, 32, 32)
    assert torch.equal(first.accept(x), second.accept(x)) and first.threshold == second.threshold
    meta = ci_env.store.read_meta("evaluate", evaluation_stage.key)
    result = meta["result"]
    for key in ("rejected_train", "rejected_clean", "rejected_triggered", "acc_accepted"):
        assert key in result and math.isfinite(result[key])
    row = record_evaluation(evaluation_stage, ci_env)
    assert row["extra"]["rejected_triggered"] == result["rejected_triggered"]
    assert row["acc"] == result["acc"] <= result["acc_accepted"]
