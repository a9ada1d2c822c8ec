"""The embedded default: procedurally generated image families, no download.

Four sets play the roles of the paper's datasets (same class counts and
target classes, different pixels):

- ``synth-cifar10``: 10 object classes built from parts (plane, car, bird, ...)
  on cluttered backgrounds, smallish in the frame: the first pre-training set;
- ``synth-stl10``: the same 10 classes in another style (larger, textured
  objects on smooth backgrounds): the second pre-training set;
- ``synth-gtsrb``: 43 traffic-sign classes (outline x colour scheme x symbol);
- ``synth-svhn``: house-number digits 0-9 with neighbouring digits as
  distractors.

Each image is a class template (drawn once at 64x64 as up to three colour
slots) warped by a random affine transform, coloured, textured and composited
over a random background with clutter, then blurred and noised. Everything
is drawn from a seeded torch generator, so a set is a pure function of its
name, split, ``GENERATOR_VERSION`` and its own ``revision``; sets are cached under
``DEFBENCH_HOME/cache`` after the first (few-second) generation.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.path import Path as PolyPath

from ...core import paths
from .base import DatasetSpec, ImageSet, register_dataset, resize_uint8

GENERATOR_VERSION = 5
RES = 64  # template resolution
NATIVE = 32  # generated image size

# --------------------------------------------------------------------------- shapes

_YY, _XX = torch.meshgrid(torch.linspace(-1, 1, RES), torch.linspace(-1, 1, RES), indexing="ij")


def ellipse(cx, cy, rx, ry, angle=0.0) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    x, y = _XX - cx, _YY - cy
    u, v = c * x + s * y, -s * x + c * y
    return ((u / rx) ** 2 + (v / ry) ** 2 <= 1).float()


def box(cx, cy, w, h, angle=0.0) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    x, y = _XX - cx, _YY - cy
    u, v = c * x + s * y, -s * x + c * y
    return ((u.abs() <= w / 2) & (v.abs() <= h / 2)).float()


def polygon(points) -> torch.Tensor:
    pts = np.stack([_XX.flatten().numpy(), _YY.flatten().numpy()], 1)
    inside = PolyPath(np.asarray(points, dtype=float)).contains_points(pts)
    return torch.from_numpy(inside.reshape(RES, RES).astype(np.float32))


def regular(n, r, cx=0.0, cy=0.0, rot=0.0) -> torch.Tensor:
    a = [rot + 2 * math.pi * k / n for k in range(n)]
    return polygon([(cx + r * math.sin(t), cy - r * math.cos(t)) for t in a])


def union(*masks) -> torch.Tensor:
    return torch.stack(masks).amax(0)


def ring(r_out, r_in) -> torch.Tensor:
    return ellipse(0, 0, r_out, r_out) - ellipse(0, 0, r_in, r_in)


# 5x7 bitmap digits, row-major, '#' = ink.
_GLYPHS = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
}


def glyph(char: str, cx=0.0, cy=0.0, height=1.6) -> torch.Tensor:
    """A digit drawn into the template grid, ``height`` in template units (grid spans 2)."""
    bitmap = torch.tensor([[c == "#" for c in row] for row in _GLYPHS[char]], dtype=torch.float32)
    width = height * 5 / 7
    u = (_XX - cx) / width + 0.5  # 0..1 across the glyph box
    v = (_YY - cy) / height + 0.5
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    col = (u.clamp(0, 0.999) * 5).long()
    row = (v.clamp(0, 0.999) * 7).long()
    return bitmap[row, col] * inside.float()


def arrow(direction: str) -> torch.Tensor:
    shaft = box(0, 0.15, 0.18, 0.6)
    head = polygon([(-0.35, -0.1), (0.35, -0.1), (0, -0.55)])
    up = union(shaft, head)
    turns = {"up": 0, "right": 1, "down": 2, "left": 3}[direction]
    return torch.rot90(up, -turns, dims=(0, 1))


def _template(*slots) -> torch.Tensor:
    """Stack colour-slot masks (body, accent, detail) into a 3 x RES x RES template."""
    empty = torch.zeros(RES, RES)
    slots = list(slots) + [empty] * (3 - len(slots))
    return torch.stack([s.clamp(0, 1) for s in slots])


# --------------------------------------------------------------------------- classes

def object_templates() -> tuple[list[str], torch.Tensor]:
    legs = lambda xs, top, h: union(*[box(x, top + h / 2, 0.08, h) for x in xs])  # noqa: E731
    classes = {
        "airplane": _template(union(ellipse(0, 0, 0.8, 0.14), polygon([(-0.7, -0.05), (-0.85, -0.35), (-0.6, -0.05)])),
                              polygon([(-0.15, 0), (0.15, 0), (-0.25, -0.75), (-0.4, -0.75)]) +
                              polygon([(-0.15, 0), (0.15, 0), (-0.25, 0.75), (-0.4, 0.75)])),
        "automobile": _template(box(0, 0.1, 1.5, 0.4), polygon([(-0.4, -0.1), (0.35, -0.1), (0.2, -0.4), (-0.25, -0.4)]),
                                union(ellipse(-0.45, 0.35, 0.17, 0.17), ellipse(0.45, 0.35, 0.17, 0.17))),
        "bird": _template(union(ellipse(0, 0.05, 0.5, 0.3), ellipse(0.45, -0.3, 0.2, 0.2), polygon([(-0.45, 0), (-0.9, -0.2), (-0.85, 0.2)])),
                          polygon([(0.6, -0.35), (0.85, -0.28), (0.6, -0.2)]), ellipse(0.5, -0.35, 0.05, 0.05)),
        "cat": _template(union(ellipse(0, 0.1, 0.55, 0.5), polygon([(-0.5, -0.1), (-0.45, -0.75), (-0.1, -0.35)]),
                               polygon([(0.5, -0.1), (0.45, -0.75), (0.1, -0.35)])),
                         union(ellipse(0, 0.3, 0.12, 0.08)),
                         union(ellipse(-0.22, 0, 0.08, 0.1), ellipse(0.22, 0, 0.08, 0.1))),
        "deer": _template(union(ellipse(0, 0, 0.55, 0.25), legs([-0.4, -0.2, 0.2, 0.4], 0.15, 0.6), ellipse(0.6, -0.35, 0.15, 0.12)),
                          union(box(0.55, -0.65, 0.06, 0.4, 0.4), box(0.75, -0.65, 0.06, 0.4, -0.4))),
        "dog": _template(union(ellipse(0, 0, 0.55, 0.28), legs([-0.4, -0.2, 0.2, 0.4], 0.15, 0.5), ellipse(0.6, -0.3, 0.25, 0.2)),
                         ellipse(0.55, -0.45, 0.1, 0.2, 0.5), ellipse(0.75, -0.3, 0.05, 0.05)),
        "frog": _template(ellipse(0, 0.15, 0.75, 0.45),
                          union(ellipse(-0.35, -0.3, 0.18, 0.18), ellipse(0.35, -0.3, 0.18, 0.18)),
                          union(ellipse(-0.35, -0.3, 0.07, 0.07), ellipse(0.35, -0.3, 0.07, 0.07))),
        "horse": _template(union(ellipse(0, 0, 0.6, 0.25), legs([-0.45, -0.25, 0.25, 0.45], 0.15, 0.7),
                                 box(0.6, -0.35, 0.22, 0.55, -0.5)),
                           box(0.45, -0.4, 0.08, 0.45, -0.5)),
        "ship": _template(polygon([(-0.9, 0.1), (0.9, 0.1), (0.6, 0.5), (-0.6, 0.5)]),
                          polygon([(0.05, -0.8), (0.05, 0.0), (0.6, 0.0)]), box(0, -0.35, 0.07, 0.9)),
        "truck": _template(box(-0.2, -0.05, 1.1, 0.7), box(0.6, 0.1, 0.45, 0.45),
                           union(ellipse(-0.5, 0.4, 0.15, 0.15), ellipse(-0.1, 0.4, 0.15, 0.15), ellipse(0.6, 0.4, 0.15, 0.15))),
    }
    return list(classes), torch.stack(list(classes.values()))


# (name, outline, colour scheme, symbol)
def sign_classes() -> list[tuple[str, str, str, str]]:
    symbols = ["2", "3", "5", "6", "7", "8", "0", "bar", "left", "right", "up", "slash"]
    out = [(f"limit-{s}" if s.isdigit() else f"no-{s}", "circle", "prohibit", s) for s in symbols]
    out += [(f"keep-{s}", "circle", "mandatory", s) for s in ["left", "right", "up", "down", "1", "4", "9", "bar", "dot", "slash"]]
    out += [(f"warn-{s}", "triangle", "warning", s) for s in ["bang", "left", "right", "up", "bar", "1", "2", "4", "5", "9", "dot", "slash", "x"]]
    out += [("stop", "octagon", "stop", "bar"), ("stop-x", "octagon", "stop", "x"),
            ("yield", "triangle_down", "warning", "none"), ("yield-dot", "triangle_down", "warning", "dot"),
            ("info-x", "square", "info", "x"), ("info", "square", "info", "up"),
            ("info-dot", "square", "info", "dot")]
    # class 12, as in GTSRB: the only diamond, as the real priority-road sign is the only yellow diamond
    out.insert(12, ("priority", "diamond", "priority", "none"))
    assert len(out) == 43
    return out


def _symbol(name: str) -> torch.Tensor:
    if name.isdigit():
        return glyph(name, height=1.0)
    shapes = {
        "bar": lambda: box(0, 0, 0.9, 0.22),
        "slash": lambda: box(0, 0, 1.2, 0.16, -math.pi / 4),
        "x": lambda: union(box(0, 0, 1.0, 0.16, math.pi / 4), box(0, 0, 1.0, 0.16, -math.pi / 4)),
        "dot": lambda: ellipse(0, 0, 0.25, 0.25),
        "bang": lambda: union(box(0, -0.12, 0.14, 0.5), ellipse(0, 0.3, 0.09, 0.09)),
        "none": lambda: torch.zeros(RES, RES),
    }
    if name in shapes:
        return shapes[name]()
    return arrow(name) * ellipse(0, 0, 0.7, 0.7)


def sign_templates() -> tuple[list[str], torch.Tensor]:
    outlines = {
        "circle": (ellipse(0, 0, 0.95, 0.95), ellipse(0, 0, 0.72, 0.72)),
        "triangle": (regular(3, 1.05, cy=0.2), regular(3, 0.7, cy=0.2)),
        "triangle_down": (regular(3, 1.05, cy=-0.2, rot=math.pi), regular(3, 0.7, cy=-0.2, rot=math.pi)),
        "octagon": (regular(8, 0.98, rot=math.pi / 8), regular(8, 0.8, rot=math.pi / 8)),
        "diamond": (regular(4, 0.98), regular(4, 0.6)),
        "square": (box(0, 0, 1.7, 1.7), box(0, 0, 1.45, 1.45)),
    }
    names, templates = [], []
    for name, outline, _scheme, symbol in sign_classes():
        outer, inner = outlines[outline]
        cy = 0.2 if outline == "triangle" else (-0.2 if outline == "triangle_down" else 0.0)
        sym = torch.roll(_symbol(symbol), shifts=int(cy * RES / 2), dims=0) * inner
        templates.append(_template((outer - inner).clamp(0, 1), inner, sym))
        names.append(name)
    return names, torch.stack(templates)


# paint reflectances per scheme: rim, fill, symbol (RGB in [0, 1]); white paint is 0.76, not 1:
# under daylight a sign's white reads light grey; only its lit side under the brightest light nears white
_SCHEMES = {
    "prohibit": ((0.7, 0.1, 0.1), (0.76, 0.76, 0.74), (0.06, 0.06, 0.06)),
    "mandatory": ((0.1, 0.22, 0.65), (0.1, 0.28, 0.7), (0.76, 0.76, 0.76)),
    "warning": ((0.75, 0.1, 0.1), (0.76, 0.73, 0.64), (0.06, 0.06, 0.06)),
    "stop": ((0.76, 0.76, 0.76), (0.7, 0.08, 0.08), (0.76, 0.76, 0.76)),
    "priority": ((0.76, 0.76, 0.76), (0.85, 0.7, 0.1), (0.1, 0.1, 0.1)),
    "info": ((0.76, 0.76, 0.76), (0.1, 0.28, 0.65), (0.76, 0.76, 0.76)),
}


def digit_templates() -> tuple[list[str], torch.Tensor]:
    names = [str(d) for d in range(10)]
    return names, torch.stack([_template(glyph(d, height=1.7)) for d in names])


# --------------------------------------------------------------------------- natural image statistics

LUM_MAX, LUM_BIAS, LUM_SPREAD = 0.78, 0.3, 1.3  # surface luminance: 0.03 + (LUM_MAX - 0.03) * sigmoid(LUM_SPREAD z + LUM_BIAS)
BG_ALPHA = 1.0  # mean spectral exponent of background textures (objects: 1.0)
LIGHT_MAX = 0.3  # strongest log-illumination gradient across the frame
EXPOSURE_MAX, EXPOSURE_SD = 1.0, 0.12
LIGHT_CENTRE = 0.5  # 1: the gradient's brightest corner is 1 (never brightens a surface)
TONE_KNEE = 0.7  # the tone curve is linear below, a soft shoulder above

_LIN = torch.linspace(-1, 1, NATIVE)
_Y, _X = torch.meshgrid(_LIN, _LIN, indexing="ij")  # image coordinates, y downwards, each in [-1, 1]


@dataclass(frozen=True)
class Style:
    scale: tuple[float, float]  # object size as a fraction of the frame
    rotation: float  # max |angle| in radians
    shift: float  # max |translation| in normalised units
    flip: bool
    clutter: int  # max number of textured background blobs
    texture: float  # contrast (std of log luminance) of object surfaces
    blur: tuple[float, float]
    noise: float
    bg_noise: float  # contrast of background surfaces
    chroma: float = 1.0  # scale of the opponent-colour spread (1 = natural surfaces)
    context: float = 0.0  # share of object images drawn with their class's usual scene and colour
    occlusion: float = 0.0  # share of images with a foreground occluder over the object


def _rand(gen, n, low, high):
    return torch.rand(n, generator=gen) * (high - low) + low


def _col(v: torch.Tensor) -> torch.Tensor:
    """A per-image value (n) as an n x 1 x 1 x 1 tensor."""
    return v.view(-1, 1, 1, 1)


def power_noise(gen, n, channels, alpha, size=NATIVE):
    """``n x channels`` random fields with amplitude spectrum ``1/f^alpha``: zero mean, unit std.

    ``alpha`` is a number or one value per image. White Gaussian noise shaped
    in the Fourier domain: random phase, the natural 1/f fall-off (alpha
    about 1 for textures, 2 for smooth illumination and shape warps).
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float32).expand(n)
    spectrum = torch.fft.rfft2(torch.randn(n, channels, size, size, generator=gen))
    fy = torch.fft.fftfreq(size).view(1, size, 1)
    fx = torch.fft.rfftfreq(size).view(1, 1, size // 2 + 1)
    radius = torch.sqrt(fy ** 2 + fx ** 2).clamp_min(1.0 / size)
    amplitude = radius ** (-alpha.view(-1, 1, 1))
    amplitude[:, 0, 0] = 0.0
    field = torch.fft.irfft2(spectrum * amplitude[:, None], s=(size, size))
    field = field - field.mean((2, 3), keepdim=True)
    return field / field.std((2, 3), keepdim=True).clamp_min(1e-6)


class TextureBank:
    """A bank of 1/f^alpha textures; images take random crops of them.

    Per exponent, 64 periodic 64 x 64 fields are cut (with wrap-around, so
    seamlessly) into 16 overlapping 32 x 32 crops each, at offsets on a
    16-pixel lattice: 1,024 textures per exponent, none periodic itself. An
    image's texture is then one index, instead of an FFT per image.
    """
    ALPHAS = torch.tensor([0.7, 0.85, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5])

    def __init__(self, gen, per_alpha: int = 64, size: int = 2 * NATIVE, stride: int = NATIVE // 2):
        fields = torch.cat([power_noise(gen, per_alpha, 1, float(a), size)[:, 0] for a in self.ALPHAS])
        tiled = fields.repeat(1, 2, 2)  # wrap-around without a roll per offset
        crops = [tiled[:, dy:dy + NATIVE, dx:dx + NATIVE] for dy in range(0, size, stride) for dx in range(0, size, stride)]
        self.per_alpha = per_alpha * len(crops)
        self.crops = torch.stack(crops, 1).reshape(len(self.ALPHAS) * self.per_alpha, NATIVE, NATIVE)

    def draw(self, gen, n, alpha, channels: int = 1) -> torch.Tensor:
        """``n x channels x 32 x 32`` texture fields with exponent ``alpha`` (a number or one per image)."""
        alpha = torch.as_tensor(alpha, dtype=torch.float32).expand(n)
        bucket = (alpha[:, None] - self.ALPHAS[None]).abs().argmin(1).repeat_interleave(channels)
        index = bucket * self.per_alpha + torch.randint(0, self.per_alpha, (n * channels,), generator=gen)
        return self.crops.index_select(0, index).view(n, channels, NATIVE, NATIVE)


@lru_cache(maxsize=1)
def texture_bank() -> TextureBank:
    """The generator's one texture bank, drawn from a seed fixed by ``GENERATOR_VERSION`` (once per process)."""
    return TextureBank(torch.Generator().manual_seed(7919 * GENERATOR_VERSION))


def _opponent_to_rgb(lum, rg, by):
    """Luminance + red-green + blue-yellow opponent values -> RGB (n x 3).

    ``lum = (R+G+B)/3``, ``rg = (R-G)/2``, ``by = (R+G)/4 - B/2`` (positive = yellow).
    """
    return torch.stack([lum + 2 * by / 3 + rg, lum + 2 * by / 3 - rg, lum - 4 * by / 3], 1)


def natural_colors(gen, n, chroma=1.0, lum_mean=0.0, lum_max=None):
    """Surface colours (n x 3) drawn in a decorrelated opponent space with natural spreads.

    Luminance is a squashed normal (mean about 0.48, rarely above 0.8), the
    two chromatic axes are independent normals a fifth to a third as wide
    (blue-yellow, the daylight axis, wider than red-green), so
    greys, browns, greens and muted blues dominate and saturated or near-white
    colours are rare, as on natural surfaces.
    """
    lum_max = LUM_MAX if lum_max is None else lum_max
    lum = 0.03 + (lum_max - 0.03) * torch.sigmoid(LUM_SPREAD * torch.randn(n, generator=gen) + LUM_BIAS + lum_mean)
    rg = 0.045 * chroma * torch.randn(n, generator=gen)
    by = 0.03 + 0.08 * chroma * torch.randn(n, generator=gen)
    return _opponent_to_rgb(lum, rg, by).clamp(0.02, 0.95)


def _jitter_color(base, gen, lum=0.08, chroma=0.04):
    """Jitter RGB colours (n x 3) in opponent space: brightness more than hue."""
    n = base.shape[0]
    m = base.mean(1)
    rg = (base[:, 0] - base[:, 1]) / 2
    by = (base[:, 0] + base[:, 1]) / 4 - base[:, 2] / 2
    return _opponent_to_rgb(m + lum * torch.randn(n, generator=gen), rg + chroma * torch.randn(n, generator=gen),
                            by + chroma * torch.randn(n, generator=gen)).clamp(0.02, 0.95)


def _surface(color, contrast, lum_field, chroma_field=None):
    """A textured surface: colour x exp(contrast x 1/f field) (+ a weaker red-green texture)."""
    out = color[:, :, None, None] * torch.exp(_col(contrast) * lum_field)
    if chroma_field is not None:
        out = out + (0.15 * _col(contrast) * chroma_field) * torch.tensor([0.5, -0.5, 0.0]).view(1, 3, 1, 1)
    return out


def _smooth_step(d, width=0.08):
    """Soft inside-mask from a signed distance-like value (inside where d < 0)."""
    return torch.sigmoid(-d / width)


def _blob(tex, gen, n, cx, cy, rx, ry, wobble):
    """Irregular soft blobs: an ellipse whose boundary is displaced by a smooth random field."""
    smooth = tex.draw(gen, n, 2.0)[:, 0]
    d = ((_X - _col(cx)[:, 0]) / _col(rx)[:, 0]) ** 2 + ((_Y - _col(cy)[:, 0]) / _col(ry)[:, 0]) ** 2
    return _smooth_step(d + wobble * smooth - 1.0, 0.15)[:, None]


def _bar(n, cx, cy, angle, width):
    """Soft straight bars (branches, poles, wires) through (cx, cy)."""
    d = (-torch.sin(_col(angle)[:, 0]) * (_X - _col(cx)[:, 0])
         + torch.cos(_col(angle)[:, 0]) * (_Y - _col(cy)[:, 0])).abs()
    return _smooth_step(d - _col(width)[:, 0] / 2, 0.03)[:, None]


def _two_material_scene(tex, gen, n, top, bottom, contrast_top, contrast_bottom, horizon, angle, alpha):
    """Two textured materials split by a wavy boundary (sky/ground, wall/floor, field/forest)."""
    fields = tex.draw(gen, n, alpha, 4)
    smooth = tex.draw(gen, n, 2.0)[:, 0]
    side = torch.cos(_col(angle)[:, 0]) * _X + torch.sin(_col(angle)[:, 0]) * _Y
    lower = _smooth_step(_col(horizon)[:, 0] - side + 0.15 * smooth, 0.05)[:, None]
    upper = _surface(top, contrast_top, fields[:, 0:1], fields[:, 1:2])
    return upper * (1 - lower) + _surface(bottom, contrast_bottom, fields[:, 2:3], fields[:, 3:4]) * lower


def _clutter(tex, gen, n, bg, count, chroma, contrast, alpha):
    """Textured irregular blobs (stones, bushes, things in the distance) over the background."""
    for _ in range(count):
        present = (torch.rand(n, generator=gen) < 0.6).float()
        mask = _blob(tex, gen, n, _rand(gen, n, -1, 1), _rand(gen, n, -1, 1), _rand(gen, n, 0.1, 0.4),
                     _rand(gen, n, 0.1, 0.4), 0.6) * _col(present)
        surface = _surface(natural_colors(gen, n, chroma), contrast * _rand(gen, n, 0.6, 1.4), tex.draw(gen, n, alpha))
        bg = bg * (1 - mask) + surface * mask
    return bg


def _occluder(tex, gen, n, share, cx, cy, reach, chroma):
    """Foreground occluders near the object's edge, textured blobs or bars (leaves, branches, posts).

    Returns (mask, surface); the occluder sits at 0.5..1 object radii from the
    object's centre, so it hides part of the object but rarely all of it.
    """
    present = (torch.rand(n, generator=gen) < share).float()
    direction = _rand(gen, n, 0, 2 * math.pi)
    r = reach * _rand(gen, n, 0.5, 1.0)
    ox, oy = cx + r * torch.cos(direction), cy + r * torch.sin(direction)
    blob = _blob(tex, gen, n, ox, oy, _rand(gen, n, 0.12, 0.3), _rand(gen, n, 0.12, 0.3), 0.5)
    bar = _bar(n, ox, oy, _rand(gen, n, 0, math.pi), _rand(gen, n, 0.08, 0.2))
    is_bar = _col((torch.rand(n, generator=gen) < 0.4).float())
    mask = (blob * (1 - is_bar) + bar * is_bar) * _col(present)
    surface = _surface(natural_colors(gen, n, chroma, lum_mean=-0.4), _rand(gen, n, 0.15, 0.35),
                       tex.draw(gen, n, 1.0))
    return mask, surface


def _affine(gen, style: Style, n) -> dict:
    return {"angle": _rand(gen, n, -style.rotation, style.rotation), "scale": _rand(gen, n, *style.scale),
            "aspect": _rand(gen, n, 0.85, 1.15),
            "flip": (torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if style.flip else torch.ones(n)),
            "tx": _rand(gen, n, -style.shift, style.shift), "ty": _rand(gen, n, -style.shift, style.shift)}


def _warp(templates, p: dict, x_offset: float = 0.0, dx=0.0, dy=0.0):
    """Warp each template by its affine draw; ``x_offset`` moves it sideways by that many object widths,
    ``dx``/``dy`` by that much in image units."""
    n = templates.shape[0]
    sx, sy = 1 / (p["scale"] * p["aspect"]), 1 / (p["scale"] / p["aspect"])
    tx = p["tx"] + x_offset * p["scale"] + dx
    ty = p["ty"] + dy
    cos, sin, flip = torch.cos(p["angle"]), torch.sin(p["angle"]), p["flip"]
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sx, -tx * sx], 1),
                         torch.stack([sin * sy * flip, cos * sy, -ty * sy], 1)], 1)
    grid = F.affine_grid(theta, [n, templates.shape[1], NATIVE, NATIVE], align_corners=False)
    return F.grid_sample(templates, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shift(images, dx, dy):
    """Translate each image by (dx, dy) in normalised units (the frame spans 2), zeros coming in."""
    n = images.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = 1.0, 1.0, -dx, -dy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _separable(images, kernel):
    """Filter N x C x H x W images with one normalised 1-D kernel per image (N x K), rows then columns."""
    r = kernel.shape[1] // 2
    n, c, h, w = images.shape
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = sum(kernel[:, i, None, None, None] * x[:, :, :, i:i + w] for i in range(2 * r + 1))
    return sum(kernel[:, i, None, None, None] * x[:, :, i:i + h, :] for i in range(2 * r + 1))


def _gauss_kernel(sigma, radius):
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2 + 1e-6))
    return kernel / kernel.sum(1, keepdim=True)


