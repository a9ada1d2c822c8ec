"""BLTO (Sun et al., ICLR 2024): a learned image-wide trigger, optimised bi-level against a surrogate contrastive
learner, then planted by clean-label data poisoning.

**Trigger** (:class:`BLTOTrigger`, trigger type ``"blto"``): a ResNet encoder-decoder generator G (7x7 stem,
two stride-2 convolutions, ``blocks`` residual blocks, two transposed convolutions, 7x7 head, output
``(tanh + 1) / 2``) maps an image x in [0, 1] to G(x); the stamped image is G(x) clipped to
``[x - eps, x + eps]`` and to [0, 1], G in eval mode, rounded to the 1/255 grid (uint8 in, uint8 out). Its
description carries G's weights (float32 bytes, zlib, base64), so it rebuilds bit for bit.

**Bi-level loop** (:func:`train_generator`): a surrogate encoder (the victim's architecture, fresh weights) and
G train in turn. Per batch of the attacker's images: ``inner_steps`` SimCLR steps of the surrogate on the
poisoned set (its poison slots hold G's current stamps of target-class images), then one Adam step of G on
``-mean cos(f(t1(G(x))), f(t2(r)))`` over all pairs of stamped pre-training images x and target-class images
r, t1, t2 the SimCLR augmentations, f the surrogate's backbone feature (eval mode, weights fixed). The
surrogate restarts from fresh weights every ``reinit_every`` epochs.

**Poisoning**: ``round(poison_ratio * N)`` random slots of the N-image pre-training set hold stamped target-class
images of the downstream task (the slots the loop simulated); the victim encoder is pre-trained from scratch
with the victim's recipe. The learned trigger is handed to the harness (:mod:`.learned`).

Parity with the reference: docs/methods/blto.md
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Encoder, build_encoder, to_float, train_simclr
from ..encoders.augment import SimCLRAugment
from ..encoders.simclr import contrastive_loss, make_optimizer
from .base import AttackInputs, register_attack
from .learned import LEARNED_TRIGGER, LearnedTrigger
from .triggers import TRIGGER_TYPES, TriggerError, trigger_from_description

APPLY_CHUNK = 256  # images stamped per generator pass


# ----------------------------------------------------------------- the generator

class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(True), nn.Dropout(0.5),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """Image-to-image ResNet generator (``width`` channels after the stem, x4 at the bottleneck); output in [0, 1]."""

    def __init__(self, width: int = 64, blocks: int = 6):
        super().__init__()
        w = width

        def down(cin, cout):
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

        def up(cin, cout):
            return [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(3, w, 7, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
            *down(w, 2 * w), *down(2 * w, 4 * w),
            *[_Residual(4 * w) for _ in range(blocks)],
            *up(4 * w, 2 * w), *up(2 * w, w),
            nn.ReflectionPad2d(3), nn.Conv2d(w, 3, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.net(x)) + 1) / 2


def stamp(generator: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """G(x) clipped to the L_inf ball of radius ``eps`` around x and to [0, 1] (float images, differentiable)."""
    return torch.minimum(torch.maximum(generator(x), x - eps), x + eps).clamp(0.0, 1.0)


def _float_state(generator: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors that define G in eval mode: parameters and BatchNorm running statistics (not the counters)."""
    return [(k, v) for k, v in generator.state_dict().items() if v.is_floating_point()]


def pack_weights(generator: nn.Module) -> str:
    """G's float tensors, in state-dict order, as little-endian float32 bytes, zlib-compressed, base64."""
    raw = b"".join(v.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
                   for _, v in _float_state(generator))
    return base64.b64encode(zlib.compress(raw, 6)).decode()


