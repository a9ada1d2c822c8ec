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
name, split and ``GENERATOR_VERSION``; sets are cached under
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

from .. import paths
from .base import DatasetSpec, ImageSet, register_dataset, resize_uint8

GENERATOR_VERSION = 4
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


# colours per scheme: rim, fill, symbol (RGB in [0, 1])
_SCHEMES = {
    "prohibit": ((0.8, 0.1, 0.1), (0.95, 0.95, 0.95), (0.05, 0.05, 0.05)),
    "mandatory": ((0.1, 0.25, 0.75), (0.1, 0.3, 0.8), (0.95, 0.95, 0.95)),
    "warning": ((0.85, 0.1, 0.1), (0.95, 0.92, 0.85), (0.05, 0.05, 0.05)),
    "stop": ((0.95, 0.95, 0.95), (0.8, 0.08, 0.08), (0.95, 0.95, 0.95)),
    "priority": ((0.95, 0.95, 0.95), (0.95, 0.8, 0.1), (0.1, 0.1, 0.1)),
    "info": ((0.95, 0.95, 0.95), (0.1, 0.3, 0.75), (0.95, 0.95, 0.95)),
}


def digit_templates() -> tuple[list[str], torch.Tensor]:
    names = [str(d) for d in range(10)]
    return names, torch.stack([_template(glyph(d, height=1.7)) for d in names])


# --------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class Style:
    scale: tuple[float, float]  # object size as a fraction of the frame
    rotation: float  # max |angle| in radians
    shift: float  # max |translation| in normalised units
    flip: bool
    clutter: int  # max number of background distractors
    texture: float
    blur: tuple[float, float]
    noise: float
    bg_noise: float
    saturated: bool = False
    context: float = 0.0  # share of object images drawn with their class's usual scene and colour


def _rand(gen, n, low, high):
    return torch.rand(n, generator=gen) * (high - low) + low


def _lowfreq(gen, n, channels, cells, size=NATIVE):
    noise = torch.rand(n, channels, cells, cells, generator=gen)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)


def _random_colors(gen, n, saturated=False):
    """Random RGB colours (n x 3) via HSV so brightness and saturation vary independently."""
    h = torch.rand(n, generator=gen)
    s = _rand(gen, n, 0.45 if saturated else 0.1, 1.0)
    v = _rand(gen, n, 0.15, 1.0)
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _affine(gen, style: Style, n) -> dict:
    return {"angle": _rand(gen, n, -style.rotation, style.rotation), "scale": _rand(gen, n, *style.scale),
            "aspect": _rand(gen, n, 0.85, 1.15),
            "flip": (torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if style.flip else torch.ones(n)),
            "tx": _rand(gen, n, -style.shift, style.shift), "ty": _rand(gen, n, -style.shift, style.shift)}


def _warp(templates, p: dict, x_offset: float = 0.0):
    """Warp each template by its affine draw; ``x_offset`` moves it sideways by that many object widths."""
    n = templates.shape[0]
    sx, sy = 1 / (p["scale"] * p["aspect"]), 1 / (p["scale"] / p["aspect"])
    tx = p["tx"] + x_offset * p["scale"]
    cos, sin, flip = torch.cos(p["angle"]), torch.sin(p["angle"]), p["flip"]
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sx, -tx * sx], 1),
                         torch.stack([sin * sy * flip, cos * sy, -p["ty"] * sy], 1)], 1)
    grid = F.affine_grid(theta, [n, templates.shape[1], NATIVE, NATIVE], align_corners=False)
    return F.grid_sample(templates, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _background(gen, n, style: Style, c1=None, c2=None, vertical=None):
    """Two-colour gradient + low-frequency noise + clutter; colours random unless given."""
    c1 = _random_colors(gen, n) if c1 is None else c1
    c2 = _random_colors(gen, n) if c2 is None else c2
    angle = _rand(gen, n, 0, 2 * math.pi)
    if vertical is not None:  # scenes: mostly top-to-bottom gradients
        angle = torch.where(vertical, math.pi / 2 + _rand(gen, n, -0.3, 0.3), angle)
    lin = torch.linspace(-1, 1, NATIVE)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    t = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy) * 0.5 + 0.5
    bg = c1[:, :, None, None] * (1 - t[:, None]) + c2[:, :, None, None] * t[:, None]
    bg = bg + style.bg_noise * (_lowfreq(gen, n, 3, 6) - 0.5)
    for _ in range(style.clutter):
        present = (torch.rand(n, generator=gen) < 0.6).float()[:, None, None]
        cx, cy = _rand(gen, n, -1, 1)[:, None, None], _rand(gen, n, -1, 1)[:, None, None]
        rx, ry = _rand(gen, n, 0.08, 0.35)[:, None, None], _rand(gen, n, 0.08, 0.35)[:, None, None]
        square = (torch.rand(n, generator=gen) < 0.5)[:, None, None]
        d_ell = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        d_box = ((xx - cx).abs() <= rx) & ((yy - cy).abs() <= ry)
        mask = (torch.where(square, d_box, d_ell).float() * present)[:, None]
        bg = bg * (1 - mask) + _random_colors(gen, n)[:, :, None, None] * mask
    return bg