def _blur(images, gen, sigma_range):
    return _separable(images, _gauss_kernel(_rand(gen, images.shape[0], *sigma_range), 2))


def _soft(mask, passes=2):
    """Near-Gaussian blur of masks (n x c x H x W) for shading and shadows: ``passes`` 3x3 box filters
    (sigma about 1.15 for 2, 1.4 for 3)."""
    for _ in range(passes):
        mask = F.avg_pool2d(mask, 3, stride=1, padding=1, count_include_pad=False)
    return mask


def _tone(x):
    """A camera's tone curve: linear up to 0.7, then a soft shoulder toward 1 (no hard-clipped flats)."""
    return torch.where(x < TONE_KNEE, x, TONE_KNEE + (1 - TONE_KNEE) * torch.tanh((x - TONE_KNEE) / (1 - TONE_KNEE)))


def _lit_object(masks, colors, textures, p, light_angle, shading, soft=None):
    """Composite warped colour slots with surface texture, directional and volume shading.

    ``masks`` n x 3 x H x W (body, accent, detail), ``colors`` list of n x 3,
    ``textures`` list of n x 1 x H x W log-luminance fields (already scaled).
    The light falls from ``light_angle`` across the object (its lit side 1,
    the far side ``exp(-2.4 shading)``) and the silhouette's rim is darker
    than its middle (a rounded body; ``soft`` is the blurred coverage, when
    the caller has it). Returns (object image, coverage).
    """
    n = masks.shape[0]
    cover = masks.amax(1, keepdim=True)
    soft = _soft(cover, 2) if soft is None else soft
    u = (torch.cos(_col(light_angle)[:, 0]) * (_X - _col(p["tx"])[:, 0])
         + torch.sin(_col(light_angle)[:, 0]) * (_Y - _col(p["ty"])[:, 0])) / _col(p["scale"])[:, 0]
    shade = torch.exp(_col(shading)[:, 0] * (u.clamp(-1.2, 1.2) - 1.2))[:, None]
    shade = shade * (0.65 + 0.35 * soft.clamp(0, 1))
    out = torch.zeros(n, 3, NATIVE, NATIVE)
    for slot in range(masks.shape[1]):
        m = masks[:, slot:slot + 1]
        out = out * (1 - m) + colors[slot][:, :, None, None] * torch.exp(textures[slot]) * shade * m
    return out, cover


