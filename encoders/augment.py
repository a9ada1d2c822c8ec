"""SimCLR augmentations applied to a whole batch of tensors at once.

Per-image PIL transforms cost more than the encoder itself on a small CPU;
these run as a few tensor operations on the training device. Semantics follow
torchvision's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)),
RandomHorizontalFlip(0.5), ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 and
RandomGrayscale(0.2). Two deliberate differences: the four jitter operations
run in one random order per batch (torchvision draws one per image), and a
crop box that does not fit is clipped to the image instead of re-drawn.
Inputs and outputs are float images in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def random_resized_crop(x: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        flip_p: float = 0.5) -> torch.Tensor:
    n, device = x.shape[0], x.device
    area = _uniform(n, *scale, device)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), device)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width as a fraction of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, device=device) * (1 - w) + w / 2) * 2 - 1  # centre in [-1, 1]
    cy = (torch.rand(n, device=device) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(torch.rand(n, device=device) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def horizontal_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (k + h.unsqueeze(1) * 6.0) % 6.0
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def color_jitter(x: torch.Tensor, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                 p: float = 0.8) -> torch.Tensor:
    n, device = x.shape[0], x.device
    apply = (torch.rand(n, device=device) < p).view(-1, 1, 1, 1)
    out = x
    for op in torch.randperm(4).tolist():
        if op == 0 and brightness:
            f = _uniform(n, 1 - brightness, 1 + brightness, device).view(-1, 1, 1, 1)
            out = (out * f).clamp(0, 1)
        elif op == 1 and contrast:
            f = _uniform(n, 1 - contrast, 1 + contrast, device).view(-1, 1, 1, 1)
            mean = grayscale(out).mean((2, 3), keepdim=True)
            out = ((out - mean) * f + mean).clamp(0, 1)
        elif op == 2 and saturation:
            f = _uniform(n, 1 - saturation, 1 + saturation, device).view(-1, 1, 1, 1)
            gray = grayscale(out)
            out = ((out - gray) * f + gray).clamp(0, 1)
        elif op == 3 and hue:
            shift = _uniform(n, -hue, hue, device).view(-1, 1, 1)
            hsv = _rgb_to_hsv(out)
            hsv = torch.stack(((hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]), 1)
            out = _hsv_to_rgb(hsv).clamp(0, 1)
    return torch.where(apply, out, x)


def random_grayscale(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    gray = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(gray, grayscale(x).expand_as(x), x)


@dataclass(frozen=True)
class SimCLRAugment:
    """The reference pre-training augmentation; ``crop=False`` gives BadEncoder's no-crop variant."""
    crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = random_resized_crop(x, self.crop_scale) if self.crop else horizontal_flip(x)
        x = color_jitter(x, *self.jitter, p=self.jitter_p)
        return random_grayscale(x, self.gray_p)
