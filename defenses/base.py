"""The defense contract and registry.

A defense is registered with ``@register_defense(name, config=..., summary=...,
profiles=...)`` on a function (or a class whose instances are callable)::

    def defend(encoder: Encoder, clean: CleanData, config, ctx: RunContext) -> Encoder

It receives the suspect encoder, the defender's small unlabelled clean set and
its own config, nothing else: never the trigger, the target class, labels or
test data. ``ctx`` gives the device, seeded RNGs (``ctx.generator``, and the
global torch RNG is seeded per stage), ``ctx.progress`` for loops, a logger and
``ctx.record(key, value)`` for values worth keeping with the result (a
detection score, MI per layer). The returned encoder may be the input object
modified in place or a new one; the harness saves it.

Config: a dataclass whose defaults are the paper settings; scaled-down values
for the ``tiny``/``ci`` profiles go in ``profiles=``. Hyper-parameters must be
fixed or chosen by a label-free criterion on the clean set, never by ASR.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoders.registry import Registry

DEFENSES = Registry("defense", "defbench.defenses")


def register_defense(name: str, *, config: type, summary: str, profiles: dict | None = None):
    return DEFENSES.register(name, config=config, summary=summary, profiles=profiles)


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
