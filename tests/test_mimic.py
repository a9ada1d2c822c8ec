"""MIMIC and its MINE estimator: the student is fresh, the teacher frozen, beta follows MI, the
ablation switches remove their term, MINE separates dependent from independent pairs, and the
distilled encoder lowers the ci backdoor's ASR."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defbench.defenses import CleanData, get_defense
from defbench.defenses import mimic as mimic_mod
from defbench.defenses.mimic import MIMICConfig, mi_weights, mimic_loss, uniform_weights
from defbench.defenses.mutual_information import MINEConfig, StatisticsNetwork, dv_bound, estimate_mi
from defbench.encoders import build_encoder, frozen_copy

LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _fast_cfg(**kw) -> MIMICConfig:
    """The ci profile's settings, shortened further for mechanics tests."""
    values = {**get_defense("mimic").profiles["ci"], "epochs": 1, "mi_epochs": 2, **kw}
    return MIMICConfig(**values)


def _small_clean(clean_data: CleanData, n: int = 128) -> CleanData:
    return CleanData(clean_data.images[:n])


def _state(encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def _conv_weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone") and v.ndim == 4}


# ----------------------------------------------------------------- MINE

def test_statistics_network_is_a_linear_on_the_concatenation():
    torch.manual_seed(0)
    net = StatisticsNetwork(6, 3, hidden=16)
    a, z = torch.randn(10, 6), torch.randn(10, 3)
    first = torch.nn.Linear(9, 16)
    with torch.no_grad():
        first.weight.copy_(torch.cat([net.w_a, net.w_z], 1))
        first.bias.copy_(net.b1)
    expected = net.tail(first(torch.cat([a, z], 1))).squeeze(1)
    assert torch.allclose(net(a, z), expected, atol=1e-6)
    perm = torch.randperm(10)
    joint, marginal = net.joint_and_marginal(a, z, perm)
    assert torch.allclose(joint, net(a, z), atol=1e-6)
    assert torch.allclose(marginal, net(a, z[perm]), atol=1e-6)
    # the initial weights have the scale of one Linear(9, 16): bound 1/sqrt(9)
    assert net.w_a.abs().max() <= 1 / math.sqrt(9) + 1e-6


def test_dv_bound_is_stable_for_large_values():
    t = torch.full((8,), 1000.0)
    assert dv_bound(t, t).item() == pytest.approx(0.0, abs=1e-4)


def test_mine_higher_for_dependent_pairs_than_independent():
    g = torch.Generator().manual_seed(0)
    n = 1024
    a = torch.randn(n, 8, generator=g)
    z_dep = a[:, :4] @ torch.randn(4, 4, generator=g) + 0.1 * torch.randn(n, 4, generator=g)
    z_ind = torch.randn(n, 4, generator=g)
    cfg = MINEConfig(epochs=25, hidden=128, last=5)
    torch.manual_seed(0)
    dep = estimate_mi(a, z_dep, cfg, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ind = estimate_mi(a, z_ind, cfg, generator=torch.Generator().manual_seed(1))
    assert dep.mi > 1.0, dep.history
    assert ind.mi < 0.2, ind.history
    assert dep.mi > ind.mi + 0.8
    assert len(dep.history) == 25 and ind.mi >= 0.0


def test_mine_clips_negative_estimates_to_zero():
    res = estimate_mi(torch.randn(64, 3), torch.randn(64, 2), MINEConfig(epochs=1, hidden=8, last=1))
    assert res.mi >= 0.0 and math.isfinite(res.mi)
    assert res.mi == (res.raw if res.raw > 0 else 0.0)


# ----------------------------------------------------------------- weight scheduler

def test_mi_weights_formula():
    mi = {"layer1": 0.1, "layer2": 0.2, "layer3": 0.3, "layer4": 0.4}
    beta = mi_weights(mi, 1000.0, 10000.0)
    assert beta == pytest.approx({"layer1": 2000.0, "layer2": 3000.0, "layer3": 4000.0, "layer4": 5000.0})
    # all-zero MI (every estimate negative): uniform shares, same total as the MI schedule
    zero = mi_weights(dict.fromkeys(LAYERS, 0.0), 1000.0, 10000.0)
    assert zero == uniform_weights(LAYERS, 1000.0, 10000.0) == dict.fromkeys(LAYERS, 3500.0)


@pytest.mark.parametrize("switch", ["use_clone", "use_contrastive", "use_attention"])
def test_a_switched_off_term_is_absent_from_the_history_not_a_divergence(switch, backdoored, clean_data, ctx):
    """The components study switches terms off; a NaN placeholder for the absent term made the harness's loss
    check fail every such arm as 'training diverged' (found on the tiny components study)."""
    from types import SimpleNamespace

    from defbench.benchmark.pipeline.stages import _check_losses
    teacher = frozen_copy(backdoored[0])
    student = teacher.empty_like()
    beta = uniform_weights(teacher.stage_names, 1000.0, 10000.0)
    history = mimic_mod.distill(student, teacher, _small_clean(clean_data, 64).images, beta,
                                _fast_cfg(**{switch: False}), ctx)
    absent = {"use_clone": 0, "use_contrastive": 1, "use_attention": 2}[switch]
    assert history[-1][absent] is None
    assert all(math.isfinite(v) for i, v in enumerate(history[-1]) if i != absent)
    _check_losses(SimpleNamespace(label="mimic"), {"loss_history": history})  # no NonFiniteError


def _spy_distill(monkeypatch):
    """Replace distill by a recorder (no training): returns the list of (student, teacher, beta) calls."""
    calls = []

    def fake(student, teacher, images, beta, cfg, ctx):
        calls.append({"student": student, "teacher": teacher, "beta": dict(beta),
                      "student_state": _state(student)})
        return []
    monkeypatch.setattr(mimic_mod, "distill", fake)
    return calls


def test_beta_follows_the_estimated_mi(monkeypatch, backdoored, clean_data, ctx):
    given = {"layer1": 0.05, "layer2": 0.5, "layer3": 0.15, "layer4": 0.3}
    seen = []

    def fake_mi(encoder, images, cfg, ctx):
        seen.append(encoder)
        return {k: {"mi": v, "raw": v, "history": [v]} for k, v in given.items()}
    monkeypatch.setattr(mimic_mod, "estimate_stage_mi", fake_mi)
    calls = _spy_distill(monkeypatch)
    cfg = _fast_cfg(alpha0=100.0, alpha1=2000.0)
    mimic_mod.mimic(backdoored[0].clone(), _small_clean(clean_data), cfg, ctx)
    expected = {k: 100.0 + 2000.0 * v / sum(given.values()) for k, v in given.items()}
    assert ctx.records["mi"] == given
    assert ctx.records["beta"] == pytest.approx(expected)
    assert calls[0]["beta"] == pytest.approx(expected)  # what the distillation actually uses
    assert seen[0] is calls[0]["student"]  # the default: MI on the fresh student, as the authors' code


def test_mi_source_teacher_estimates_on_the_suspect(monkeypatch, backdoored, clean_data, ctx):
    seen = []

    def fake_mi(encoder, images, cfg, ctx):
        seen.append(encoder)
        return {k: {"mi": 1.0, "raw": 1.0, "history": []} for k in LAYERS}
    monkeypatch.setattr(mimic_mod, "estimate_stage_mi", fake_mi)
    calls = _spy_distill(monkeypatch)
    mimic_mod.mimic(backdoored[0].clone(), _small_clean(clean_data), _fast_cfg(mi_source="teacher"), ctx)
    assert seen[0] is calls[0]["teacher"]


def test_mi_source_decides_which_network_the_recorded_mi_comes_from(monkeypatch, backdoored, clean_data, ctx):
    """Real MINE runs, no fake estimator: the MI that ``mimic`` records is, to the last bit, the estimate on the
    network ``mi_source`` names (the student drawn from the same seed, untrained; or the suspect), and the two
    networks give different estimates (compared before the clip to 0, which could make both zero)."""
    calls = _spy_distill(monkeypatch)
    images = _small_clean(clean_data).images
    suspect = backdoored[0]
    recorded = {}
    for name in ("student", "teacher"):
        ctx.reseed(11)
        mimic_mod.mimic(suspect.clone(), CleanData(images), _fast_cfg(mi_source=name, mi_epochs=3, mi_hidden=32), ctx)
        recorded[name] = ctx.records["mi_raw"]

    def estimate_on(network_of: str) -> dict:
        ctx.reseed(11)
        student = suspect.clone().empty_like()  # the same draw as mimic's first random numbers
        network = student if network_of == "student" else frozen_copy(suspect)
        est = mimic_mod.estimate_stage_mi(network, images, _fast_cfg(mi_epochs=3, mi_hidden=32), ctx)
        return {k: v["raw"] for k, v in est.items()}

    assert recorded["student"] == estimate_on("student")
    assert recorded["teacher"] == estimate_on("teacher")
    assert recorded["student"] != recorded["teacher"]
    assert len(calls) == 2  # each estimate was followed by the distillation (here a recorder)


def test_uniform_beta_without_mi(monkeypatch, backdoored, clean_data, ctx):
    def no_mi(*args, **kwargs):
        raise AssertionError("use_mi=False must not estimate MI")
    monkeypatch.setattr(mimic_mod, "estimate_stage_mi", no_mi)
    calls = _spy_distill(monkeypatch)
    mimic_mod.mimic(backdoored[0].clone(), _small_clean(clean_data), _fast_cfg(use_mi=False), ctx)
    assert calls[0]["beta"] == pytest.approx(dict.fromkeys(LAYERS, 1000.0 + 10000.0 / 4))
    assert "mi" not in ctx.records


def test_mi_estimation_runs_on_real_stages(backdoored, clean_data, ctx):
    est = mimic_mod.estimate_stage_mi(backdoored[0], _small_clean(clean_data).images,
                                      _fast_cfg(mi_epochs=2, mi_hidden=32), ctx)
    assert list(est) == list(LAYERS)
    assert all(v["mi"] >= 0 and math.isfinite(v["mi"]) and len(v["history"]) == 2 for v in est.values())


def test_stage_table_pools_and_normalises(backdoored, clean_data):
    enc = backdoored[0]
    table, z = mimic_mod.stage_table(enc, clean_data.images[:8], torch.device("cpu"), pool=4)
    c = enc.config.width
    assert {k: v.shape[1] for k, v in table.items()} == {"layer1": c * 16, "layer2": 2 * c * 16,
                                                         "layer3": 4 * c * 16, "layer4": 8 * c * 16}
    assert torch.allclose(z.norm(dim=1), torch.ones(8), atol=1e-5)
    flat, _ = mimic_mod.stage_table(enc, clean_data.images[:8], torch.device("cpu"), pool=0)
    assert flat["layer1"].shape[1] == c * 32 * 32


# ----------------------------------------------------------------- student and teacher

def test_student_starts_from_fresh_weights(monkeypatch, backdoored, clean_data, ctx):
    calls = _spy_distill(monkeypatch)
    suspect = backdoored[0].clone()
    teacher_state = _conv_weights(_state(suspect))
    out = mimic_mod.mimic(suspect, _small_clean(clean_data), _fast_cfg(use_mi=False), ctx)
    assert out is calls[0]["student"] and out is not suspect
    start = _conv_weights(calls[0]["student_state"])
    for name, w in teacher_state.items():
        rel = ((start[name] - w).norm() / w.norm()).item()
        assert rel > 0.8, f"student's {name} starts {rel:.2f} (relative) from the teacher's"
    student_ptrs = {p.data_ptr() for p in out.parameters()}
    assert not student_ptrs & {p.data_ptr() for p in suspect.parameters()}
    assert out.config == suspect.config


def test_trained_student_is_not_the_teacher(backdoored, clean_data, ctx):
    suspect = backdoored[0].clone()
    teacher_state = _conv_weights(_state(suspect))
    out = mimic_mod.mimic(suspect, _small_clean(clean_data), _fast_cfg(use_mi=False), ctx)
    after = _conv_weights(_state(out))
    assert all(((after[k] - w).norm() / w.norm()).item() > 0.8 for k, w in teacher_state.items())


def test_teacher_is_frozen_and_unchanged(monkeypatch, backdoored, clean_data, ctx):
    teachers, grad_modes = [], []
    real_frozen_copy = mimic_mod.frozen_copy

    def spy(encoder):
        teacher = real_frozen_copy(encoder)
        # stages() is a method, so hook the first module it calls
        teacher.backbone.conv1.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
        teachers.append(teacher)
        return teacher
    monkeypatch.setattr(mimic_mod, "frozen_copy", spy)
    suspect = backdoored[0].clone().train()  # even a suspect handed over in train mode
    before = _state(suspect)
    mimic_mod.mimic(suspect, _small_clean(clean_data), _fast_cfg(mi_epochs=1, mi_hidden=16), ctx)
    teacher = teachers[0]
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert grad_modes and not any(grad_modes), "the teacher ran with gradients enabled"
    for k, v in _state(teacher).items():  # weights and BatchNorm statistics
        assert torch.equal(v, before[k]), k
    for k, v in _state(suspect).items():  # the caller's encoder too
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in suspect.parameters())


# ----------------------------------------------------------------- the loss and its switches

@pytest.fixture(scope="module")
def loss_setup():
    torch.manual_seed(0)
    teacher = frozen_copy(build_encoder(width=8))
    student = build_encoder(width=8).eval()  # eval: identical BatchNorm output whatever the batch holds
    g = torch.Generator().manual_seed(1)
    v1, v2, x = (torch.rand(6, 3, 32, 32, generator=g) for _ in range(3))
    beta = {"layer1": 1500.0, "layer2": 2500.0, "layer3": 3500.0, "layer4": 4500.0}
    return student, teacher, v1, v2, x, beta


def _expected_parts(student, teacher, v1, v2, beta, cfg, x=None):
    d = x if cfg.distill_input == "clean" else v1
    with torch.no_grad():
        s, t = student.stages(d), teacher.stages(d)
        l0 = -F.cosine_similarity(s["feature"], t["feature"]).mean()
        l1 = mimic_mod.nt_xent(student.project(v1), student.project(v2), cfg.temperature)
        l2 = sum(w * mimic_mod.attention_loss(s[k], t[k], cfg.p) for k, w in beta.items())
    return {"l0": l0, "l1": l1, "l2": l2}


@pytest.mark.parametrize("distill_input", ["view", "clean"])
def test_loss_terms_match_their_definitions(loss_setup, distill_input):
    student, teacher, v1, v2, x, beta = loss_setup
    cfg = MIMICConfig(lambda0=0.7, lambda1=0.3, lambda2=2.0, distill_input=distill_input)
    total, parts = mimic_loss(student, teacher, v1, v2, beta, cfg, x)
    exp = _expected_parts(student, teacher, v1, v2, beta, cfg, x)
    for k in ("l0", "l1", "l2"):
        assert parts[k].item() == pytest.approx(exp[k].item(), rel=1e-4, abs=1e-6), k
    assert total.item() == pytest.approx(0.7 * exp["l0"].item() + 0.3 * exp["l1"].item()
                                         + 2.0 * exp["l2"].item(), rel=1e-4)


def test_each_view_is_its_own_batchnorm_batch_in_training(loss_setup):
    """As the reference's ``snet(im_1)``, ``snet(im_2)``: in train mode the contrastive term sees each view
    normalised over its own B images, not over the 2B of a joint pass (which gives a different value)."""
    _, teacher, v1, v2, _, beta = loss_setup
    student = build_encoder(width=8).train()
    cfg = MIMICConfig(use_clone=False, use_attention=False)
    _, parts = mimic_loss(student, teacher, v1, v2, beta, cfg)
    with torch.no_grad():
        per_view = mimic_mod.nt_xent(student.project(v1), student.project(v2), cfg.temperature)
        joint = mimic_mod.nt_xent(*student.project(torch.cat([v1, v2])).chunk(2), cfg.temperature)
    assert parts["l1"].item() == pytest.approx(per_view.item(), rel=1e-5)
    assert abs(joint.item() - per_view.item()) > 1e-3


@pytest.mark.parametrize("switch,term,weight", [("use_clone", "l0", "lambda0"),
                                                ("use_contrastive", "l1", "lambda1"),
                                                ("use_attention", "l2", "lambda2")])
def test_each_switch_removes_exactly_its_term(loss_setup, switch, term, weight):
    student, teacher, v1, v2, x, beta = loss_setup
    full_cfg = MIMICConfig()
    full, parts = mimic_loss(student, teacher, v1, v2, beta, full_cfg)
    off, off_parts = mimic_loss(student, teacher, v1, v2, beta, MIMICConfig(**{switch: False}))
    assert term not in off_parts
    assert off.item() == pytest.approx(full.item() - getattr(full_cfg, weight) * parts[term].item(), rel=1e-4)


def test_switched_off_terms_do_no_work(loss_setup, monkeypatch):
    student, teacher, v1, v2, x, beta = loss_setup
    # contrastive only: the teacher is never run
    def teacher_ran(*_):
        raise AssertionError("the teacher ran although no term needs it")
    monkeypatch.setattr(teacher, "stages", teacher_ran)
    total, _ = mimic_loss(student, teacher, v1, v2, beta, MIMICConfig(use_clone=False, use_attention=False))
    monkeypatch.undo()
    # no contrastive term: the projection head gets no gradient
    student.zero_grad(set_to_none=True)
    total, _ = mimic_loss(student, teacher, v1, v2, beta, MIMICConfig(use_contrastive=False))
    total.backward()
    assert all(p.grad is None for p in student.head.parameters())
    assert any(p.grad is not None for p in student.backbone.parameters())
    student.zero_grad(set_to_none=True)
    # no attention term: beta is irrelevant
    cfg = MIMICConfig(use_attention=False)
    a, _ = mimic_loss(student, teacher, v1, v2, beta, cfg)
    b, _ = mimic_loss(student, teacher, v1, v2, {k: 1e9 for k in beta}, cfg)
    assert a.item() == b.item()


def _reference_at(fm_s, fm_t, p=2.0):
    """The authors' AT (models/AT.py): B x 1 x H x W maps normalised over (H, W), F.mse_loss."""
    def amap(fm):
        am = fm.abs().pow(p).sum(1, keepdim=True)
        return am / (torch.norm(am, dim=(2, 3), keepdim=True) + 1e-6)
    return F.mse_loss(amap(fm_s), amap(fm_t))


def test_attention_forms_differ_exactly_by_the_mean_over_positions():
    from defbench.defenses.losses import attention_loss
    g = torch.Generator().manual_seed(0)
    for h, w in ((32, 32), (4, 4), (3, 5)):
        s, t = torch.randn(5, 7, h, w, generator=g), torch.randn(5, 7, h, w, generator=g)
        code = attention_loss(s, t)
        # the default (used by NAD and by MIMIC at paper) is the authors' code, unchanged
        assert code.item() == pytest.approx(_reference_at(s, t).item(), rel=1e-6)
        assert attention_loss(s, t, 2.0, "code").item() == code.item()
        per_sample_code = [attention_loss(s[i:i + 1], t[i:i + 1]) for i in range(5)]
        per_sample_eq6 = [attention_loss(s[i:i + 1], t[i:i + 1], form="eq6") for i in range(5)]
        for c, e in zip(per_sample_code, per_sample_eq6):  # ||d||_2 = sqrt(H*W * mean(d^2))
            assert e.item() == pytest.approx(math.sqrt(h * w * c.item()), rel=1e-5)
        # batch: both average over samples (code: of the squared norm / (H*W); eq6: of the norm)
        assert code.item() == pytest.approx(sum(c.item() for c in per_sample_code) / 5, rel=1e-5)
        eq6 = attention_loss(s, t, form="eq6")
        assert eq6.item() == pytest.approx(sum(e.item() for e in per_sample_eq6) / 5, rel=1e-5)
    with pytest.raises(ValueError, match="attention form"):
        attention_loss(s, t, form="paper")


def test_attention_form_eq6_changes_only_the_attention_term(loss_setup):
    from defbench.defenses.losses import attention_loss
    student, teacher, v1, v2, x, beta = loss_setup
    _, code = mimic_loss(student, teacher, v1, v2, beta, MIMICConfig())
    _, eq6 = mimic_loss(student, teacher, v1, v2, beta, MIMICConfig(attention_form="eq6"))
    with torch.no_grad():
        s, t = student.stages(v1), teacher.stages(v1)
    for k in beta:
        assert eq6[f"at_{k}"].item() == pytest.approx(attention_loss(s[k], t[k], 2.0, "eq6").item(), rel=1e-5)
        assert code[f"at_{k}"].item() == pytest.approx(_reference_at(s[k], t[k]).item(), rel=1e-5)
    assert eq6["l2"].item() == pytest.approx(sum(w * eq6[f"at_{k}"].item() for k, w in beta.items()), rel=1e-5)
    assert eq6["l0"].item() == code["l0"].item() and eq6["l1"].item() == code["l1"].item()


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="every loss term"):
        MIMICConfig(use_clone=False, use_contrastive=False, use_attention=False).validate()
    with pytest.raises(ValueError, match="mi_source"):
        MIMICConfig(mi_source="both").validate()
    with pytest.raises(ValueError, match="distill_input"):
        MIMICConfig(distill_input="views").validate()
    with pytest.raises(ValueError, match="attention_form"):
        MIMICConfig(attention_form="paper").validate()