# Real photos are not colour-blind: each object class has a usual setting and
# usual colours (planes in the sky, frogs green). The scene/colour priors below
# hold for a share ``style.context`` of the images; the rest are random natural
# materials. Reflectances, not displayed values: the scene light multiplies them.
_SCENES = {  # top material, bottom material, texture contrast top, bottom
    "sky": ((0.4, 0.53, 0.76), (0.52, 0.6, 0.72), 0.06, 0.10),
    "road": ((0.48, 0.5, 0.44), (0.36, 0.36, 0.37), 0.22, 0.16),
    "grass": ((0.43, 0.51, 0.33), (0.28, 0.4, 0.17), 0.22, 0.28),
    "water": ((0.5, 0.6, 0.7), (0.2, 0.34, 0.48), 0.08, 0.14),
    "indoor": ((0.58, 0.52, 0.44), (0.45, 0.34, 0.26), 0.12, 0.18),
}
_OBJECT_PRIORS = {  # class -> (scene, usual body colour)
    "airplane": ("sky", (0.62, 0.63, 0.66)), "automobile": ("road", (0.62, 0.13, 0.12)),
    "bird": ("sky", (0.38, 0.28, 0.22)), "cat": ("indoor", (0.48, 0.44, 0.4)),
    "deer": ("grass", (0.52, 0.35, 0.21)), "dog": ("indoor", (0.6, 0.47, 0.32)),
    "frog": ("grass", (0.32, 0.52, 0.19)), "horse": ("grass", (0.35, 0.23, 0.14)),
    "ship": ("water", (0.62, 0.62, 0.6)), "truck": ("road", (0.22, 0.34, 0.62)),
}