def unpack_weights(generator: nn.Module, text: str) -> None:
    """Load :func:`pack_weights` output into a generator of the same width and blocks."""
    try:
        flat = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<f4")
    except (ValueError, zlib.error) as err:
        raise TriggerError(f"a BLTO trigger's weights cannot be decoded ({err})") from None
    tensors = _float_state(generator)
    total = sum(v.numel() for _, v in tensors)
    if flat.size != total:
        raise TriggerError(f"a BLTO trigger's weights hold {flat.size} values, its generator needs {total}: "
                           "width or blocks do not match the weights")
    state, offset = generator.state_dict(), 0
    for name, v in tensors:
        state[name] = torch.from_numpy(flat[offset:offset + v.numel()].copy()).view_as(v)
        offset += v.numel()
    generator.load_state_dict(state)


# ----------------------------------------------------------------- the trigger

@dataclass(frozen=True)
class BLTOTrigger:
    """BLTO's generator trigger: ``eps`` in pixel units (0..255), the generator's ``width`` and ``blocks``, its
    packed ``weights`` (:func:`pack_weights`)."""
    weights: str
    eps: float = 8.0
    width: int = 64
    blocks: int = 6
    image_size: int = 32

    def __post_init__(self):
        # descriptions come back from JSON: keep types canonical so equality and hashing work
        object.__setattr__(self, "eps", float(self.eps))
        for name in ("width", "blocks", "image_size"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if not 0 < self.eps <= 255:
            raise TriggerError(f"a BLTO trigger's eps must be in (0, 255] pixel units, got {self.eps}")
        if self.width < 1 or self.blocks < 0:
            raise TriggerError(f"a BLTO generator needs width >= 1 and blocks >= 0, got {self.width}, {self.blocks}")
        if self.image_size % 4:
            raise TriggerError(f"a BLTO generator halves the image twice: the image size must be a multiple of 4, "
                               f"got {self.image_size}")

    @cached_property
    def _generators(self) -> dict:
        return {}

    def generator(self, device=None) -> Generator:
        """The eval-mode generator on ``device`` (built once per device)."""
        device = torch.device(device or "cpu")
        if device not in self._generators:
            g = Generator(self.width, self.blocks)
            unpack_weights(g, self.weights)
            self._generators[device] = g.to(device).eval().requires_grad_(False)
        return self._generators[device]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.weights.encode()).hexdigest()

    @torch.no_grad()
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp uint8 images (0..255) or float images (0..1), N x 3 x H x W; returns a new tensor."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"trigger built for {self.image_size}px images, got {tuple(images.shape[-2:])}")
        g = self.generator(images.device)
        is_uint8 = images.dtype == torch.uint8
        out = []
        for chunk in images.split(APPLY_CHUNK):
            x = chunk.float() / 255.0 if is_uint8 else chunk.float()
            y = (stamp(g, x, self.eps / 255.0) * 255.0).round_()
            out.append(y.to(torch.uint8) if is_uint8 else (y / 255.0).to(images.dtype))
        return torch.cat(out) if out else images.clone()

    def describe(self) -> dict:
        return {"type": "blto", "weights": self.weights, "eps": self.eps, "width": self.width,
                "blocks": self.blocks, "image_size": self.image_size}


TRIGGER_TYPES.add("blto", BLTOTrigger)


# ----------------------------------------------------------------- settings

