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

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..core import ComponentRegistry, Registry, RegistryError
from ..core.registry import Options


@dataclass(frozen=True)
class DefenseOptions(Options):
    """How a defense is planned and studied (``register_defense``'s keyword arguments)."""
    budget: tuple[str, ...] = ()  # config fields that set how much it computes (the frontier study scales them)
    cost: tuple[str, ...] = ()  # fields that also cost time but are not the budget axis (make gpu-check)
    needs_pretrain_data: bool = False  # called with pretrain=PretrainData (the suspect's pre-training set)
    screens: bool = False  # returns an encoder with an input screen (evaluated as pipeline/screening.py says)

    def __post_init__(self):
        for option in ("budget", "cost"):
            value = getattr(self, option)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise RegistryError(f"{option}= must be a tuple of config field names, e.g. ('epochs',), got "
                                    f"{value!r}")
            object.__setattr__(self, option, tuple(value))

    def check(self, where: str, config: type) -> None:
        fields = {f.name for f in dataclasses.fields(config)}
        for option in ("budget", "cost"):
            unknown = [v for v in getattr(self, option) if v not in fields]
            if unknown:
                raise RegistryError(f"{where}: {option}= names {unknown}, not fields of {config.__name__} "
                                    f"({', '.join(sorted(fields))})")


DEFENSES = ComponentRegistry("defense", "defbench.defenses", DefenseOptions)


def register_defense(name: str, *, config: type, summary: str, profiles: dict | None = None,
                     budget: tuple[str, ...] = (), cost: tuple[str, ...] = (), needs_pretrain_data: bool = False,
                     screens: bool = False, formerly: tuple[str, ...] | str = ()):
    """Register a defense (:class:`DefenseOptions` says what each option means); ``formerly``: the names it had
    before a rename, oldest first (its results keep)."""
    options = DefenseOptions(budget, cost, needs_pretrain_data, screens)
    return DEFENSES.component(name, config=config, summary=summary, profiles=profiles, formerly=formerly,
                              options=options)


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
