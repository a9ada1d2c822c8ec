"""torchvision's ResNets (ImageNet stem: 7x7/stride-2 conv and a max-pool) as encoder backbones.

A backbone holds torchvision's own modules under their own names (``conv1``,
``bn1``, ``layer1``..``layer4``), so a plain torchvision state dict maps onto it
by adding the ``backbone.`` prefix; the classifier ``fc`` is not part of the
encoder. Any input size works (adaptive average pooling); the images are
resized to the encoder's ``image_size`` when a dataset is loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import STAGE_NAMES

DEPTHS = (18, 34, 50, 101, 152)


class TorchvisionResNet(nn.Module):
    """``forward_stages`` gives layer1..layer4 and the pooled ``feature`` (512-d for 18/34, 2048-d for 50+)."""

    def __init__(self, depth: int):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"torchvision has no ResNet-{depth}; depths: {', '.join(map(str, DEPTHS))}")
        import torchvision  # here, not at import: torchvision takes seconds to import and most runs never need it
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        for name in STAGE_NAMES:
            setattr(self, name, getattr(net, name))
        self.feature_dim = net.fc.in_features
        self.stage_names = STAGE_NAMES

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = {}
        for name in STAGE_NAMES:
            out = getattr(self, name)(out)
            stages[name] = out
        stages["feature"] = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)["feature"]
