"""Measurements: analysis stages of the studies, cached like every other stage.

A measurement is ``fn(stage, env, ctx, out) -> dict`` registered under a
name; its stage is ``Stage("measure", name, spec, (encoder stage,))``. The
returned dict is kept in the artifact and, with the stage's labels, as a row
of the ``measurements`` table of the results database.

- ``stage-mi``: MIMIC's estimator (``estimate_stage_mi``, with the
  profile's MIMIC MI settings) of I(stage output; feature) for every stage of an
  encoder, once on the defender's clean images and once on the same images
  stamped with the attack's trigger (the paper's Figure 4).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from ..attacks import trigger_from_description
from ..defenses.mimic import MIMICConfig, estimate_stage_mi
from ..encoders import RunContext
from .datasets.base import unknown_name_message
from .profiles import canonical_json
from .stages import Env, Stage, clean_subset, load_stage_encoder

MEASURES: dict[str, Callable] = {}


def register_measure(name: str):
    def decorate(fn):
        MEASURES[name] = fn
        return fn
    return decorate


def get_measure(name: str) -> Callable:
    if name not in MEASURES:
        raise ValueError(unknown_name_message("measurement", name, MEASURES))
    return MEASURES[name]


@register_measure("stage-mi")
def stage_mi(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    encoder = load_stage_encoder(env, stage.deps[0]).to(ctx.device)
    images, _ = clean_subset(env, s["clean"])
    trigger = trigger_from_description(s["trigger"])
    cfg = MIMICConfig(**s["mimic_mi"])
    result = {}
    for inputs, batch in (("clean", images), ("triggered", trigger.apply(images))):
        result[inputs] = {layer: est["mi"] for layer, est in estimate_stage_mi(encoder, batch, cfg, ctx, inputs).items()}
    ctx.record("mi", result)
    return {"mi": result, "n_images": len(images)}


def record_measurement(stage: Stage, env: Env) -> dict:
    """(Re)write the results row of a finished measure stage; idempotent like ``record_evaluation``."""
    meta = env.store.read_meta(stage.kind, stage.key)
    labels = {k: v for k, v in stage.labels.items() if k != "label"}
    row = {"row_key": hashlib.sha256(canonical_json([stage.key, labels]).encode()).hexdigest()[:24],
           "stage_key": stage.key, "name": stage.name, "result": meta["result"], "seconds": meta.get("seconds"),
           "device": meta.get("device"), "code_version": stage.code,
           **{k: labels.get(k) for k in ("study", "arm", "profile", "overrides", "seed", "attack", "defense",
                                         "pretrain", "downstream", "role")}}
    env.db.add_measurement(row)
    return row