def _blur(images, gen, sigma_range):
    sigma = _rand(gen, images.shape[0], *sigma_range)
    k = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2 + 1e-6))
    kernel = kernel / kernel.sum(1, keepdim=True)  # n x 5
    n, c, h, w = images.shape
    x = F.pad(images, (2, 2, 2, 2), mode="replicate")
    x = sum(kernel[:, i, None, None, None] * x[:, :, :, i:i + w] for i in range(5))
    return sum(kernel[:, i, None, None, None] * x[:, :, i:i + h, :] for i in range(5))


def _composite(bg, masks, colors):
    out = bg
    for slot in range(masks.shape[1]):
        m = masks[:, slot:slot + 1]
        out = out * (1 - m) + colors[slot] * m
    return out


# Real photos are not colour-blind: each object class has a usual setting and
# usual colours (planes in the sky, frogs green). The scene/colour priors below
# hold for a share ``style.context`` of the images; the rest are random.
_SCENES = {  # top colour, bottom colour
    "sky": ((0.45, 0.65, 0.95), (0.85, 0.9, 1.0)), "road": ((0.6, 0.6, 0.6), (0.3, 0.3, 0.32)),
    "grass": ((0.55, 0.75, 0.4), (0.25, 0.45, 0.15)), "water": ((0.65, 0.8, 0.95), (0.1, 0.3, 0.6)),
    "indoor": ((0.8, 0.7, 0.55), (0.5, 0.35, 0.25)),
}
_OBJECT_PRIORS = {  # class -> (scene, usual body colour)
    "airplane": ("sky", (0.85, 0.85, 0.88)), "automobile": ("road", (0.75, 0.15, 0.15)),
    "bird": ("sky", (0.35, 0.25, 0.2)), "cat": ("indoor", (0.45, 0.45, 0.45)),
    "deer": ("grass", (0.55, 0.35, 0.2)), "dog": ("indoor", (0.7, 0.55, 0.35)),
    "frog": ("grass", (0.3, 0.6, 0.2)), "horse": ("grass", (0.3, 0.2, 0.12)),
    "ship": ("water", (0.9, 0.9, 0.9)), "truck": ("road", (0.2, 0.35, 0.7)),
}


def _jittered(base: torch.Tensor, gen, amount: float) -> torch.Tensor:
    return (base + amount * (torch.rand(base.shape, generator=gen) * 2 - 1)).clamp(0, 1)


def render_objects(labels, templates, gen, style: Style):
    n = len(labels)
    classes = list(_OBJECT_PRIORS)
    scene_top = torch.tensor([_SCENES[_OBJECT_PRIORS[c][0]][0] for c in classes])[labels]
    scene_bottom = torch.tensor([_SCENES[_OBJECT_PRIORS[c][0]][1] for c in classes])[labels]
    usual_body = torch.tensor([_OBJECT_PRIORS[c][1] for c in classes])[labels]
    typical = (torch.rand(n, generator=gen) < style.context)[:, None]
    c1 = torch.where(typical, _jittered(scene_top, gen, 0.15), _random_colors(gen, n))
    c2 = torch.where(typical, _jittered(scene_bottom, gen, 0.15), _random_colors(gen, n))
    background = _background(gen, n, style, c1, c2, vertical=typical[:, 0])
    masks = _warp(templates[labels], _affine(gen, style, n))
    texture = 1 + style.texture * (_lowfreq(gen, n, 1, 8) - 0.5)
    body = torch.where(typical, _jittered(usual_body, gen, 0.2), _random_colors(gen, n, style.saturated))
    body = body[:, :, None, None] * texture
    accent = _random_colors(gen, n, style.saturated)[:, :, None, None] * texture
    detail = _rand(gen, n, 0.0, 0.2)[:, None, None, None].expand(n, 3, 1, 1)
    return _composite(background, masks, [body, accent, detail])