def _scene(tex, gen, n, style: Style, typical=None, scene_index=None):
    """A background: the usual scene where ``typical`` (by ``scene_index``), else two random natural materials.

    Backgrounds are a little smoother (alpha about 1.2) than objects (about 1),
    as in photographs focused on the object; then textured clutter.
    """
    alpha = BG_ALPHA + 0.15 * torch.randn(n, generator=gen)
    top, bottom = natural_colors(gen, n, style.chroma), natural_colors(gen, n, style.chroma)
    c_top = style.bg_noise * _rand(gen, n, 0.5, 1.5)
    c_bottom = style.bg_noise * _rand(gen, n, 0.5, 1.5)
    horizon = _rand(gen, n, -0.9, 0.9)
    angle = _rand(gen, n, 0, 2 * math.pi)
    if typical is not None:
        table = list(_SCENES.values())
        s_top = _jitter_color(torch.tensor([table[i][0] for i in scene_index]), gen)
        s_bottom = _jitter_color(torch.tensor([table[i][1] for i in scene_index]), gen)
        s_ct = torch.tensor([table[i][2] for i in scene_index]) * _rand(gen, n, 0.7, 1.4)
        s_cb = torch.tensor([table[i][3] for i in scene_index]) * _rand(gen, n, 0.7, 1.4)
        top = torch.where(typical[:, None], s_top, top)
        bottom = torch.where(typical[:, None], s_bottom, bottom)
        c_top, c_bottom = torch.where(typical, s_ct, c_top), torch.where(typical, s_cb, c_bottom)
        horizon = torch.where(typical, _rand(gen, n, -0.2, 0.6), horizon)
        angle = torch.where(typical, math.pi / 2 + _rand(gen, n, -0.15, 0.15), angle)
    bg = _two_material_scene(tex, gen, n, top, bottom, c_top, c_bottom, horizon, angle, alpha)
    return _clutter(tex, gen, n, bg, style.clutter, style.chroma, max(style.bg_noise, 0.15), alpha)


