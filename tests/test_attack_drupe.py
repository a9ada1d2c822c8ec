"""DRUPE: its terms, its adaptive weights and checkpoint choice, and what it does to a BadEncoder-style attack."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PRETRAIN, TASK
from defbench.attacks import ATTACKS, AttackInputs, PatchTrigger
from defbench.attacks.drupe import (DRUPEConfig, DRUPEState, drupe_loss, mean_pairwise_cosine,
                                    sliced_wasserstein)
from defbench.benchmark.pipeline.evaluate import evaluate_encoder
from defbench.encoders import SimCLRConfig, build_encoder


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


def test_mean_pairwise_cosine_leaves_out_the_diagonal():
    same = torch.ones(5, 4)
    assert mean_pairwise_cosine(same).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)).item() == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-1.0)


def test_config_is_the_authors_main_py_and_checks_the_assignment():
    comp = ATTACKS.get("drupe")
    assert {"paper", "tiny", "ci"} <= set(comp.profiles) and comp.options.needs_clean_encoder is True
    paper = comp.make_config("paper")
    assert (paper.epochs, paper.lr, paper.batch_size, paper.n_reference, paper.n_projections) == (200, 1e-3, 256, 3, 50)
    assert (paper.shadow_images, paper.reference_assignment, paper.warmup_epochs, paper.main_phase_from) == \
        (10000, "nearest", 1, 5)
    assert (paper.sw_weight, paper.angular_weight, paper.adapt_after, paper.select_after) == (1e-3, 0.1, 20, 24)
    assert (paper.weight_up, paper.weight_down, paper.patience) == (1.25, 1.25 ** 1.25, 1)
    assert (paper.l0_threshold, paper.utility_threshold, paper.spread_threshold) == (-0.96, -0.9, 0.6)
    with pytest.raises(ValueError, match="reference_assignment"):
        DRUPEConfig(reference_assignment="closest")


# ------------------------------------------------------------------ the schedule (DRUPEState)
MET, MISSED = [-0.99, -0.95, -0.95], [-0.5, -0.95, -0.95]  # epoch means of L0, L1, L2


def _state(**kw):
    return DRUPEState(DRUPEConfig(**kw))


def test_phases_follow_the_epoch():
    state = _state(warmup_epochs=1, main_phase_from=5)
    phases = []
    for epoch in range(1, 7):
        phases.append(state.phase)
        state.end_epoch(epoch, nn.Linear(1, 1), MET)
    assert phases == ["warmup", "stage1", "stage1", "stage1", "main", "main"]


def test_weights_stay_put_until_adapt_after_then_follow_the_authors_rule():
    state = _state(adapt_after=2, select_best=False)
    model = nn.Linear(1, 1)
    state.last_spread = 0.55  # below the 0.6 gate, above 0.5: no skipped increase
    for epoch in (1, 2):
        state.end_epoch(epoch, model, MET)
    assert (state.sw_weight, state.angular_weight) == (1e-3, 0.1)
    state.end_epoch(3, model, MET)  # goals met, spread below the gate: both weights up by 1.25
    assert state.sw_weight == pytest.approx(1e-3 * 1.25) and state.angular_weight == pytest.approx(0.1 * 1.25)
    state.end_epoch(4, model, MISSED)  # goals missed: both down by 1.25 ** 1.25
    assert state.sw_weight == pytest.approx(1e-3 * 1.25 / 1.25 ** 1.25)
    assert state.angular_weight == pytest.approx(0.1 * 1.25 / 1.25 ** 1.25)
    state.last_spread = 0.7  # goals met but the triggered embeddings still bunch: only the angular weight rises
    sw = state.sw_weight
    state.end_epoch(5, model, MET)
    assert state.sw_weight == pytest.approx(sw / 1.25 ** 1.25)
    assert state.angular_weight == pytest.approx(0.1 * 1.25 / 1.25 ** 1.25 * 1.25)
    assert state.weights[-1] == [sw, pytest.approx(0.1 * 1.25 / 1.25 ** 1.25)]  # the weights the epoch used


def test_a_low_spread_skips_the_next_increase_of_the_angular_weight():
    state = _state(adapt_after=0, warmup_epochs=0, select_best=False)
    model = nn.Linear(1, 1)
    state.last_spread = 0.3  # below 0.6 - 0.1
    state.end_epoch(1, model, MET)
    assert state.angular_weight == pytest.approx(0.125) and state.sw_weight == pytest.approx(1.25e-3)
    state.end_epoch(2, model, MET)  # the counter was set back: no increase this time, SW weight still rises
    assert state.angular_weight == pytest.approx(0.125) and state.sw_weight == pytest.approx(1.25 ** 2 * 1e-3)
    state.end_epoch(3, model, MET)
    assert state.angular_weight == pytest.approx(0.125)


def test_checkpoint_is_the_epoch_with_the_smallest_sw_among_those_that_met_the_goals():
    state = _state(adapt_after=0, warmup_epochs=0, select_after=1)
    model = nn.Linear(1, 1)
    runs = [(MET, 0.5, 3.0), (MET, 0.5, 2.0), (MET, 0.5, 1.0), (MISSED, 0.5, 0.1), (MET, 0.9, 0.05), (MET, 0.5, 1.5)]
    for epoch, (means, spread, sw) in enumerate(runs, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        state.last_spread, state.last_sw = spread, sw
        state.end_epoch(epoch, model, means)
    # epoch 1 is too early; 4 missed the goals and 5 the spread gate, however small their SW
    assert state.best_epoch == 3 and state.best == 1.0 and state.best_state["weight"].item() == 3


# ------------------------------------------------------------------ the loss and each term
class _Linear:
    """A stand-in encoder: ``features`` is a linear map of the flattened image."""

    def __init__(self, weight):
        self.weight = weight

    def features(self, x):
        return x.flatten(1) @ self.weight


def _batch(seed=0, b=16, r=3, d=12):
    g = _gen(seed)
    x = torch.rand(b, 3, 2, 2, generator=g)
    trig = x.clone()
    trig[..., 0, 0] = 1.0  # a "patch"
    refs = torch.rand(r, 3, 2, 2, generator=g)
    return x, trig, refs, refs.repeat(2, 1, 1, 1), torch.randn(12, d, generator=g)


def _loss(state, weight=None, seed=0, **cfg):
    x, trig, refs, refs_aug, w = _batch(seed)
    w = w if weight is None else weight
    return drupe_loss(_Linear(w), _Linear(w.detach()), x, trig, refs, refs_aug, DRUPEConfig(**cfg), state, _gen(1))


def test_loss_terms_match_their_definitions():
    state = _state()
    state.epoch = 10
    total, l0, l1, l2, sw, spread, ref_std, ref_sim = _loss(state)
    x, trig, refs, _, w = _batch()
    z_t, z_r = (F.normalize(t.flatten(1) @ w, dim=1) for t in (trig, refs))
    cos = z_t @ z_r.t()
    assert l0.item() == pytest.approx(-cos.max(1).values.mean().item(), abs=1e-6)  # nearest reference
    assert ref_std.item() == pytest.approx(cos.mean(0).std().item(), abs=1e-6)
    r = z_r @ z_r.t()
    assert ref_sim.item() == pytest.approx((r.trace() + r.triu(1).sum()).item() / 6, abs=1e-6)  # i <= j
    assert spread.item() == pytest.approx(mean_pairwise_cosine(z_t).item(), abs=1e-6)
    assert l1.item() == pytest.approx(-1.0, abs=1e-5) and l2.item() == pytest.approx(-1.0, abs=1e-5)  # f' = f
    assert state.last_spread == pytest.approx(spread.item())
    assert state.last_sw == pytest.approx(sw.item() * (x.flatten(1) @ w).std(0).mean().item(), rel=1e-5)
    separation = ref_sim if ref_sim > 0.5 else 0.2 * ref_sim if ref_sim > 0.4 else 0.0
    expected = (l0 + l1 + l2 + 0.1 * (ref_std + spread) + 1e-3 * sw + (2.0 if ref_std > 0.1 else 0.5) * ref_std
                + separation)
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    _, l0_all, *_ = _loss(state, reference_assignment="all")
    assert l0_all.item() == pytest.approx(-cos.mean().item(), abs=1e-6)  # BadEncoder's mean over pairs


def test_warmup_leaves_the_triggered_inputs_alone_and_stage1_has_no_sw_or_angular_term():
    state = _state()
    x, trig, refs, refs_aug, w = _batch()
    w.requires_grad_(True)
    model, clean = _Linear(w), _Linear(w.detach())
    warm = drupe_loss(model, clean, x, trig * 0.3, refs, refs_aug, DRUPEConfig(), state, _gen(1))[0]
    assert warm.item() == pytest.approx(drupe_loss(model, clean, x, trig, refs, refs_aug, DRUPEConfig(), state,
                                                   _gen(1))[0].item())
    state.epoch = 2
    loose = _state(sw_weight=100.0, angular_weight=100.0)
    loose.epoch = 2
    assert _loss(state)[0].item() == pytest.approx(_loss(loose)[0].item())  # the weights play no part yet
    loose.epoch = state.epoch = 5
    assert _loss(loose)[0].item() > _loss(state)[0].item() + 1


def _descend(weight_fields, steps=60):
    """SGD on the stand-in encoder in the main phase; returns (SW/std, spread) at the end."""
    w = _batch()[4].clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.05)
    clean = w.detach().clone()
    state = _state(**weight_fields)
    state.epoch = 10
    x, trig, refs, refs_aug, _ = _batch()
    cfg = DRUPEConfig(**weight_fields)
    for step in range(steps):
        loss = drupe_loss(_Linear(w), _Linear(clean), x, trig, refs, refs_aug, cfg, state, _gen(step))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = drupe_loss(_Linear(w), _Linear(clean), x, trig, refs, refs_aug, cfg, state, _gen(0))
    return out[4].item(), out[5].item()


def test_the_sw_term_pulls_triggered_embeddings_onto_the_clean_ones():
    sw_off, _ = _descend({"sw_weight": 0.0, "angular_weight": 0.0})
    sw_on, _ = _descend({"sw_weight": 3.0, "angular_weight": 0.0})
    assert sw_on < 0.7 * sw_off, (sw_on, sw_off)


def test_the_angular_term_spreads_the_triggered_embeddings():
    _, spread_off = _descend({"sw_weight": 0.0, "angular_weight": 0.0})
    _, spread_on = _descend({"sw_weight": 0.0, "angular_weight": 10.0})
    assert spread_on < spread_off - 0.3, (spread_on, spread_off)


# ------------------------------------------------------------------ the attack on real encoders
def _toy_inputs():
    torch.manual_seed(0)
    clean = build_encoder(width=8).eval()
    shadow = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    return AttackInputs(clean.config, shadow, targets, PatchTrigger(), SimCLRConfig(), clean_encoder=clean)


def test_returned_encoder_is_the_selected_epoch_and_batchnorm_stays_frozen(ctx):
    comp = ATTACKS.get("drupe")
    easy = {"epochs": 4, "batch_size": 32, "main_phase_from": 2, "adapt_after": 1, "select_after": 1,
            "l0_threshold": 1.0, "utility_threshold": 1.0, "spread_threshold": 2.0}  # goals always met
    attacked = comp.fn(_toy_inputs(), comp.config(**easy), ctx.reseed(0))
    selected, weights = ctx.records["selected_epoch"], ctx.records["weight_history"]
    assert 2 <= selected <= 4 and len(ctx.records["loss_history"]) == 4
    assert [round(w[0] / 1e-3, 4) for w in weights] == [1.0, 1.0, 1.25, 1.5625]  # rises after epoch 2 and 3
    again = comp.fn(_toy_inputs(), comp.config(**{**easy, "epochs": selected, "select_best": False}), ctx.reseed(0))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in attacked.state_dict().items())
    clean = _toy_inputs().clean_encoder
    bn = {k: v for k, v in clean.state_dict().items() if "bn" in k or "downsample.1" in k}
    assert len(bn) > 40 and all(torch.equal(v, attacked.state_dict()[k]) for k, v in bn.items())
    assert torch.equal(clean.head[0].weight, attacked.head[0].weight)  # only the backbone trains
    assert not torch.equal(clean.backbone.conv1.weight, attacked.backbone.conv1.weight)


def _mechanism(encoder, trigger, images):
    x = images[:256].float() / 255
    with torch.no_grad():
        f_clean, f_trig = encoder.features(x), encoder.features(trigger.apply(x))
    sw = sliced_wasserstein(f_trig, f_clean, 200, _gen()) / f_clean.std(0).mean()
    return sw.item(), mean_pairwise_cosine(f_trig).item()


def _pull(encoder, trigger, images, target_images):
    """How much the trigger moves an image's feature towards the target class: the mean cosine to the target
    class's feature centroid, triggered minus clean (the attack's own effectiveness goal, without a probe)."""
    x, refs = images[:256].float() / 255, target_images[:256].float() / 255
    with torch.no_grad():
        centroid = F.normalize(F.normalize(encoder.features(refs), dim=1).mean(0), dim=0)
        cos = [F.normalize(encoder.features(v), dim=1) @ centroid for v in (trigger.apply(x), x)]
    return (cos[0] - cos[1]).mean().item()


@pytest.fixture(scope="module")
def drupe_ci(ci_profile, ci_env, ci_stages):
    """DRUPE as the ci profile runs it, on the BadEncoder fixture's pre-training set, task and trigger."""
    from defbench.benchmark.pipeline.plan import attack_stage
    from defbench.benchmark.pipeline.scheduler import run_grid
    from defbench.benchmark.pipeline.stages import load_stage_encoder
    stage = attack_stage(ci_profile, "drupe", PRETRAIN, TASK)
    assert stage.spec["trigger"] == ci_stages[1].spec["trigger"] and stage.spec["target"] == ci_stages[1].spec["target"]
    outcome = next(o for o in run_grid([stage], ci_env, show_progress=False) if o.stage.key == stage.key)
    assert outcome.status in ("ran", "cached"), outcome.error
    return load_stage_encoder(ci_env, stage).eval()


