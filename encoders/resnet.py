"""CIFAR-style ResNet-18 backbone with a width multiplier.

Module names follow torchvision's ResNet (conv1, bn1, layer1..layer4, blocks
``0``/``1`` with conv1/bn1/conv2/bn2/downsample) so that checkpoints published
in the BadEncoder/MIMIC layout map onto it by renaming prefixes only.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet18Backbone(nn.Module):
    """conv1 is 3x3/stride 1 and there is no max-pool (the CIFAR variant).

    ``width`` is the channel count of layer1 (64 in the paper); the stages have
    width, 2w, 4w and 8w channels, so the feature is 8w-dimensional.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = [width, 2 * width, 4 * width, 8 * width]
        in_ch = width
        for i, out_ch in enumerate(channels):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))
            setattr(self, STAGE_NAMES[i], layer)
            in_ch = out_ch
        self.feature_dim = channels[-1]

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        stages = {}
        for name in STAGE_NAMES:
            out = getattr(self, name)(out)
            stages[name] = out
        stages["feature"] = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)["feature"]


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(no bias) -> BN1d -> ReLU -> Linear, as in the SimCLR reference code."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