def _finish(tex, gen, n, image, light_angle):
    """Scene light (a gradient along ``light_angle`` and low-frequency variation), exposure, tone curve."""
    ramp = (torch.cos(_col(light_angle)[:, 0]) * _X + torch.sin(_col(light_angle)[:, 0]) * _Y) / 1.42
    log_light = _col(_rand(gen, n, 0.05, LIGHT_MAX))[:, 0] * (ramp - LIGHT_CENTRE) + 0.1 * tex.draw(gen, n, 2.5)[:, 0]
    exposure = torch.exp(EXPOSURE_SD * torch.randn(n, generator=gen)).clamp(0.5, EXPOSURE_MAX)
    return _tone(image * torch.exp(log_light)[:, None] * _col(exposure))


def render_objects(labels, templates, gen, style: Style, tex: TextureBank):
    n = len(labels)
    classes = list(_OBJECT_PRIORS)
    scene_names = list(_SCENES)
    scene_index = [scene_names.index(_OBJECT_PRIORS[classes[c]][0]) for c in labels.tolist()]
    usual_body = torch.tensor([_OBJECT_PRIORS[c][1] for c in classes])[labels]
    typical = torch.rand(n, generator=gen) < style.context
    background = _scene(tex, gen, n, style, typical, scene_index)
    pose = _affine(gen, style, n)
    light_angle = _rand(gen, n, -math.pi, 0)  # light from above, mostly
    masks = _warp(templates[labels], pose)
    # cast shadow: the blurred silhouette shifted away from the light
    soft = _soft(masks.amax(1, keepdim=True), 2)
    shadow = _shift(_soft(soft, 1), -0.12 * torch.cos(light_angle), -0.12 * torch.sin(light_angle))
    background = background * (1 - _col(_rand(gen, n, 0.15, 0.45)) * shadow)
    body = torch.where(typical[:, None], _jitter_color(usual_body, gen), natural_colors(gen, n, style.chroma))
    accent = natural_colors(gen, n, style.chroma)
    detail = natural_colors(gen, n, 0.5, lum_mean=-1.5)
    fields = tex.draw(gen, n, 1.0 + 0.15 * torch.randn(n, generator=gen), 2)
    contrast = _col(style.texture * _rand(gen, n, 0.5, 1.5))
    obj, cover = _lit_object(masks, [body, accent, detail], [contrast * fields[:, :1], contrast * fields[:, 1:], torch.zeros(1, 1, 1, 1)],
                             pose, light_angle, _rand(gen, n, 0.1, 0.4), soft)
    image = background * (1 - cover) + obj
    occ, occ_surface = _occluder(tex, gen, n, style.occlusion, pose["tx"], pose["ty"], pose["scale"], style.chroma)
    image = image * (1 - occ) + occ_surface * occ
    return _finish(tex, gen, n, image, light_angle)


