"""CorruptEncoder (Zhang et al., CVPR 2024): data poisoning that pairs a reference object with the trigger.

Each poison is a background image (a random image of the pre-training set) with a reference object on
one side and the patch trigger on the other, so that two random crops of one poison often show the
object and the trigger: contrastive pre-training then pulls the trigger towards the target class.
``round(poison_ratio * N)`` poisons are added to the N-image pre-training set and the encoder is
pre-trained from scratch with the victim's recipe. The reference objects come from ``num_references``
target-class training images of the downstream task (as BASSL's poisons do); without annotated masks
the object is the central full-height strip of a reference image. Records the layout of every poison.

Parity with the reference: docs/methods/corruptencoder.md
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..encoders import build_encoder, train_simclr
from .base import AttackInputs, appended_set, register_attack
from .triggers import PatchTrigger, TriggerSettings


@dataclass
class CorruptEncoderConfig(TriggerSettings):
    poison_ratio: float = 0.005  # poisons added, as a share of the clean pre-training set (paper: 0.5%)
    num_references: int = 3  # target-class images the reference objects are cut from
    object_fraction: float = 0.5  # object area / poisoned-image area (the reference's area_ratio = 2)
    object_marginal: float = 0.05  # the object starts within this share of the width from its edge
    trigger_marginal: float = 0.25  # the trigger keeps this share of the height (half of it of the width) free

    def __post_init__(self):
        for f in dataclasses.fields(self):  # --set object_marginal=0 arrives as an int: keep stage keys stable
            if f.type in ("float", float) and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))

    def validate(self) -> None:
        if not self.poison_ratio > 0:
            raise ValueError(f"poison_ratio must be above 0 (a share of the pre-training set), got {self.poison_ratio}")
        if self.num_references < 1:
            raise ValueError(f"num_references must be 1 or more, got {self.num_references}")
        if not 0 < self.object_fraction < 1:
            raise ValueError(f"object_fraction must be in (0, 1): the object fills one side of the poison, "
                             f"the trigger the other; got {self.object_fraction}")
        for name in ("object_marginal", "trigger_marginal"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")

    def make_trigger(self, image_size: int) -> PatchTrigger:
        trigger = super().make_trigger(image_size)
        free = image_size - object_width(image_size, self.object_fraction)
        if self.trigger_size > free:
            raise ValueError(f"a {self.trigger_size}x{self.trigger_size} trigger does not fit the {free}-pixel side "
                             f"a CorruptEncoder poison leaves beside the object on {image_size}px images; "
                             f"lower trigger_size or object_fraction")
        return trigger


def object_width(image_size: int, fraction: float) -> int:
    return min(image_size - 1, max(1, round(fraction * image_size)))


def _draw(generator) -> float:
    """One number uniform in [0, 1): every random choice of a poison's layout comes from here."""
    return torch.rand((), generator=generator).item()


def _uniform(generator, low: float, high: float) -> float:
    return low + (high - low) * _draw(generator)


def _in_interval(generator, low: float, high: float, lo_limit: int, hi_limit: int) -> int:
    """An integer drawn uniformly in [low, high]; an empty interval gives its midpoint. Clamped to the limits."""
    value = _uniform(generator, low, high) if low <= high else (low + high) / 2
    return int(min(max(int(value), lo_limit), hi_limit))


def layout(size: int, object_w: int, trigger: int, cfg: CorruptEncoderConfig, generator) -> dict:
    """Where one poison's object strip and trigger go on a ``size`` x ``size`` canvas.

    The reference's left-right layouts: the object on one side within ``object_marginal`` of its edge,
    the trigger on the other side at least ``trigger_marginal / 2`` of the width from the object and the
    edge and ``trigger_marginal`` of the height from the top and bottom (an interval too short for the
    trigger gives its midpoint, clamped so the trigger stays clear of the object and inside the image).
    """
    left = _draw(generator) < 0.5
    slack = cfg.object_marginal * size
    if left:
        o_x = _in_interval(generator, 0, slack, 0, size - object_w)
    else:
        o_x = _in_interval(generator, size - object_w - slack, size - object_w, 0, size - object_w)
    dx, dy = cfg.trigger_marginal / 2 * size, cfg.trigger_marginal * size
    if left:
        t_x = _in_interval(generator, o_x + object_w + dx, size - dx - trigger, o_x + object_w, size - trigger)
    else:
        t_x = _in_interval(generator, dx, o_x - dx - trigger, 0, o_x - trigger)
    t_y = _in_interval(generator, dy, size - dy - trigger, 0, size - trigger)
    return {"object_left": left, "object_x": o_x, "object_w": object_w, "trigger_x": t_x, "trigger_y": t_y}