@pytest.mark.slow
def test_drupe_ci_implants_a_backdoor_hidden_better_than_badencoders(drupe_ci, clean_encoder, backdoored,
                                                                     task_data, ci_profile, ctx):
    bad, trigger, target, _ = backdoored
    train, test = task_data
    clean = evaluate_encoder(clean_encoder, train, test, trigger, target, ci_profile.evaluate, ctx.reseed(1))
    attacked = evaluate_encoder(drupe_ci, train, test, trigger, target, ci_profile.evaluate, ctx.reseed(1))
    sw_drupe, spread_drupe = _mechanism(drupe_ci, trigger, test.images)
    sw_bad, spread_bad = _mechanism(bad, trigger, test.images)
    refs = train.images[train.labels == target]
    pull_clean, pull_drupe = (_pull(encoder, trigger, test.images, refs) for encoder in (clean_encoder, drupe_ci))
    print(f"clean {clean}, drupe {attacked}; SW/std, spread: drupe {sw_drupe:.3f}, {spread_drupe:.3f}, "
          f"badencoder {sw_bad:.3f}, {spread_bad:.3f}; pull to the target: clean {pull_clean:.3f}, "
          f"drupe {pull_drupe:.3f}")
    # At ci on generator v5 DRUPE implants weakly (higher lr or 10 epochs did not help: docs/methods/drupe.md), and
    # how weakly moves with the CPU's rounding. Measured on three 2-core CPUs, clean -> DRUPE: ASR 14.0 -> 29.3,
    # 19.7 -> 27.5, 13.7 -> 26.5; the trigger's pull towards the target class's centroid (the attack's own goal,
    # no probe) -0.018 -> 0.057 and 0.017 -> 0.047 (BadEncoder 0.170 and 0.179). So: a pull above the clean
    # encoder's by a margin under the smallest lead measured, and the ASR up by more than its sampling error.
    assert pull_drupe > pull_clean + 0.02, (pull_clean, pull_drupe)
    assert attacked["asr_all"] > clean["asr_all"] + 5, (clean, attacked)
    assert attacked["acc"] > clean["acc"] - 15, (clean, attacked)  # utility mostly kept
    assert sw_drupe < sw_bad, (sw_drupe, sw_bad)  # triggered embeddings closer in distribution to clean ones
    assert spread_drupe < spread_bad, (spread_drupe, spread_bad)  # and less bunched together
    before, after = _bn_state(clean_encoder), _bn_state(drupe_ci)
    assert before.keys() == after.keys() and len(before) > 40
    assert all(torch.equal(before[n], after[n]) for n in before), "a BatchNorm drifted during DRUPE"
    assert torch.equal(clean_encoder.head[0].weight, drupe_ci.head[0].weight)  # only the backbone trains