def render_signs(labels, templates, gen, style: Style, tex: TextureBank):
    n = len(labels)
    schemes = [c[2] for c in sign_classes()]
    palette = torch.tensor([_SCHEMES[s] for s in schemes])[labels]  # n x 3 slots x 3 rgb
    outdoor = torch.tensor([list(_SCENES).index(s) for s in ("sky", "grass", "road")])
    scene_index = outdoor[torch.randint(0, 3, (n,), generator=gen)].tolist()
    background = _scene(tex, gen, n, style, torch.rand(n, generator=gen) < 0.5, scene_index)
    pose = _affine(gen, style, n)
    # the pole: a grey bar from the sign down to the frame's bottom, in 60 % of the images
    pole = _bar(n, pose["tx"], pose["ty"], math.pi / 2 + _rand(gen, n, -0.05, 0.05), _rand(gen, n, 0.08, 0.16))
    pole = pole * (_Y > _col(pose["ty"])[:, 0]).float()[:, None] * _col((torch.rand(n, generator=gen) < 0.6).float())
    pole_surface = _surface(_jitter_color(torch.full((n, 3), 0.42), gen), torch.full((n,), 0.15), tex.draw(gen, n, 1.0))
    background = background * (1 - pole) + pole_surface * pole
    light_angle = _rand(gen, n, -math.pi, 0)
    masks = _warp(templates[labels], pose)
    colors = [_jitter_color(palette[:, i], gen, lum=0.05, chroma=0.02) for i in range(3)]
    dirt = tex.draw(gen, n, 1.0) * _col(_rand(gen, n, 0.04, 0.12))
    obj, cover = _lit_object(masks, colors, [dirt, dirt, dirt], pose, light_angle, _rand(gen, n, 0.0, 0.25))
    image = background * (1 - cover) + obj
    occ, occ_surface = _occluder(tex, gen, n, style.occlusion, pose["tx"], pose["ty"], pose["scale"] * 1.1, 1.0)
    image = image * (1 - occ) + occ_surface * occ
    return _finish(tex, gen, n, image, light_angle)


