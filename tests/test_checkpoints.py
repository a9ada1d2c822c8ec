import os

import pytest
import torch
import torchvision
from torch import nn

from defbench.encoders import CheckpointError, build_encoder, load_encoder, save_encoder


def test_round_trip_keeps_weights_and_config(tmp_path):
    enc = build_encoder(width=8, image_size=32).eval()
    save_encoder(enc, tmp_path / "e.pt", meta={"note": "x"})
    back = load_encoder(tmp_path / "e.pt").eval()
    assert back.config == enc.config
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(back.features(x), enc.features(x))


class _Exploit:
    """Unpickling this runs os.system: exactly what a stranger's checkpoint could do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = build_encoder(width=8).state_dict()
    torch.save({"state_dict": state, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    assert not marker.exists()
    assert "refused" in str(err.value) and "\n" not in str(err.value)


def test_garbage_and_missing_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    for path in (bad, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError) as err:
            load_encoder(path)
        assert "\n" not in str(err.value)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a defbench encoder"):
        load_encoder(tmp_path / "other.pt")


class _ReleaseBase(nn.Module):
    """The layout of the BadEncoder/MIMIC release: torchvision ResNet-18 children in `f`."""
    def __init__(self):
        super().__init__()
        modules = []
        for name, module in torchvision.models.resnet18().named_children():
            if name == "conv1":
                module = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
                modules.append(module)
        self.f = nn.Sequential(*modules)

    def forward(self, x):
        return torch.flatten(self.f(x), 1)


class _Release(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = _ReleaseBase()
        self.g = nn.Sequential(nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128))


def test_imports_the_badencoder_release_layout(tmp_path):
    torch.manual_seed(0)
    release = _Release().eval()
    for m in release.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"epoch": 200, "state_dict": release.state_dict()}, tmp_path / "model_200.pth")
    enc = load_encoder(tmp_path / "model_200.pth").eval()
    assert enc.config.width == 64 and enc.config.proj_dim == 128
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - enc._mean) / enc._std
    assert torch.allclose(enc.features(x), release.f(normalised), atol=1e-5)
    assert torch.allclose(enc.project(x), release.g(release.f(normalised)), atol=1e-5)
