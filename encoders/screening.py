"""Encoders that screen their inputs: a defense's answer may be "refuse this input" instead of new weights.

A :class:`ScreenedEncoder` is the wrapped encoder (same modules, same features) plus a *screen*: a module
that scores an input (higher: more suspect) and a threshold; ``accept(x)`` is ``score(x) <= threshold``,
per image. The screen is deliberately **not** a submodule: ``state_dict()``, ``parameters()``, checkpoints
and weight digests hold the encoder alone, so every tool that handles encoders treats a screened encoder as
the encoder it wraps, and a defense that returns one changes no feature. ``.to()``, ``.train()``/``.eval()``
and ``clone()`` carry the screen along; :func:`save_screen`/:func:`load_screen` write and read it beside the
encoder's checkpoint (a torch file of tensors and plain values, read with ``weights_only``).

A screen kind is registered with :func:`register_screen` (``kind -> factory(config dict) -> module``) by the
defense that trains it, so the loader rebuilds it without importing the defense. A screen module has
``score(x, features) -> (B,)`` (``x`` float images in [0, 1], ``features`` the encoder's backbone features of
``x``) and ``config``, the JSON-able dict its factory takes.

:func:`accepts` is the hook the evaluation uses: all True for an encoder without a screen.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core import Registry
from .base import Encoder
from .checkpoints import CheckpointError, _atomic_write, _safe_load

SCREEN_FORMAT = "defbench-screen/1"
SCREENS: Registry[Callable[[dict], nn.Module]] = Registry("input screen")


def register_screen(kind: str, factory: Callable[[dict], nn.Module]) -> Callable[[dict], nn.Module]:
    return SCREENS.add(kind, factory)


class ScreenedEncoder(Encoder):
    """``encoder``'s modules (shared, not copied) with an input screen: features unchanged, ``accept`` added."""

    def __init__(self, encoder: Encoder, screen: nn.Module, kind: str, threshold: float):
        nn.Module.__init__(self)  # not Encoder.__init__: the modules are the wrapped encoder's, nothing is rebuilt
        if isinstance(encoder, ScreenedEncoder):
            encoder = encoder.plain()
        if not math.isfinite(float(threshold)):
            raise ValueError(f"a screen's threshold must be finite, got {threshold!r}")
        self.config = encoder.config
        self.backbone = encoder.backbone
        self.head = encoder.head
        self.register_buffer("_mean", encoder._mean, persistent=False)
        self.register_buffer("_std", encoder._std, persistent=False)
        self.__dict__["screen"] = screen  # outside the module tree: not in state_dict() or parameters()
        self.kind = kind
        self.threshold = float(threshold)

    def plain(self) -> Encoder:
        """The wrapped encoder without its screen (shares the modules)."""
        encoder = Encoder.__new__(Encoder)
        nn.Module.__init__(encoder)
        encoder.config, encoder.backbone, encoder.head = self.config, self.backbone, self.head
        encoder.register_buffer("_mean", self._mean, persistent=False)
        encoder.register_buffer("_std", self._std, persistent=False)
        encoder.train(self.training)
        return encoder

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.screen._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.screen.train(mode)
        return self

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The screen's score of each image of ``x`` (float in [0, 1], B x 3 x H x W); eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self.screen.score(x, self.features(x)).float()
        finally:
            self.train(was_training)

    def accept(self, x: torch.Tensor) -> torch.Tensor:
        """Bool (B,): which images of ``x`` the screen lets through."""
        return self.scores(x) <= self.threshold


def is_screened(encoder) -> bool:
    return isinstance(encoder, ScreenedEncoder)


def accepts(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """Bool (B,) on ``x``'s device: the encoder's screen decision, all True for an encoder without one."""
    if is_screened(encoder):
        return encoder.accept(x)
    return torch.ones(len(x), dtype=torch.bool, device=x.device)


def save_screen(encoder: ScreenedEncoder, path: str | os.PathLike) -> None:
    """Write the screen (kind, config, threshold, weights) atomically; the encoder itself goes in its own file."""
    payload = {"format": SCREEN_FORMAT, "kind": encoder.kind, "config": dict(encoder.screen.config),
               "threshold": encoder.threshold,
               "state_dict": {k: v.detach().cpu() for k, v in encoder.screen.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _atomic_write(Path(path), buffer.getvalue())


def load_screen(encoder: Encoder, path: str | os.PathLike) -> ScreenedEncoder:
    """``encoder`` with the screen stored in ``path`` (read with ``weights_only``)."""
    payload = _safe_load(Path(path))
    if not isinstance(payload, dict) or payload.get("format") != SCREEN_FORMAT:
        raise CheckpointError(f"{path} is not a defbench screen file ('format': {SCREEN_FORMAT!r})")
    try:
        screen = SCREENS.get(payload["kind"])(payload["config"])
        screen.load_state_dict(payload["state_dict"])
        return ScreenedEncoder(encoder, screen.eval(), payload["kind"], payload["threshold"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild its screen ({type(err).__name__}: {err})") from None