def render_signs(labels, templates, gen, style: Style):
    n = len(labels)
    schemes = [c[2] for c in sign_classes()]
    palette = torch.tensor([_SCHEMES[s] for s in schemes])  # 43 x 3 slots x 3 rgb
    masks = _warp(templates[labels], _affine(gen, style, n))
    light = _rand(gen, n, 0.45, 1.15)[:, None, None, None]
    cols = palette[labels]  # n x 3 x 3
    colors = [(cols[:, i, :, None, None] * light).clamp(0, 1) for i in range(3)]
    return _composite(_background(gen, n, style), masks, colors)


def render_digits(labels, templates, gen, style: Style):
    n = len(labels)
    fg, bg_col = _random_colors(gen, n), _random_colors(gen, n)
    # keep the digit readable: push the foreground's brightness away from the background's
    brighter = bg_col.mean(1, keepdim=True) < 0.5
    fg = torch.where(brighter, fg * 0.4 + 0.6, fg * 0.4)
    bg = bg_col[:, :, None, None] + style.bg_noise * (_lowfreq(gen, n, 3, 5) - 0.5)
    pose = _affine(gen, style, n)
    ink = _warp(templates[labels], pose)[:, :1]
    for side in (-1.0, 1.0):  # neighbouring digits of the house number, partly in frame
        others = torch.randint(0, 10, (n,), generator=gen)
        present = (torch.rand(n, generator=gen) < 0.7).float()[:, None, None, None]
        ink = torch.maximum(ink, _warp(templates[others], pose, x_offset=side * 1.2)[:, :1] * present)
    return bg * (1 - ink) + fg[:, :, None, None] * ink


@dataclass(frozen=True)
class SynthSet:
    name: str
    description: str
    kind: str  # objects | signs | digits
    style: Style
    sizes: tuple[int, int]  # train, test
    seed: int
    default_target: int


SETS = {
    s.name: s for s in [
        SynthSet("synth-cifar10", "10 object classes in their usual scenes, with clutter (CIFAR-10 stand-in, pre-training set A)",
                 "objects", Style(scale=(0.55, 0.9), rotation=0.3, shift=0.2, flip=True, clutter=2, texture=0.3,
                                  blur=(0.2, 0.6), noise=0.03, bg_noise=0.15, context=0.7),
                 (20000, 4000), 101, 0),
        SynthSet("synth-stl10", "the same 10 object classes, larger and textured (STL-10 stand-in, pre-training set B)",
                 "objects", Style(scale=(0.7, 1.0), rotation=0.25, shift=0.15, flip=True, clutter=1, texture=0.5,
                                  blur=(0.3, 0.8), noise=0.02, bg_noise=0.1, saturated=True, context=0.7),
                 (20000, 4000), 202, 9),
        SynthSet("synth-gtsrb", "43 traffic-sign classes: outline x colours x symbol (GTSRB stand-in)",
                 "signs", Style(scale=(0.75, 1.0), rotation=0.1, shift=0.1, flip=False, clutter=1, texture=0.0,
                                blur=(0.2, 0.5), noise=0.02, bg_noise=0.2),
                 (12900, 4300), 303, 12),
        SynthSet("synth-svhn", "house-number digits 0-9 with neighbouring digits (SVHN stand-in)",
                 "digits", Style(scale=(0.55, 0.8), rotation=0.15, shift=0.08, flip=False, clutter=0, texture=0.0,
                                 blur=(0.2, 0.7), noise=0.03, bg_noise=0.2),
                 (12000, 4000), 404, 1),
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
    chunks = []
    for chunk in labels.split(2000):
        images = render(chunk, templates, gen, spec.style)
        images = _blur(images, gen, spec.style.blur)
        images = images + spec.style.noise * torch.randn(images.shape, generator=gen)
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8))
    return ImageSet(spec.name, torch.cat(chunks), labels, classes)


@lru_cache(maxsize=16)
def _cached(name: str, split: str) -> ImageSet:
    spec = SETS[name]
    split = "train" if split == "pretrain" else split
    path = paths.cache_dir() / "synthetic" / f"{name}-v{GENERATOR_VERSION}-{split}.pt"
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
                                 version=f"synthetic-v{GENERATOR_VERSION}"))