@dataclass
class BLTOConfig:
    poison_ratio: float = 0.01  # share of the pre-training set replaced by stamped target-class images
    eps: float = 8.0  # L_inf bound of the trigger, pixel units (8/255)
    gen_width: int = 64  # generator channels after its stem (x2, x4 deeper)
    gen_blocks: int = 6  # residual blocks at the generator's bottleneck
    epochs: int = 400  # passes of the bi-level loop over the attacker's images, one generator step per batch
    batch_size: int = 256  # images per inner (surrogate) and outer (generator) step
    inner_steps: int = 1  # surrogate SimCLR steps per generator step
    reinit_every: int = 100  # restart the surrogate from fresh weights every this many epochs; 0: never
    gen_lr: float = 2e-4  # Adam, betas (0.5, 0.999)
    surrogate_lr: float = 1e-3  # Adam, the SimCLR reference recipe
    surrogate_weight_decay: float = 1e-6
    temperature: float = 0.5  # the surrogate's NT-Xent temperature
    target: int = -1  # -1: the downstream task's paper target class

    def __post_init__(self):
        for name in ("poison_ratio", "eps", "gen_lr", "surrogate_lr", "surrogate_weight_decay", "temperature"):
            setattr(self, name, float(getattr(self, name)))  # --set eps=8 arrives as an int: keep stage keys stable

    def validate(self) -> None:
        if not 0 < self.poison_ratio <= 1:
            raise ValueError(f"poison_ratio must be in (0, 1] (a share of the pre-training set), "
                             f"got {self.poison_ratio}")
        if not 0 < self.eps <= 255:
            raise ValueError(f"eps must be in (0, 255] pixel units (the paper's 8/255 is 8), got {self.eps}")
        if self.gen_width < 1:
            raise ValueError(f"gen_width must be 1 or more, got {self.gen_width}")
        if self.gen_blocks < 0:
            raise ValueError(f"gen_blocks must be 0 or more, got {self.gen_blocks}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be 1 or more (the generator is what the attack learns), got {self.epochs}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be 1 or more (the inner level trains the surrogate), "
                             f"got {self.inner_steps}")
        if self.reinit_every < 0:
            raise ValueError(f"reinit_every must be 0 (never) or a number of epochs, got {self.reinit_every}")

    def make_trigger(self, image_size: int) -> LearnedTrigger:
        if image_size % 4:
            raise ValueError(f"the BLTO generator halves the image twice: the image size must be a multiple of 4, "
                             f"got {image_size}")
        return LearnedTrigger(attack="blto", image_size=image_size)


# ----------------------------------------------------------------- the attack