def render_digits(labels, templates, gen, style: Style, tex: TextureBank):
    n = len(labels)
    wall, plate = natural_colors(gen, n, style.chroma), natural_colors(gen, n, style.chroma)
    fields = tex.draw(gen, n, 1.25 + 0.15 * torch.randn(n, generator=gen), 3)
    bg = _surface(wall, style.bg_noise * _rand(gen, n, 0.5, 1.5), fields[:, :1], fields[:, 1:2])
    # a plate behind the number in half the images: its edges are the strongest clutter
    pose = _affine(gen, style, n)
    half_w, half_h = _rand(gen, n, 0.7, 1.3), _rand(gen, n, 0.45, 0.8)
    box_d = torch.maximum((_X - _col(pose["tx"])[:, 0]).abs() / _col(half_w)[:, 0],
                          (_Y - _col(pose["ty"])[:, 0]).abs() / _col(half_h)[:, 0])
    plate_mask = _smooth_step(box_d - 1, 0.02)[:, None] * _col((torch.rand(n, generator=gen) < 0.5).float())
    bg = bg * (1 - plate_mask) + _surface(plate, style.bg_noise * _rand(gen, n, 0.3, 1.0), fields[:, 2:3]) * plate_mask
    behind = bg.mean(1).flatten(1).median(1).values
    # keep the digit readable: its luminance differs from the surface's by 0.25..0.5, either way
    delta = _rand(gen, n, 0.25, 0.5)
    darker = torch.where(behind + delta > 0.85, torch.ones(n, dtype=torch.bool),
                         torch.where(behind - delta < 0.03, torch.zeros(n, dtype=torch.bool),
                                     torch.rand(n, generator=gen) < 0.5))
    ink_lum = torch.where(darker, behind - delta, behind + delta).clamp(0.03, 0.85)
    ink_col = _opponent_to_rgb(ink_lum, 0.045 * style.chroma * torch.randn(n, generator=gen),
                               0.03 + 0.08 * style.chroma * torch.randn(n, generator=gen)).clamp(0.02, 0.95)
    ink = _warp(templates[labels], pose)[:, :1]
    for side in (-1.0, 1.0):  # neighbouring digits of the house number, partly in frame
        others = torch.randint(0, 10, (n,), generator=gen)
        present = (torch.rand(n, generator=gen) < 0.7).float()[:, None, None, None]
        ink = torch.maximum(ink, _warp(templates[others], pose, x_offset=side * 1.2)[:, :1] * present)
    ink_surface = ink_col[:, :, None, None] * torch.exp(0.1 * tex.draw(gen, n, 1.0))
    image = bg * (1 - ink) + ink_surface * ink
    return _finish(tex, gen, n, image, _rand(gen, n, -math.pi, math.pi))