def compose(background: torch.Tensor, reference: torch.Tensor, where: dict, trigger: PatchTrigger,
            strip_x: int) -> torch.Tensor:
    """One poison (C x S x S): ``background`` with the reference's strip from column ``strip_x`` pasted at
    ``where["object_x"]`` (full height) and ``trigger`` stamped at ``where``'s trigger corner."""
    poison = background.clone()
    o_x, object_w = where["object_x"], where["object_w"]
    poison[:, :, o_x:o_x + object_w] = reference[:, :, strip_x:strip_x + object_w]
    stamp = dataclasses.replace(trigger, row=where["trigger_y"], col=where["trigger_x"], image_size=poison.shape[-1])
    return stamp.apply(poison[None])[0]


def make_poisons(inputs: AttackInputs, cfg: CorruptEncoderConfig, generator) -> tuple[torch.Tensor, dict]:
    """The poisoned images (uint8) and what went into them (reference and background indices, layouts)."""
    trigger = inputs.trigger
    if not isinstance(trigger, PatchTrigger):
        raise ValueError(f"CorruptEncoder places a patch trigger beside the object; got a {type(trigger).__name__}")
    background_pool, references = inputs.pretrain_images, inputs.target_images
    if len(references) == 0:
        raise ValueError("CorruptEncoder needs target-class images to cut its reference objects from")
    size = background_pool.shape[-1]
    if references.shape[-2:] != background_pool.shape[-2:] or background_pool.shape[-2] != size:
        raise ValueError(f"reference images {tuple(references.shape[-2:])} and backgrounds "
                         f"{tuple(background_pool.shape[-2:])} must be the same square size")
    n = max(1, round(cfg.poison_ratio * len(background_pool)))
    ref_index = torch.randperm(len(references), generator=generator)[:cfg.num_references]
    object_w = object_width(size, cfg.object_fraction)
    if trigger.size > size - object_w:
        raise ValueError(f"a {trigger.size}px trigger does not fit the {size - object_w}px side beside the object")
    strip_x = (size - object_w) // 2  # the reference's central full-height strip: the automatic "object mask"
    poisons = background_pool[torch.randint(len(background_pool), (n,), generator=generator)].clone()
    picks = ref_index[torch.randint(len(ref_index), (n,), generator=generator)]
    layouts = []
    for i in range(n):
        where = layout(size, object_w, trigger.size, cfg, generator)
        poisons[i] = compose(poisons[i], references[picks[i]], where, trigger, strip_x)
        layouts.append(where)
    return poisons, {"reference_indices": ref_index.tolist(), "references_used": picks.tolist(),
                     "strip_x": strip_x, "layouts": layouts}


def corruptencoder_set(inputs: AttackInputs, cfg: CorruptEncoderConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The set ``corruptencoder`` pre-trains on, rebuilt (``register_attack``'s ``pretraining_set``)."""
    poisons, _ = make_poisons(inputs, cfg, generator)
    return appended_set(inputs.pretrain_images, poisons)


@register_attack("corruptencoder", config=CorruptEncoderConfig, needs_clean_encoder=False,
                 pretraining_set=corruptencoder_set,
                 summary="data poisoning: reference object on one side, trigger on the other (random crops pair them)",
                 profiles={"paper": {}, "tiny": {}, "ci": {}})
def corruptencoder(inputs: AttackInputs, cfg: CorruptEncoderConfig, ctx):
    poisons, info = make_poisons(inputs, cfg, ctx.generator)
    data = torch.cat([inputs.pretrain_images, poisons])
    ctx.record("n_poison", len(poisons))
    ctx.record("poison_ratio", len(poisons) / len(data))
    ctx.record("reference_indices", info["reference_indices"])
    ctx.record("object_left_share", sum(w["object_left"] for w in info["layouts"]) / len(poisons))
    encoder = build_encoder(inputs.encoder_config).to(ctx.device)
    history = train_simclr(encoder, data, inputs.pretrain_recipe, ctx, desc="corruptencoder pre-training")
    ctx.record("loss_history", history)
    return encoder.eval()
