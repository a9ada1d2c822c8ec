"""CTRL (Li et al., ICCV 2023): a clean-label frequency-domain trigger, planted by data poisoning.

**Trigger** (:class:`CTRLTrigger`, trigger type ``"ctrl"``): in pixel scale 0..255, RGB -> YUV
(BT.601, as kornia's), an orthonormal 2-D DCT-II over the whole image, ``magnitude`` added to the
coefficients at ``positions`` of the chosen ``channels`` (U and V), inverse DCT, back to RGB (the exact
matrix inverse), clamp to 0..255. The DCT is a matrix product, so it runs batched on any device; it
takes uint8 (rounded back to uint8) or float (0..1) images. Positions are given for a 32-pixel image;
for size S a position p becomes ``round((p + 1) * S / 32) - 1``.

**Poisoning**: ``round(poison_ratio * N)`` random images of the N-image pre-training set are replaced by
trigger-stamped target-class images of the downstream task (labels untouched), then the encoder is
pre-trained from scratch with the victim's recipe.

Parity with the reference: docs/methods/ctrl.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..encoders import build_encoder, train_simclr
from .base import AttackInputs, register_attack
from .triggers import TRIGGER_TYPES

REFERENCE_SIZE = 32  # the image size the default positions are given for

# BT.601 RGB -> YUV (rows Y, U, V), as kornia.color.rgb_to_yuv used by the CTRL authors
_RGB_TO_YUV = ((0.299, 0.587, 0.114),
               (-0.147, -0.289, 0.436),
               (0.615, -0.515, -0.100))


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): ``X = D x`` transforms, ``x = D^T X`` inverts."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (square images)."""
    d = dct_matrix(x.shape[-1], x.device, x.dtype)
    return d @ x @ d.t()