@dataclass(frozen=True)
class SynthSet:
    name: str
    description: str
    kind: str  # objects | signs | digits
    style: Style
    sizes: tuple[int, int]  # train, test
    seed: int
    default_target: int
    revision: int = 0  # raised when this set alone is redrawn: only its stages re-key (docs/data.md)

    @property
    def version(self) -> str:
        """The data version stage keys record: the generator's, plus this set's revision if any."""
        return f"synthetic-v{GENERATOR_VERSION}" + (f"r{self.revision}" if self.revision else "")


SETS = {
    s.name: s for s in [
        SynthSet("synth-cifar10", "10 object classes in their usual scenes, with clutter (CIFAR-10 stand-in, pre-training set A)",
                 "objects", Style(scale=(0.55, 0.9), rotation=0.3, shift=0.2, flip=True, clutter=2, texture=0.25,
                                  blur=(0.15, 0.5), noise=0.02, bg_noise=0.25, context=0.7, occlusion=0.35),
                 (20000, 4000), 101, 0),
        SynthSet("synth-stl10", "the same 10 object classes, larger and textured (STL-10 stand-in, pre-training set B)",
                 "objects", Style(scale=(0.7, 1.0), rotation=0.25, shift=0.15, flip=True, clutter=1, texture=0.35,
                                  blur=(0.15, 0.5), noise=0.015, bg_noise=0.2, chroma=1.4, context=0.7,
                                  occlusion=0.25),
                 (20000, 4000), 202, 9),
        SynthSet("synth-gtsrb", "43 traffic-sign classes: outline x colours x symbol (GTSRB stand-in)",
                 "signs", Style(scale=(0.75, 1.0), rotation=0.1, shift=0.1, flip=False, clutter=1, texture=0.0,
                                blur=(0.2, 0.5), noise=0.02, bg_noise=0.2, occlusion=0.15),
                 (12900, 4300), 303, 12),
        SynthSet("synth-svhn", "house-number digits 0-9 with neighbouring digits (SVHN stand-in)",
                 # r1: a digit is 72-85 % of the frame's height (scale x the glyph's 0.85, at aspect 1), as in SVHN's
                 # 32 x 32 crops of each digit's box extended to a square (r0: 47-68 %; docs/data.md)
                 "digits", Style(scale=(0.85, 1.0), rotation=0.15, shift=0.08, flip=False, clutter=0, texture=0.0,
                                 blur=(0.35, 0.85), noise=0.012, bg_noise=0.15),
                 (12000, 4000), 404, 1, revision=1),
    ]
}

_RENDER = {"objects": (object_templates, render_objects), "signs": (sign_templates, render_signs),
           "digits": (digit_templates, render_digits)}


def generate(spec: SynthSet, split: str) -> ImageSet:
    """Draw a whole split; balanced classes, deterministic in (spec.seed, split)."""
    make_templates, render = _RENDER[spec.kind]
    classes, templates = make_templates()
    n = spec.sizes[0 if split in ("train", "pretrain") else 1]
    gen = torch.Generator().manual_seed(spec.seed * 10 + (0 if split in ("train", "pretrain") else 1))
    labels = torch.arange(n) % len(classes)
    labels = labels[torch.randperm(n, generator=gen)]
    textures = texture_bank()
    chunks = []
    for chunk in labels.split(2000):
        images = render(chunk, templates, gen, spec.style, textures)
        images = _blur(images, gen, spec.style.blur)
        images = images + spec.style.noise * torch.randn(images.shape, generator=gen)
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8))
    return ImageSet(spec.name, torch.cat(chunks), labels, classes)


@lru_cache(maxsize=16)
def _cached(name: str, split: str) -> ImageSet:
    spec = SETS[name]
    split = "train" if split == "pretrain" else split
    path = paths.cache_dir() / "synthetic" / f"{name}-{spec.version.removeprefix('synthetic-')}-{split}.pt"
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return ImageSet(name, blob["images"], blob["labels"], list(blob["classes"]))
        except Exception:  # a stale or damaged cache file is simply regenerated
            pass
    data = generate(spec, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"images": data.images, "labels": data.labels, "classes": data.classes}, tmp)
    os.replace(tmp, path)
    return data


def _loader(name):
    def load(split: str, data_dir: Path, image_size: int) -> ImageSet:
        data = _cached(name, split)
        return ImageSet(data.name, resize_uint8(data.images, image_size), data.labels, data.classes)
    return load


for _spec in SETS.values():
    register_dataset(DatasetSpec(_spec.name, _spec.description, _loader(_spec.name),
                                 default_target=_spec.default_target, needs_data_dir=False,
                                 version=_spec.version))
