"""Triggers: pixel-space operations stamped on images before normalisation."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core import Registry


@dataclass(frozen=True)
class PatchTrigger:
    """A ``size`` x ``size`` square of one grey value (255 = white).

    ``row``/``col`` give its top-left corner; -1 places it at the bottom-right
    with a ``margin``-pixel gap (rows/cols 21..30 for the paper's 10x10 on 32x32).
    """
    size: int = 10
    row: int = -1
    col: int = -1
    margin: int = 1
    value: int = 255
    image_size: int = 32

    def __post_init__(self):
        r0, c0 = self.origin
        if self.size < 1 or r0 < 0 or c0 < 0 or r0 + self.size > self.image_size or c0 + self.size > self.image_size:
            raise ValueError(f"a {self.size}x{self.size} trigger at ({r0}, {c0}) does not fit a "
                             f"{self.image_size}x{self.image_size} image; adjust trigger_size/row/col")

    @property
    def origin(self) -> tuple[int, int]:
        far = self.image_size - self.margin - self.size
        return (far if self.row < 0 else self.row, far if self.col < 0 else self.col)

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.image_size, self.image_size)
        r0, c0 = self.origin
        m[r0:r0 + self.size, c0:c0 + self.size] = 1
        return m

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp uint8 images (0..255) or float images (0..1), N x C x H x W; returns a new tensor."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"trigger built for {self.image_size}px images, got {tuple(images.shape[-2:])}")
        out = images.clone()
        r0, c0 = self.origin
        value = self.value if images.dtype == torch.uint8 else self.value / 255.0
        out[..., r0:r0 + self.size, c0:c0 + self.size] = value
        return out

    def describe(self) -> dict:
        return {"type": "patch", **asdict(self)}


@dataclass
class TriggerSettings:
    """Config fields every patch-trigger attack shares (a dataclass base for attack configs)."""
    trigger_size: int = 10
    trigger_row: int = -1
    trigger_col: int = -1
    target: int = -1  # -1: the downstream task's paper target class

    def make_trigger(self, image_size: int) -> PatchTrigger:
        return PatchTrigger(size=self.trigger_size, row=self.trigger_row, col=self.trigger_col,
                            image_size=image_size)


TRIGGER_TYPES: Registry[type] = Registry("trigger type")
TRIGGER_TYPES.add("patch", PatchTrigger)


def trigger_from_description(description: dict):
    """Rebuild a trigger from its ``describe()`` output (how stored results name their trigger)."""
    d = dict(description)
    return TRIGGER_TYPES.get(d.pop("type", None))(**d)