def poison_slots(n: int, pool: int, ratio: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(ratio * n)`` random slots of an n-image set and, for each, the target image (of ``pool``) it holds
    (drawn without replacement while there are enough)."""
    if pool == 0:
        raise ValueError("BLTO needs target-class images to poison with")
    count = min(n, max(1, round(ratio * n)))
    slots = torch.randperm(n, generator=generator)[:count]
    picks = torch.cat([torch.randperm(pool, generator=generator) for _ in range(math.ceil(count / pool))])[:count]
    return slots, picks


def poisoned_set(images: torch.Tensor, targets: torch.Tensor, trigger, slots: torch.Tensor,
                 picks: torch.Tensor) -> torch.Tensor:
    """The pre-training set the victim trains on: ``images`` with each slot replaced by its stamped target image."""
    data = images.clone()
    data[slots.to(data.device)] = trigger.apply(targets[picks.to(targets.device)]).to(data.device)
    return data


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """``module`` in eval mode with its parameters' gradients off (gradients still flow to its input)."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


def outer_loss(generator: nn.Module, surrogate: Encoder, x: torch.Tensor, refs: torch.Tensor, eps: float,
               augment: SimCLRAugment) -> torch.Tensor:
    """``-mean cos(f(t1(G(x))), f(t2(r)))`` over every (stamped image, reference) pair; f fixed, in eval mode."""
    with _frozen(surrogate):
        f_trig = F.normalize(surrogate.features(augment(stamp(generator, x, eps))), dim=1)
        with torch.no_grad():
            f_ref = F.normalize(surrogate.features(augment(refs)), dim=1)
    return -(f_trig @ f_ref.t()).mean()


@torch.no_grad()
def triggered_similarity(generator: nn.Module, surrogate: Encoder, x: torch.Tensor, eps: float) -> float:
    """Mean pairwise cosine (off-diagonal) of the surrogate's features of stamped images, G in eval mode."""
    was_training = generator.training
    generator.eval()
    with _frozen(surrogate):
        f = F.normalize(surrogate.features(stamp(generator, x, eps)), dim=1)
    generator.train(was_training)
    n = len(f)
    return float(((f @ f.t()).sum() - n) / max(1, n * (n - 1)))


def _fresh_surrogate(inputs: AttackInputs, cfg: BLTOConfig, ctx) -> tuple[Encoder, torch.optim.Optimizer]:
    surrogate = build_encoder(inputs.encoder_config).to(ctx.device).train()
    return surrogate, make_optimizer(surrogate.parameters(), "adam", cfg.surrogate_lr, cfg.surrogate_weight_decay)


def train_generator(inputs: AttackInputs, cfg: BLTOConfig, ctx, slots: torch.Tensor, picks: torch.Tensor):
    """The bi-level loop; returns (generator in eval mode, the last surrogate, history).

    ``history``: per epoch the mean outer loss (``outer``, minus the cosine), the mean inner NT-Xent (``inner``)
    and the epochs at which the surrogate restarted (``restarts``).
    """
    images, targets, device = inputs.pretrain_images, inputs.target_images, ctx.device
    n, eps = len(images), cfg.eps / 255.0
    holds = torch.full((n,), -1, dtype=torch.long)
    holds[slots] = picks  # which target image each poison slot holds; -1: a clean slot
    generator = Generator(cfg.gen_width, cfg.gen_blocks).to(device).train()
    g_opt = torch.optim.Adam(generator.parameters(), lr=cfg.gen_lr, betas=(0.5, 0.999))
    surrogate, s_opt = _fresh_surrogate(inputs, cfg, ctx)
    augment = SimCLRAugment()
    batch = min(cfg.batch_size, n)
    history = {"outer": [], "inner": [], "restarts": []}
    for epoch in ctx.progress(range(cfg.epochs), desc="blto bi-level", total=cfg.epochs):
        if cfg.reinit_every and epoch and epoch % cfg.reinit_every == 0:
            surrogate, s_opt = _fresh_surrogate(inputs, cfg, ctx)
            history["restarts"].append(epoch)
        outer_sum = inner_sum = 0.0
        batches = ctx.batches(n, batch)
        for idx in batches:
            for step in range(cfg.inner_steps):  # inner level: the victim's contrastive learning, simulated
                inner_idx = idx if step == 0 else torch.randperm(n, generator=ctx.generator)[:batch]
                x_in = to_float(images[inner_idx], device)
                held = holds[inner_idx]
                if (held >= 0).any():
                    generator.eval()
                    with torch.no_grad():
                        poisons = stamp(generator, to_float(targets[held[held >= 0]], device), eps)
                    generator.train()
                    x_in[(held >= 0).to(device)] = (poisons * 255).round_() / 255
                loss = contrastive_loss(surrogate, x_in, augment, cfg.temperature)
                s_opt.zero_grad(set_to_none=True)
                loss.backward()
                s_opt.step()
                inner_sum += loss.item()
            refs = to_float(targets[torch.randint(len(targets), (len(idx),), generator=ctx.generator)], device)
            loss = outer_loss(generator, surrogate, to_float(images[idx], device), refs, eps, augment)
            g_opt.zero_grad(set_to_none=True)
            loss.backward()
            g_opt.step()
            outer_sum += loss.item()
        history["outer"].append(outer_sum / len(batches))
        history["inner"].append(inner_sum / (len(batches) * cfg.inner_steps))
        ctx.logger.debug("blto epoch %d outer %.4f inner %.4f", epoch, history["outer"][-1], history["inner"][-1])
    return generator.eval(), surrogate.eval(), history


def learn_trigger(inputs: AttackInputs, cfg: BLTOConfig, ctx, slots: torch.Tensor,
                  picks: torch.Tensor) -> tuple[BLTOTrigger, dict]:
    """Train the generator and wrap it as a trigger (rebuilt from its own description, so the poisons are made by
    exactly what the evaluation will rebuild); returns (trigger, history)."""
    generator, surrogate, history = train_generator(inputs, cfg, ctx, slots, picks)
    size = inputs.pretrain_images.shape[-1]
    learned = BLTOTrigger(weights=pack_weights(generator), eps=cfg.eps, width=cfg.gen_width,
                          blocks=cfg.gen_blocks, image_size=size)
    probe = to_float(inputs.pretrain_images[torch.randperm(len(inputs.pretrain_images),
                                                           generator=ctx.generator)[:256]], ctx.device)
    fresh = Generator(cfg.gen_width, cfg.gen_blocks).to(ctx.device)
    history["triggered_cosine"] = {"trained": triggered_similarity(generator, surrogate, probe, cfg.eps / 255),
                                   "untrained": triggered_similarity(fresh, surrogate, probe, cfg.eps / 255)}
    return trigger_from_description(learned.describe()), history


# tiny/ci (docs/methods/blto.md): the generator shrinks like the encoder (width 64 -> 16) and to the reference's
# low-dimensional variant (2 residual blocks); epochs = 0.4 x the profile's pre-training epochs (paper 400 / 1000);
# the loop is shorter than one surrogate lifetime, so no restart; batch = the profile's pre-training batch
SMALL = {"gen_width": 16, "gen_blocks": 2, "reinit_every": 0}


def blto_set(inputs: AttackInputs, cfg: BLTOConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The set ``blto`` pre-trains on, rebuilt (``register_attack``'s ``pretraining_set``); ``inputs.trigger`` is the
    trigger the attack learned (the harness reads it from the attack's artefact)."""
    slots, picks = poison_slots(len(inputs.pretrain_images), len(inputs.target_images), cfg.poison_ratio, generator)
    poisoned = torch.zeros(len(inputs.pretrain_images), dtype=torch.bool)
    poisoned[slots] = True
    return poisoned_set(inputs.pretrain_images, inputs.target_images, inputs.trigger, slots, picks), poisoned


@register_attack("blto", config=BLTOConfig, needs_clean_encoder=False, pretraining_set=blto_set,
                 summary="data poisoning with a learned, image-wide trigger (a generator optimised bi-level against "
                         "a surrogate contrastive learner)",
                 profiles={"paper": {}, "tiny": {**SMALL, "epochs": 3, "batch_size": 256},
                           "ci": {**SMALL, "epochs": 1, "batch_size": 128}})
def blto(inputs: AttackInputs, cfg: BLTOConfig, ctx):
    slots, picks = poison_slots(len(inputs.pretrain_images), len(inputs.target_images), cfg.poison_ratio,
                                ctx.generator)
    trigger, history = learn_trigger(inputs, cfg, ctx, slots, picks)
    data = poisoned_set(inputs.pretrain_images, inputs.target_images, trigger, slots, picks)
    change = (data[slots].float() - inputs.target_images[picks].float()).abs()
    ctx.record(LEARNED_TRIGGER, trigger.describe())
    ctx.record("trigger_sha256", trigger.sha256)
    ctx.record("n_poison", len(slots))
    ctx.record("poison_ratio", len(slots) / len(data))
    ctx.record("poison_indices", slots.tolist())
    ctx.record("trigger_pixel_change", {"max": float(change.amax()), "mean": float(change.mean()),
                                        "changed_share": float((change.amax(1) > 0).float().mean())})
    ctx.record("outer_loss_history", history["outer"])
    ctx.record("inner_loss_history", history["inner"])
    ctx.record("surrogate_restarts", history["restarts"])
    ctx.record("triggered_cosine", history["triggered_cosine"])
    encoder = build_encoder(inputs.encoder_config).to(ctx.device)
    ctx.record("loss_history", train_simclr(encoder, data, inputs.pretrain_recipe, ctx, desc="blto pre-training"))
    return encoder.eval()
