"""BASSL as UMBCvision/SSL-Backdoor's code sets it up (``bassl-sslbkd``): HTBA patches, placed at random, rate 1.0.

The ``bassl`` attack follows the MIMIC evaluation's text (a 10 x 10 white square at a fixed place on 0.6 of the
target class). This variant takes the settings of the BASSL authors' released poison generator
(``poison-generation/generate_poison.py`` with its ``cfg/HTBA_trigger_*_targeted_*.cfg`` files):

- the trigger is an HTBA patch (Hidden Trigger Backdoor Attacks): a 4 x 4 grid of saturated colours (each
  channel 0 or 255) smoothly upsampled to the patch, pasted opaque (``alpha_composite = true``, alpha 0.00);
  here the grid is drawn from ``pattern_seed`` (the reference ships ten such images, ``triggers/trigger_10..19.png``,
  one per experiment);
- every image gets the patch at its own random place, the whole patch inside ``[low, high]`` of the image on
  both axes: ``train_region`` (0.25, 0.75) for the poisons, ``test_region`` (0.10, 0.90) for the triggered
  test images (``train_location_min/max``, ``val_location_min/max``);
- ``poison_fraction`` = the cfg's ``poison_injection_rate`` = 1.0: ``int(rate * n)`` of the target category's
  ``n`` training images are poisoned, i.e. all of them.

The poisons and the pre-training are ``bassl``'s (:func:`defbench.attacks.bassl.poison_set`, then the victim's
SimCLR recipe from scratch). The place of a patch is a function of the image's pixels and ``pattern_seed``
(uniform over the allowed positions), so a test image gets the same place in every batch and every run.

Parity with the reference: docs/methods/bassl-sslbkd.md
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .base import AttackInputs, register_attack
from .bassl import bassl_set, poison_set, pretrain_with_poison
from .triggers import TRIGGER_TYPES

GRID = 4  # HTBA patches: a GRID x GRID random colour image, upsampled


@dataclass(frozen=True)
class HTBATrigger:
    """An HTBA-style ``size`` x ``size`` patch pasted at a pseudo-random place per image.

    The top-left corner is drawn from ``[int(low * S), int(high * S) - size]`` on each axis (S the image size;
    the reference's rule, an empty range collapsing to its start), from a hash of the image's pixels.
    """
    size: int = 10
    pattern_seed: int = 10
    low: float = 0.10
    high: float = 0.90
    image_size: int = 32

    def __post_init__(self):
        if not 0 <= self.low < self.high <= 1:
            raise ValueError(f"an HTBA trigger's region needs 0 <= low < high <= 1, got ({self.low}, {self.high})")
        if not 1 <= self.size <= self.image_size - int(self.low * self.image_size):
            raise ValueError(f"a {self.size}px HTBA patch does not fit a {self.image_size}px image from "
                             f"{self.low:.2f} of its side; lower trigger_size")

    @property
    def corner_range(self) -> tuple[int, int]:
        """The smallest and largest top-left row (and column) the patch may take."""
        first = int(self.low * self.image_size)
        return first, max(first, int(self.high * self.image_size - self.size))

    def pattern(self) -> torch.Tensor:
        """The patch, uint8 3 x size x size: a seeded GRID x GRID image of channels 0 / 255, bicubic-upsampled."""
        grid = torch.randint(0, 2, (1, 3, GRID, GRID), generator=torch.Generator().manual_seed(self.pattern_seed))
        patch = F.interpolate(grid.float() * 255, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return patch[0].round().clamp(0, 255).to(torch.uint8)

    def corners(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's top-left (row, col), from an integer hash of its pixel values (uint8 or [0, 1] floats)."""
        pixels = images if images.dtype == torch.uint8 else (images * 255).round()
        weights = torch.randint(1, 2**31 - 1, pixels.shape[1:], dtype=torch.int64,
                                generator=torch.Generator().manual_seed(self.pattern_seed + 1))
        code = (pixels.to(torch.int64) * weights.to(images.device)).flatten(1).sum(1)
        first, last = self.corner_range
        span = last - first + 1
        return first + code % span, first + (code // span) % span

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp uint8 images (0..255) or float images (0..1), N x C x H x W; returns a new tensor."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"trigger built for {self.image_size}px images, got {tuple(images.shape[-2:])}")
        return self.paste(images, *self.corners(images))

    def paste(self, images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The patch pasted opaque with its top-left corner at (``rows[i]``, ``cols[i]``) of image i."""
        axis = torch.arange(self.image_size, device=images.device)
        dr, dc = axis[None] - rows[:, None], axis[None] - cols[:, None]  # offsets into the patch, N x S
        inside = ((dr >= 0) & (dr < self.size))[:, :, None] & ((dc >= 0) & (dc < self.size))[:, None, :]
        patch = self.pattern().to(images.device)
        pasted = patch[:, dr.clamp(0, self.size - 1)[:, :, None], dc.clamp(0, self.size - 1)[:, None, :]]
        pasted = pasted.transpose(0, 1)  # N x 3 x S x S
        if images.dtype != torch.uint8:
            pasted = pasted.to(images.dtype) / 255.0
        return torch.where(inside[:, None], pasted, images)

    def describe(self) -> dict:
        return {"type": "htba", **asdict(self)}


TRIGGER_TYPES.add("htba", HTBATrigger)


@dataclass
class SSLBackdoorConfig:
    poison_fraction: float = 1.0  # poison_injection_rate of the target category (every released cfg: 1.0)
    max_poison: int = 0  # cap on the number of poisoned images; 0: no cap
    trigger_size: int = 10  # the patch's side in pixels (the reference: 50 px wide on full-size ImageNet images)
    pattern_seed: int = 10  # which HTBA-style pattern
    train_region: tuple[float, float] = (0.25, 0.75)  # where the poisons' patch lies (train_location_min/max)
    test_region: tuple[float, float] = (0.10, 0.90)  # where the test images' patch lies (val_location_min/max)
    target: int = -1  # -1: the downstream task's paper target class

    def __post_init__(self):
        self.poison_fraction = float(self.poison_fraction)
        self.train_region = tuple(float(v) for v in self.train_region)
        self.test_region = tuple(float(v) for v in self.test_region)

    def make_trigger(self, image_size: int) -> HTBATrigger:
        """The trigger the evaluation stamps on test images (the test region); the poisons use the train region,
        which is checked here too, so a patch that does not fit it fails at planning time."""
        self._trigger(self.train_region, image_size)
        return self._trigger(self.test_region, image_size)

    def _trigger(self, region: tuple[float, float], image_size: int) -> HTBATrigger:
        return HTBATrigger(size=self.trigger_size, pattern_seed=self.pattern_seed, low=region[0], high=region[1],
                           image_size=image_size)


def poisoning_inputs(inputs: AttackInputs, cfg: SSLBackdoorConfig) -> AttackInputs:
    """``inputs`` with the trigger the poisons get: an HTBA trigger moves to the training region; any other
    trigger (a user's) is stamped as it is."""
    if not isinstance(inputs.trigger, HTBATrigger):
        return inputs
    low, high = cfg.train_region
    return dataclasses.replace(inputs, trigger=dataclasses.replace(inputs.trigger, low=low, high=high))


def bassl_sslbkd_set(inputs: AttackInputs, cfg: SSLBackdoorConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The set ``bassl-sslbkd`` pre-trains on, rebuilt (``register_attack``'s ``pretraining_set``)."""
    return bassl_set(poisoning_inputs(inputs, cfg), cfg, generator)


@register_attack("bassl-sslbkd", config=SSLBackdoorConfig, needs_clean_encoder=False, pretraining_set=bassl_sslbkd_set,
                 profiles={"paper": {}, "tiny": {}, "ci": {}},
                 summary="BASSL as its authors' code: HTBA patch at random places on all target-class images")
def bassl_sslbkd(inputs: AttackInputs, cfg: SSLBackdoorConfig, ctx):
    poison = poison_set(poisoning_inputs(inputs, cfg), cfg.poison_fraction, cfg.max_poison, ctx.generator)
    return pretrain_with_poison(inputs, poison, ctx, "bassl-sslbkd pre-training")
