import subprocess
import sys

import torch

from defbench.encoders import build_encoder, contrastive_loss, nt_xent
from defbench.encoders.augment import SimCLRAugment


def test_stage_shapes_follow_the_paper_layout():
    enc = build_encoder(width=8)
    out = enc.stages(torch.rand(2, 3, 32, 32))
    assert [tuple(out[k].shape[1:]) for k in ("layer1", "layer2", "layer3", "layer4")] == [
        (8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert out["feature"].shape == (2, 64) and enc.feature_dim == 64
    assert enc.project(torch.rand(2, 3, 32, 32)).shape == (2, 128)


def test_stages_come_from_one_forward_pass():
    enc = build_encoder(width=8)
    calls = []
    enc.backbone.conv1.register_forward_hook(lambda *a: calls.append(1))
    out = enc.stages(torch.rand(2, 3, 32, 32))
    assert len(calls) == 1
    assert set(out) == {"layer1", "layer2", "layer3", "layer4", "feature"}


def test_features_are_the_pooled_last_stage():
    enc = build_encoder(width=8).eval()
    x = torch.rand(3, 3, 32, 32)
    out = enc.stages(x)
    assert torch.allclose(out["feature"], out["layer4"].mean((2, 3)), atol=1e-6)
    assert torch.allclose(enc.features(x), out["feature"], atol=1e-6)


def test_empty_like_has_the_architecture_but_fresh_weights():
    enc = build_encoder(width=8)
    fresh = enc.empty_like()
    assert fresh.config == enc.config
    assert not torch.equal(fresh.backbone.conv1.weight, enc.backbone.conv1.weight)
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in enc.named_parameters()]


def test_normalisation_happens_inside_the_encoder():
    enc = build_encoder(width=8).eval()
    x = torch.rand(2, 3, 32, 32)
    manual = enc.backbone((x - enc._mean) / enc._std)
    assert torch.allclose(enc.features(x), manual, atol=1e-5)


def test_nt_xent_rewards_matching_views():
    z = torch.randn(16, 8)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z)) < nt_xent(z, torch.randn(16, 8))


def test_augment_keeps_range_and_shape_and_varies():
    x = torch.rand(8, 3, 32, 32)
    a, b = SimCLRAugment()(x), SimCLRAugment()(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b)


def test_contrastive_step_reduces_loss():
    torch.manual_seed(0)
    enc = build_encoder(width=8)
    x = torch.rand(32, 3, 32, 32)
    opt = torch.optim.Adam(enc.parameters(), 1e-3)
    aug = SimCLRAugment(crop=False, jitter=(0, 0, 0, 0), gray_p=0)
    first = contrastive_loss(enc, x, aug, 0.5).item()
    for _ in range(15):
        loss = contrastive_loss(enc, x, aug, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_channels_last_backward_does_not_crash_at_profile_widths():
    """A channels_last backward pass once segfaulted at width 8: run it in a child process."""
    code = (
        "import torch\n"
        "from defbench.encoders import build_encoder\n"
        "for w in (16, 32):\n"
        "    enc = build_encoder(width=w, channels_last=True)\n"
        "    enc.project(torch.rand(64, 3, 32, 32)).sum().backward()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