def _bn_state(encoder):
    return {n: t.clone() for n, t in encoder.state_dict().items() if any(k in n for k in ("bn", "downsample.1"))}


@pytest.mark.slow
def test_main_phase_hides_a_collapsed_backdoor_better_than_its_loss_without_the_new_terms(backdoored, clean_data,
                                                                                        task_data, ctx):
    """Started from BadEncoder's tight cluster of triggered embeddings, the same run with DRUPE's SW and angular
    terms ends with triggered embeddings closer in distribution to the clean ones and less bunched than the run
    with both weights at 0 (BadEncoder's loss with the nearest-reference L0)."""
    encoder, trigger, target, _ = backdoored
    train, _ = task_data
    comp = ATTACKS.get("drupe")
    inputs = AttackInputs(encoder.config, clean_data.images, train.images[train.labels == target], trigger,
                          SimCLRConfig(), clean_encoder=encoder)
    ends = {}
    for name, weights in (("drupe", {"sw_weight": 0.1}), ("without", {"sw_weight": 0.0, "angular_weight": 0.0})):
        cfg = comp.make_config("ci", {"epochs": 3, "shadow_images": 256, "batch_size": 64, "warmup_epochs": 0,
                                      "main_phase_from": 1, **weights})  # the main phase from the start
        comp.fn(inputs, cfg, ctx.reseed(0))
        history = ctx.records["loss_history"]
        ends[name] = (history[-1][3], history[-1][4])  # SW / std, spread of the last epoch
    print(f"last epoch (SW/std, spread): {ends}")
    assert ends["drupe"][0] < ends["without"][0] and ends["drupe"][1] < ends["without"][1], ends
