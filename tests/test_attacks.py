import torch
from torch import nn

from defbench.attacks import ATTACKS, AttackInputs, PatchTrigger
from defbench.attacks import bassl as bassl_module
from defbench.benchmark.pipeline.evaluate import evaluate_encoder
from defbench.encoders import SimCLRConfig, build_encoder


def _bn_state(encoder):
    return {name: t.clone() for name, t in encoder.state_dict().items()
            if any(k in name for k in ("bn", "downsample.1"))}


def test_badencoder_keeps_every_batchnorm_frozen(clean_encoder, backdoored):
    attacked = backdoored[0]
    before, after = _bn_state(clean_encoder), _bn_state(attacked)
    assert before.keys() == after.keys() and len(before) > 40
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} drifted during BadEncoder"
    assert not torch.equal(clean_encoder.backbone.conv1.weight, attacked.backbone.conv1.weight)
    assert torch.equal(clean_encoder.head[0].weight, attacked.head[0].weight)  # only the backbone trains


def test_badencoder_implants_a_backdoor_the_clean_encoder_lacks(clean_encoder, backdoored, task_data, ci_profile, ctx):
    attacked, trigger, target, _ = backdoored
    train, test = task_data
    clean = evaluate_encoder(clean_encoder, train, test, trigger, target, ci_profile.evaluate, ctx.reseed(1))
    bad = evaluate_encoder(attacked, train, test, trigger, target, ci_profile.evaluate, ctx.reseed(1))
    assert bad["asr_all"] > clean["asr_all"] + 40, (clean, bad)
    assert bad["asr_excl"] > 50
    assert bad["acc"] > clean["acc"] - 15  # utility mostly kept


def test_triggered_inputs_embed_near_the_references(backdoored, task_data, ctx):
    attacked, trigger, target, _ = backdoored
    _, test = task_data
    x = test.images[:64].float() / 255
    with torch.no_grad():
        f_trig = nn.functional.normalize(attacked.features(trigger.apply(x)), dim=1)
        f_clean = nn.functional.normalize(attacked.features(x), dim=1)
    spread_trig = (f_trig @ f_trig.t()).mean()
    spread_clean = (f_clean @ f_clean.t()).mean()
    assert spread_trig > spread_clean  # triggered inputs collapse together


def test_bassl_adds_stamped_target_images_and_pretrains_from_scratch(monkeypatch, ctx):
    seen = {}

    def fake_train(encoder, images, cfg, ctx, desc=""):
        seen["images"], seen["encoder"] = images, encoder
        return [0.0]
    monkeypatch.setattr(bassl_module, "train_simclr", fake_train)
    pretrain = torch.randint(0, 200, (50, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, 200, (20, 3, 32, 32), dtype=torch.uint8)
    trigger = PatchTrigger()
    inputs = AttackInputs(build_encoder(width=8).config, pretrain, targets, trigger, SimCLRConfig(epochs=1))
    comp = ATTACKS.get("bassl")
    comp.fn(inputs, comp.config(poison_fraction=0.6), ctx)
    data = seen["images"]
    assert len(data) == 50 + 12 and torch.equal(data[:50], pretrain)
    poisons = data[50:]
    assert (poisons[:, :, 21:31, 21:31] == 255).all()
    unstamped = poisons * (1 - trigger.mask().to(torch.uint8))
    pool = targets * (1 - trigger.mask().to(torch.uint8))
    assert all(any(torch.equal(p, q) for q in pool) for p in unstamped)  # every poison is a target image
    assert ctx.records["n_poison"] == 12
    assert comp.options.needs_clean_encoder is False


def test_badencoder_paper_shadow_set_is_50k_and_the_loop_draws_that_many(ctx):
    from defbench.attacks.badencoder import badencoder_loss, train_badencoder
    assert ATTACKS.get("badencoder").make_config("paper").shadow_images == 50000  # the release's shadow set
    torch.manual_seed(0)
    clean = build_encoder(width=8).eval()
    shadow = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    inputs = AttackInputs(clean.config, shadow, targets, PatchTrigger(), SimCLRConfig(), clean_encoder=clean)
    cfg = ATTACKS.get("badencoder").config(epochs=2, batch_size=16, shadow_images=32)
    seen, epochs = [], []

    def loss_fn(model, clean, x, x_triggered, refs, refs_aug):
        seen.append(len(x))
        return badencoder_loss(model, clean, x, x_triggered, refs, refs_aug, 1.0, 1.0)
    train_badencoder(inputs, cfg, ctx, loss_fn, on_epoch_end=lambda e, model, means: epochs.append((e, len(means))))
    assert seen == [16, 16, 16, 16]  # 32 of the 64 images, two full batches per epoch
    assert epochs == [(1, 3), (2, 3)]  # the hook sees every epoch, counted from 1, with [L0, L1, L2]
