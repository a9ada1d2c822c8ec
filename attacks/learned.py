"""Triggers an attack learns while it runs (BLTO's generator), which the plan knows only by name.

A run is planned before any stage computes, and every stage that stamps a trigger names it in its spec.
An attack whose trigger is learned returns a :class:`LearnedTrigger` from ``make_trigger`` (trigger type
``"learned"``: the attack's name and the image size), learns the real trigger while it runs and hands it
over with ``ctx.record(LEARNED_TRIGGER, trigger.describe())``. The harness moves that description out of
the records into the attack artefact (``trigger.json``); the stages that stamp the trigger (evaluations,
measurements, a poisoned clean set) get the placeholder bound to the attack stage (``stage`` = its key),
wait for that stage, and rebuild the learned trigger from its artefact (``trigger_from_description``).
A fixed trigger (patch, mask, CTRL's) goes through none of this.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .triggers import TRIGGER_TYPES, TriggerError

LEARNED_TRIGGER = "learned_trigger"  # the record key an attack hands its learned trigger's description over with
TRIGGER_FILE = "trigger.json"  # where the harness keeps it, in the attack's artefact


@dataclass(frozen=True)
class LearnedTrigger:
    """Stands for the trigger ``attack`` learns; ``stage``: the attack stage holding it ('' until bound)."""
    attack: str
    image_size: int = 32
    stage: str = ""

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        where = f"attack stage {self.stage}" if self.stage else "its attack stage"
        raise TriggerError(f"the {self.attack} trigger is learned by the attack: it exists once {where} has run "
                           f"(rebuild it from that stage's {TRIGGER_FILE})")

    def describe(self) -> dict:
        return {"type": "learned", **asdict(self)}


TRIGGER_TYPES.add("learned", LearnedTrigger)


def is_learned(description: dict | None) -> bool:
    """Does ``description`` stand for a trigger an attack learns (a :class:`LearnedTrigger`)?"""
    return bool(description) and description.get("type") == "learned"
