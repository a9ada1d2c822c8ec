"""What every training loop needs from the harness: device, seed, progress, log.

Attacks, defenses and pre-training receive a :class:`RunContext`; they never
pick a device, seed a generator or print on their own.
"""
from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import UserError

T = TypeVar("T")
log = logging.getLogger("defbench")


def pick_device(requested: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {requested!r} requested but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device {requested!r} requested but MPS is not available here; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_enabled() -> bool:
    if os.environ.get("DEFBENCH_PROGRESS") in ("0", "false", "no"):
        return False
    return sys.stderr.isatty() or os.environ.get("DEFBENCH_PROGRESS") in ("1", "true", "yes")


@dataclass
class RunContext:
    device: torch.device = field(default_factory=lambda: pick_device("auto"))
    seed: int = 0
    logger: logging.Logger = log
    show_progress: bool = field(default_factory=progress_enabled)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.records: dict = {}

    def record(self, key: str, value) -> None:
        """Keep a JSON-able value (MI per layer, a detection score...) with the stage's artifact."""
        self.records[key] = value

    def reseed(self, seed: int) -> "RunContext":
        """Seed every RNG (global and this context's generator) for one stage."""
        self.seed = seed
        seed_everything(seed)
        self.generator = torch.Generator().manual_seed(seed)
        return self

    def progress(self, iterable: Iterable[T], desc: str = "", total: int | None = None,
                 leave: bool = False) -> Iterator[T]:
        return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not self.show_progress,
                    dynamic_ncols=True)

    def batches(self, n: int, batch_size: int, shuffle: bool = True, drop_last: bool = True) -> list[torch.Tensor]:
        """Index batches over ``n`` items, shuffled with this context's generator."""
        order = torch.randperm(n, generator=self.generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if (drop_last and n >= batch_size) else n
        return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def to_float(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 N x 3 x H x W (any device) -> float in [0, 1] on ``device``."""
    return images_uint8.to(device, non_blocking=True).float().div_(255.0)
