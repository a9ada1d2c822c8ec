"""The one encoder interface every attack and defense works through.

An :class:`Encoder` takes float images in [0, 1] (B x 3 x H x W) and
normalises them itself, so pixel-space operations (triggers, augmentations)
never need to know the normalisation constants. It offers

- ``features(x)``: the backbone feature (B x D),
- ``project(x)``: the projection-head output used by contrastive losses,
- ``stages(x)``: every named intermediate output plus ``"feature"`` from ONE
  forward pass,
- ``empty_like()``: the same architecture with fresh random weights,
- ``config``: an :class:`EncoderConfig` that rebuilds it exactly.

A new architecture plugs in by registering a backbone factory in
``ARCHITECTURES``; the backbone must expose ``forward_stages`` (returning the
stages and ``"feature"``), ``feature_dim`` and ``stage_names``. Registered:
``resnet18`` (the CIFAR variant of the papers, any width) and ``tv-resnet18``
/ ``34`` / ``50`` / ``101`` / ``152`` (torchvision's ImageNet-stem ResNets,
width 64, what plain torchvision state dicts load into).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..core import ConfigError, Registry
from .resnet import STAGE_NAMES, ResNet18Backbone, projection_head
from .tvresnet import DEPTHS as TORCHVISION_DEPTHS, TorchvisionResNet

PRECISIONS = ("fp32", "bf16")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class EncoderConfig:
    arch: str = "resnet18"
    width: int = 64
    image_size: int = 32
    proj_hidden: int = 0  # 0: same as the feature dimension (512 for width 64)
    proj_dim: int = 128
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    channels_last: bool = False
    precision: str = "fp32"  # "fp32", or "bf16": the backbone runs under autocast (weights and outputs stay fp32)

    def __post_init__(self):
        ARCHITECTURES.get(self.arch)  # an unknown architecture fails here, with the known names
        if self.precision not in PRECISIONS:
            raise ConfigError(f"encoder.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("width", "image_size", "proj_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"encoder.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.image_size < 8:
            raise ConfigError(f"encoder.image_size must be at least 8 (ResNet downsamples 8x), got {self.image_size}")
        if self.proj_hidden < 0:
            raise ConfigError(f"encoder.proj_hidden must be >= 0 (0: the feature dimension), got {self.proj_hidden}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("encoder.mean and encoder.std need 3 values each, std > 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown encoder config fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


def _resnet18(config: EncoderConfig) -> nn.Module:
    backbone = ResNet18Backbone(config.width)
    backbone.stage_names = STAGE_NAMES
    return backbone


def _torchvision_resnet(depth: int) -> Callable[[EncoderConfig], nn.Module]:
    def build(config: EncoderConfig) -> nn.Module:
        if config.width != 64:
            raise ConfigError(f"tv-resnet{depth} has torchvision's fixed width 64, got encoder.width={config.width}")
        return TorchvisionResNet(depth)
    build.__qualname__ = f"tv-resnet{depth}"
    return build


ARCHITECTURES: Registry[Callable[[EncoderConfig], nn.Module]] = Registry("encoder architecture")
ARCHITECTURES.add("resnet18", _resnet18)
for _depth in TORCHVISION_DEPTHS:
    ARCHITECTURES.add(f"tv-resnet{_depth}", _torchvision_resnet(_depth))


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.backbone = ARCHITECTURES.get(config.arch)(config)
        dim = self.backbone.feature_dim
        self.head = projection_head(dim, config.proj_hidden or dim, config.proj_dim)
        self.register_buffer("_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        if config.channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.backbone.stage_names)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self._mean) / self._std
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.config.precision == "bf16":  # mixed precision inside the backbone only; fp32 at its boundary
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = self.backbone.forward_stages(self._prepare(x))
            return {name: value.float() for name, value in out.items()}
        return self.backbone.forward_stages(self._prepare(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)["feature"]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def empty_like(self) -> "Encoder":
        """Same architecture, fresh random weights, on the same device."""
        device = next(self.parameters()).device
        return Encoder(self.config).to(device)

    def clone(self) -> "Encoder":
        """An independent copy with the same weights."""
        return copy.deepcopy(self)


def build_encoder(config: EncoderConfig | dict | None = None, **overrides) -> Encoder:
    if config is None:
        config = EncoderConfig()
    elif isinstance(config, dict):
        config = EncoderConfig.from_dict(config)
    if overrides:
        config = EncoderConfig.from_dict({**config.to_dict(), **overrides})
    return Encoder(config)


def frozen_copy(encoder: Encoder) -> Encoder:
    """An eval-mode copy with gradients off: the teacher / reference encoder."""
    teacher = encoder.clone().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode and stop its affine parameters training."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