def test_registered_with_profiles():
    comp = get_defense("mimic")
    paper = comp.make_config("paper")
    assert (paper.epochs, paper.batch_size, paper.alpha0, paper.alpha1, paper.mi_epochs, paper.mi_pool) == \
        (1000, 128, 1000.0, 10000.0, 200, 0)
    assert paper.mi_source == "student" and paper.attention_form == "code"  # MIMIC.py: estimate_mi(student, ...)
    for profile in ("tiny", "ci"):
        assert comp.make_config(profile).mi_source == "student"  # the reference at every profile


# ----------------------------------------------------------------- it works

@pytest.mark.slow
def test_mimic_lowers_the_ci_backdoor(backdoored, clean_data, task_data, ci_profile, ctx):
    from defbench.benchmark.pipeline.evaluate import evaluate_encoder
    encoder, trigger, target, _ = backdoored
    train, test = task_data
    cfg = get_defense("mimic").make_config("ci")
    defended = mimic_mod.mimic(encoder.clone(), clean_data, cfg, ctx)
    before = evaluate_encoder(encoder, train, test, trigger, target, ci_profile.evaluate, ctx.reseed(0))
    after = evaluate_encoder(defended, train, test, trigger, target, ci_profile.evaluate, ctx.reseed(0))
    assert after["asr_excl"] < before["asr_excl"] - 20, (before, after)
