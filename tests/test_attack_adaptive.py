"""The adaptive BadEncoder: its MI regulariser and the attack built on BadEncoder's loop."""
import torch

from defbench.attacks import ATTACKS, AttackInputs, PatchTrigger
from defbench.attacks.adaptive import AdaptiveBadEncoderConfig, MIProfileRegulariser
from defbench.encoders import SimCLRConfig, build_encoder


def _stages(encoder, b=16, seed=0):
    x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return encoder.stages(torch.cat([x, PatchTrigger().apply(x)]))


def test_regulariser_trains_its_estimators_and_its_gradient_reaches_only_the_encoder():
    torch.manual_seed(0)
    encoder = build_encoder(width=8)
    reg = MIProfileRegulariser(AdaptiveBadEncoderConfig(mi_hidden=16), torch.Generator().manual_seed(0))
    value = reg(_stages(encoder), 16)  # creates the networks and takes their first ascent step
    nets = [net for pair in reg.nets.values() for net in pair]
    assert set(reg.nets) == {"layer1", "layer2", "layer3", "layer4"} and len(nets) == 8
    snapshot = [p.detach().clone() for net in nets for p in net.parameters()]
    encoder.zero_grad()
    value = reg(_stages(encoder, seed=1), 16)
    after = [p.detach() for net in nets for p in net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(snapshot, after)), "the statistics networks did not train"
    ascent_grads = [p.grad.clone() for net in nets for p in net.parameters()]
    value.backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(ascent_grads, (p for net in nets for p in net.parameters()))), \
        "the encoder's loss reached the statistics networks"
    assert encoder.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert value.item() >= 0 and set(reg.last_mi) == set(reg.nets)


def test_attack_keeps_batchnorm_frozen_and_records_the_regulariser(ctx):
    torch.manual_seed(0)
    clean = build_encoder(width=8).eval()
    shadow = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    inputs = AttackInputs(clean.config, shadow, targets, PatchTrigger(), SimCLRConfig(), clean_encoder=clean)
    component = ATTACKS.get("badencoder-adaptive")
    cfg = component.config(epochs=2, batch_size=32, n_reference=2, mi_hidden=16)
    attacked = component.fn(inputs, cfg, ctx)
    bn = {k: v for k, v in clean.state_dict().items() if "bn" in k or "downsample.1" in k}
    assert all(torch.equal(v, attacked.state_dict()[k]) for k, v in bn.items())
    assert not torch.equal(clean.backbone.conv1.weight, attacked.backbone.conv1.weight)
    history = ctx.records["loss_history"]
    assert len(history) == 2 and all(len(epoch) == 4 for epoch in history)  # L0, L1, L2, R
    assert set(ctx.records["mi_last_batch"]) == {"layer1", "layer2", "layer3", "layer4"}
