"""Premises a backdoor benchmark's image data must meet, measured on the data alone.

A patch-trigger benchmark is only informative when its images look, to an
encoder, like photographs: a natural amplitude spectrum (so that texture and
shape carry the class, as in real images) and a trigger that is out of
distribution (a white 10x10 patch must not already occur in clean images or in
their SimCLR views, otherwise pre-training teaches the encoder to treat it as
ordinary content). Nothing here looks at an encoder, an attack or a defense:
every number is a statistic of the pixels (and of the project's SimCLR
augmentation), so no setting is tuned on a defense's result.

Definitions (all at 32 x 32, the paper's image size):

- **Spectrum slope.** Luminance ``Y = 0.299 R + 0.587 G + 0.114 B``; each image
  minus its mean is split into its periodic and smooth parts (Moisan 2011,
  "Periodic plus smooth image decomposition") so the image border does not add
  a spurious cross of 1/f energy; the 2-D amplitude ``|FFT|`` is averaged over
  images and over rings of radius ``f`` (cycles per image, 1-wide bins), and
  ``log A`` is fitted against ``log f`` (each ring at its points' mean
  radius) by least squares over the mid band
  ``MID_BAND`` (2..8 cycles per 32 px, i.e. 0.0625..0.25 cycles per pixel:
  above the lowest rings, below the band that blur, resampling and sensor
  noise reshape). Natural photographs give about -1 to -1.2 for amplitude
  (power -2 to -2.4), white noise 0. Flat shapes on flat backgrounds land
  anywhere from about -0.8 (sharp glyphs plus noise) to -1.5 (few, soft
  edges): a straight edge alone has a 1/f amplitude spectrum, so the slope is
  a necessary check, not proof of natural texture.
- **Near-white.** A pixel whose every channel is >= ``NEAR_WHITE`` = 230
  (0.9 x 255, rounded up), i.e. within 10 % of the trigger's value 255.
- **White window.** An image contains one when some 10 x 10 window (any
  position, stride 1) is at least 90 % near-white (>= 90 of its 100 pixels).
- **Trigger box half-white.** Of the un-augmented image, the trigger's own box
  (rows/cols 21..30, the paper's 10x10 patch at the bottom right with a
  1-pixel margin) is at least 50 % near-white.

Targets (``TARGETS``): slope in [-1.4, -0.8]; white-window share of clean
images and of augmented views <= 1 %; trigger box half-white <= 1 %.

Entry point: :func:`data_premises` (a dataset by name) or
:func:`image_premises` (a tensor of images).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

NEAR_WHITE = 230  # every channel >= this (0..255) counts as near-white
WINDOW = 10  # side of the white window, the trigger's size
WINDOW_SHARE = 0.9  # share of near-white pixels that makes a window "white"
BOX_SHARE = 0.5  # share of near-white pixels that makes the trigger box "half white"
TRIGGER_BOX = (21, 31)  # rows/cols 21..30 of a 32 x 32 image
MID_BAND = (2.0, 8.0)  # cycles per 32 px image (scaled with the image size)
TARGETS = {"spectrum_slope": (-1.4, -0.8), "white_window_clean": 0.01, "white_window_augmented": 0.01,
           "trigger_box_half_white": 0.01}

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- spectrum

def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) N x C x H x W -> float64 on the 0..255 scale."""
    x = images.double()
    return x if images.dtype == torch.uint8 else x * 255.0