def idct2(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2`."""
    d = dct_matrix(coefficients.shape[-1], coefficients.device, coefficients.dtype)
    return d.t() @ coefficients @ d


def _colour(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,njhw->nihw", matrix.to(device=x.device, dtype=x.dtype), x)


def rgb_to_yuv(x: torch.Tensor) -> torch.Tensor:
    return _colour(x, torch.tensor(_RGB_TO_YUV, dtype=torch.float64))


def yuv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return _colour(x, torch.linalg.inv(torch.tensor(_RGB_TO_YUV, dtype=torch.float64)))


def scale_position(p: int, image_size: int, reference: int = REFERENCE_SIZE) -> int:
    return round((p + 1) * image_size / reference) - 1


@dataclass(frozen=True)
class CTRLTrigger:
    """CTRL's frequency trigger; ``positions`` are (row, col) DCT indices for this ``image_size``."""
    magnitude: float = 100.0
    positions: tuple[tuple[int, int], ...] = ((15, 15), (31, 31))
    channels: tuple[int, ...] = (1, 2)  # YUV channel indices: 1 = U, 2 = V
    image_size: int = 32

    def __post_init__(self):
        # descriptions come back from JSON as lists: normalise so equality and hashing work
        object.__setattr__(self, "positions", tuple((int(r), int(c)) for r, c in self.positions))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "magnitude", float(self.magnitude))
        bad = [p for p in self.positions if not all(0 <= v < self.image_size for v in p)]
        if bad or not self.positions:
            raise ValueError(f"CTRL trigger positions {list(self.positions)} must be (row, col) pairs inside a "
                             f"{self.image_size}x{self.image_size} DCT; adjust attack.positions")
        if not self.channels or any(c not in (0, 1, 2) for c in self.channels):
            raise ValueError(f"CTRL trigger channels {list(self.channels)} must be YUV indices 0, 1 or 2")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp uint8 images (0..255) or float images (0..1), N x 3 x H x W; returns a new tensor."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"trigger built for {self.image_size}px images, got {tuple(images.shape[-2:])}")
        is_uint8 = images.dtype == torch.uint8
        x = images.float() if is_uint8 else images * 255.0
        coefficients = dct2(rgb_to_yuv(x))
        rows = torch.tensor([r for r, _ in self.positions], device=x.device)
        cols = torch.tensor([c for _, c in self.positions], device=x.device)
        for ch in self.channels:
            coefficients[:, ch, rows, cols] += self.magnitude
        out = yuv_to_rgb(idct2(coefficients)).clamp_(0.0, 255.0)
        if is_uint8:
            return out.round_().to(torch.uint8)
        return (out / 255.0).to(images.dtype)

    def describe(self) -> dict:
        return {"type": "ctrl", "magnitude": self.magnitude, "positions": [list(p) for p in self.positions],
                "channels": list(self.channels), "image_size": self.image_size}


TRIGGER_TYPES.add("ctrl", CTRLTrigger)


@dataclass
class CTRLConfig:
    magnitude: float = 100.0  # added to each chosen DCT coefficient (pixel scale 0..255)
    positions: tuple[tuple[int, int], ...] = ((15, 15), (31, 31))  # for a 32px image; scaled for others
    channels: tuple[int, ...] = (1, 2)  # YUV channels stamped: U and V
    poison_ratio: float = 0.01  # share of the pre-training set replaced by stamped target-class images
    target: int = -1  # -1: the downstream task's paper target class

    def __post_init__(self):
        # --set values arrive as parsed TOML (100 is an int, positions are lists); normalise them so the
        # stage key of `--set attack.ctrl.magnitude=100` equals the default's
        self.magnitude, self.poison_ratio = float(self.magnitude), float(self.poison_ratio)
        self.positions = tuple((int(r), int(c)) for r, c in self.positions)
        self.channels = tuple(int(c) for c in self.channels)

    def make_trigger(self, image_size: int) -> CTRLTrigger:
        positions = tuple((scale_position(int(r), image_size), scale_position(int(c), image_size))
                          for r, c in self.positions)
        return CTRLTrigger(magnitude=self.magnitude, positions=positions, channels=tuple(self.channels),
                           image_size=image_size)


def poison_pretraining_set(inputs: AttackInputs, ratio: float,
                           generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pre-training set with ``round(ratio * N)`` random images replaced by stamped target images.

    Returns the poisoned set, the replaced indices and the indices of the
    target images used (drawn without replacement while there are enough).
    """
    data = inputs.pretrain_images.clone()
    n = min(len(data), max(1, round(ratio * len(data))))
    slots = torch.randperm(len(data), generator=generator)[:n]
    pool = len(inputs.target_images)
    if pool == 0:
        raise ValueError("CTRL needs target-class images to poison with")
    picks = torch.cat([torch.randperm(pool, generator=generator) for _ in range(math.ceil(n / pool))])[:n]
    data[slots] = inputs.trigger.apply(inputs.target_images[picks])
    return data, slots, picks


def ctrl_set(inputs: AttackInputs, cfg: CTRLConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The set ``ctrl`` pre-trains on, rebuilt (``register_attack``'s ``pretraining_set``)."""
    data, slots, _ = poison_pretraining_set(inputs, cfg.poison_ratio, generator)
    poisoned = torch.zeros(len(data), dtype=torch.bool)
    poisoned[slots.cpu()] = True
    return data, poisoned


@register_attack("ctrl", config=CTRLConfig, needs_clean_encoder=False, pretraining_set=ctrl_set,
                 summary="clean-label data poisoning with a frequency (DCT) trigger on target-class images",
                 profiles={"paper": {},
                           "tiny": {"poison_ratio": 0.01},
                           "ci": {"poison_ratio": 0.01}})
def ctrl(inputs: AttackInputs, cfg: CTRLConfig, ctx):
    data, slots, picks = poison_pretraining_set(inputs, cfg.poison_ratio, ctx.generator)
    change = (data[slots].float() - inputs.target_images[picks].float()).abs()
    ctx.record("n_poison", len(slots))
    ctx.record("poison_ratio", len(slots) / len(data))
    ctx.record("poison_indices", slots.tolist())
    ctx.record("trigger_pixel_change", {"max": float(change.amax()), "mean": float(change.mean())})
    encoder = build_encoder(inputs.encoder_config).to(ctx.device)
    history = train_simclr(encoder, data, inputs.pretrain_recipe, ctx, desc="ctrl pre-training")
    ctx.record("loss_history", history)
    return encoder.eval()
