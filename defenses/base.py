"""The defense contract and the registries a defense module can add to.

A defense is registered with ``@register_defense(name, config=..., summary=...,
profiles=...)`` on a function (or a class whose instances are callable)::

    def defend(encoder: Encoder, clean: CleanData, config, ctx: RunContext) -> Encoder

It receives the suspect encoder, the defender's small unlabelled clean set and
its own config, nothing else: never the trigger, the target class, labels or
test data. ``ctx`` gives the device, seeded RNGs, ``ctx.progress``, a logger and
``ctx.record(key, value)`` for values worth keeping with the result. A defense
whose threat model gives the defender the suspect's (unlabelled) pre-training
data registers with ``needs_pretrain_data=True`` and is then called with a
fifth, keyword argument ``pretrain=`` (:class:`.pretrain_data.PretrainData`);
no other defense ever receives it. The
returned encoder may be the input object modified in place or a new one; the
harness saves it. Config: a dataclass whose defaults are the paper settings;
scaled-down values for ``tiny``/``ci`` go in ``profiles=``.

A defense module may also register a **measurement** (an analysis of an
encoder that the studies run as a stage, e.g. MIMIC's MI per stage) and a
**detector** (a yes/no screen of an encoder, e.g. DECREE's trigger inversion,
what ``defbench detect`` runs), so the harness never imports a defense's
internals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core import ComponentRegistry, Registry

DEFENSES = ComponentRegistry("defense", "defbench.defenses")


def register_defense(name: str, *, config: type, summary: str, profiles: dict | None = None,
                     formerly: tuple[str, ...] | str = (), **options):
    """Register a defense. Options: ``budget=`` / ``cost=`` (the fields the frontier study and the GPU
    check scale), ``needs_pretrain_data=True`` (called with ``pretrain=PretrainData``); ``formerly``: the names it
    had before a rename, oldest first (its results keep)."""
    return DEFENSES.component(name, config=config, summary=summary, profiles=profiles, formerly=formerly, **options)


@dataclass(frozen=True)
class CleanData:
    """The defender's clean subset: unlabelled uint8 images, N x 3 x H x W."""
    images: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("CleanData.images must be uint8 N x 3 x H x W")

    def __len__(self) -> int:
        return len(self.images)


def get_defense(name: str):
    return DEFENSES.get(name)


@dataclass(frozen=True)
class Measurement:
    """``fn(encoder, inputs, settings, ctx) -> dict``: ``inputs`` maps a name ("clean", "triggered") to uint8
    images; ``settings`` is ``settings_of(<the profile's config of defense `defense`>)`` (JSON-able, part of
    the stage key)."""
    name: str
    fn: Callable
    defense: str
    settings_of: Callable
    summary: str = ""


@dataclass(frozen=True)
class Detector:
    """``fn(encoder, images, config, ctx) -> dict`` with at least ``score``; an encoder whose score is below
    ``config.<threshold_field>`` (above, when ``backdoored_if_below`` is False) is called backdoored. The
    config is the profile's config of defense ``defense``; ``score_name`` is what the score is printed as."""
    name: str
    fn: Callable
    defense: str
    threshold_field: str
    backdoored_if_below: bool = True
    summary: str = ""
    score_name: str = "score"  # what the score is called in the method's paper (DECREE: PL1)


MEASUREMENTS: Registry[Measurement] = Registry("measurement")
DETECTORS: Registry[Detector] = Registry("detector")


def register_measurement(measurement: Measurement) -> Measurement:
    return MEASUREMENTS.add(measurement.name, measurement)


def register_detector(detector: Detector) -> Detector:
    return DETECTORS.add(detector.name, detector)