def luminance(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W (uint8 or float in 0..1) -> N x H x W luminance on the 0..255 scale (N x H x W passes)."""
    x = _as_float(images)
    if x.ndim == 3:
        return x
    if x.shape[1] == 1:
        return x[:, 0]
    return (x * _LUMA.double()).sum(1)


def periodic_component(u: torch.Tensor) -> torch.Tensor:
    """The periodic part of each N x H x W image (Moisan's periodic + smooth decomposition).

    The smooth part solves a Poisson equation whose source is the jump across
    the image border; what is left tiles without seams, so its FFT has no
    border cross. Means are kept.
    """
    n, h, w = u.shape
    v = torch.zeros_like(u)
    v[:, 0, :] += u[:, -1, :] - u[:, 0, :]
    v[:, -1, :] += u[:, 0, :] - u[:, -1, :]
    v[:, :, 0] += u[:, :, -1] - u[:, :, 0]
    v[:, :, -1] += u[:, :, 0] - u[:, :, -1]
    q = torch.arange(h, dtype=u.dtype).view(h, 1)
    r = torch.arange(w, dtype=u.dtype).view(1, w)
    denom = 2 * torch.cos(2 * math.pi * q / h) + 2 * torch.cos(2 * math.pi * r / w) - 4
    denom[0, 0] = 1.0
    s_hat = torch.fft.fft2(v) / denom
    s_hat[:, 0, 0] = 0.0
    return u - torch.fft.ifft2(s_hat).real


def radial_amplitude(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radially averaged amplitude spectra.

    Returns ``(f, mean_amplitude, per_image)``: the rings' mean radii in
    cycles per image (rings of width 1 around 1..H/2), the amplitude averaged over images and rings, and the
    per-image ring averages (N x rings).
    """
    y = luminance(images)
    y = y - y.mean((1, 2), keepdim=True)
    amp = torch.fft.fft2(periodic_component(y)).abs()  # N x H x W
    h, w = y.shape[1:]
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(h, 1) * h
    fx = torch.fft.fftfreq(w, dtype=torch.float64).view(1, w) * w
    radius = torch.sqrt(fy ** 2 + fx ** 2)  # cycles per image
    ring = radius.round().long()
    rings = range(1, min(h, w) // 2 + 1)
    # each ring's frequency is the mean radius of its points (an integer label would bias the slope by ~4 %)
    f = np.array([radius[ring == k].mean().item() for k in rings])
    per_image = np.stack([amp[:, ring == k].mean(1).numpy() for k in rings], 1)
    return f, per_image.mean(0), per_image


def _slope(f: np.ndarray, amplitude: np.ndarray, band) -> float:
    keep = (f >= band[0]) & (f <= band[1]) & (amplitude > 0)
    return float(np.polyfit(np.log(f[keep]), np.log(amplitude[keep]), 1)[0])


def spectrum_slope(images: torch.Tensor, band: tuple[float, float] = MID_BAND) -> dict:
    """Slope of log amplitude vs log spatial frequency over ``band`` (cycles per 32 px).

    Returns ``{"slope": of the image-averaged spectrum, "slope_median": median
    of per-image slopes, "slope_iqr": (q25, q75) of per-image slopes,
    "band_cycles_per_pixel": band / 32}``. An amplitude spectrum ``1/f^alpha``
    gives ``slope = -alpha``.
    """
    h = images.shape[-1]
    scaled = (band[0] * h / 32.0, band[1] * h / 32.0)
    f, mean_amp, per_image = radial_amplitude(images)
    per = np.array([_slope(f, a, scaled) for a in per_image])
    return {"slope": round(_slope(f, mean_amp, scaled), 4),
            "slope_median": round(float(np.median(per)), 4),
            "slope_iqr": (round(float(np.quantile(per, 0.25)), 4), round(float(np.quantile(per, 0.75)), 4)),
            "band_cycles_per_pixel": (band[0] / 32.0, band[1] / 32.0)}


def power_law_field(n: int, size: int, alpha: float, gen: torch.Generator | None = None,
                    pad: int = 1) -> torch.Tensor:
    """``n`` random-phase fields with amplitude spectrum ``1/f^alpha``, N x size x size, zero mean, unit std.

    ``pad > 1`` draws the field at ``pad * size`` and crops a corner, so the
    result is not periodic (like a photograph's frame), which is how the
    estimator above is tested.
    """
    big = size * pad
    fy = torch.fft.fftfreq(big, dtype=torch.float64).view(big, 1)
    fx = torch.fft.fftfreq(big, dtype=torch.float64).view(1, big)
    radius = torch.sqrt(fy ** 2 + fx ** 2)
    radius[0, 0] = 1.0
    amplitude = radius ** (-alpha)
    amplitude[0, 0] = 0.0
    phase = torch.rand(n, big, big, generator=gen, dtype=torch.float64) * 2 * math.pi
    field = torch.fft.ifft2(amplitude * torch.exp(1j * phase)).real[:, :size, :size]
    field = field - field.mean((1, 2), keepdim=True)
    return field / field.std((1, 2), keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- near-white

def near_white(images: torch.Tensor, level: int = NEAR_WHITE) -> torch.Tensor:
    """N x H x W bool: every channel >= ``level`` (images uint8 0..255 or float 0..1)."""
    x = _as_float(images)
    return (x >= level - 0.5).all(1)  # float views: 229.5 rounds to 230 when stored as uint8


def white_window(images: torch.Tensor, window: int = WINDOW, share: float = WINDOW_SHARE,
                 level: int = NEAR_WHITE) -> torch.Tensor:
    """N bool: the image holds a ``window`` x ``window`` window that is at least ``share`` near-white."""
    mask = near_white(images, level).float().unsqueeze(1)
    counts = F.avg_pool2d(mask, window, stride=1) * window * window
    return counts.flatten(1).amax(1) >= share * window * window - 1e-6


def trigger_box_white(images: torch.Tensor, box: tuple[int, int] = TRIGGER_BOX,
                      share: float = BOX_SHARE, level: int = NEAR_WHITE) -> torch.Tensor:
    """N bool: the trigger's box (rows/cols ``box[0]..box[1]-1``) is at least ``share`` near-white."""
    mask = near_white(images, level)[:, box[0]:box[1], box[0]:box[1]].float()
    return mask.mean((1, 2)) >= share - 1e-9


def augmented_views(images: torch.Tensor, views: int = 2, seed: int = 0) -> torch.Tensor:
    """``views`` SimCLR views of each uint8 image (the project's pre-training augmentation), float in 0..1."""
    from ...encoders.augment import SimCLRAugment

    augment = SimCLRAugment()
    x = images.float() / 255.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.cat([augment(x) for _ in range(views)])


# --------------------------------------------------------------------------- entry points

def image_premises(images: torch.Tensor, views: int = 2, seed: int = 0) -> dict:
    """Every data premise measured on uint8 N x 3 x 32 x 32 ``images``.

    Returns the spectrum measures of :func:`spectrum_slope`, and the shares
    (0..1): ``white_window_clean``, ``white_window_augmented`` (over
    ``views`` SimCLR views per image), ``trigger_box_half_white``, plus
    ``near_white_pixels`` (share of near-white pixels) and ``passes`` (a dict
    premise -> bool against ``TARGETS``).
    """
    if images.dtype != torch.uint8:
        raise ValueError("image_premises expects uint8 images (0..255)")
    out = {"n": len(images), **spectrum_slope(images)}
    out["near_white_pixels"] = round(float(near_white(images).float().mean()), 5)
    out["white_window_clean"] = round(float(white_window(images).float().mean()), 5)
    out["white_window_augmented"] = round(float(white_window(augmented_views(images, views, seed)).float().mean()), 5)
    out["trigger_box_half_white"] = round(float(trigger_box_white(images).float().mean()), 5)
    low, high = TARGETS["spectrum_slope"]
    out["passes"] = {"spectrum_slope": low <= out["slope"] <= high,
                     **{k: out[k] <= TARGETS[k] for k in ("white_window_clean", "white_window_augmented",
                                                          "trigger_box_half_white")}}
    return out


def data_premises(name: str, split: str = "train", n: int = 2000, seed: int = 0, views: int = 2,
                  data_dir: str = "", image_size: int = 32) -> dict:
    """Measure the data premises of dataset ``name`` on ``n`` images of ``split`` drawn with ``seed``.

    Loads the set through the registry (so ``synth-*`` sets come from the
    cache or are generated), draws a seeded subset of ``n`` images (all when
    ``n`` is larger), and returns :func:`image_premises` plus ``name``,
    ``split`` and ``data_version``.
    """
    from .base import data_version, load_dataset

    data = load_dataset(name, split, data_dir, image_size)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=gen)[:n]
    out = {"name": name, "split": split, "data_version": data_version(name)}
    out.update(image_premises(data.images[index], views=views, seed=seed))
    return out
