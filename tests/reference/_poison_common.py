"""Shared by the reference-trace tests of the data-poisoning attacks (CTRL, CorruptEncoder, BASSL/SSL-Backdoor).

Each ``<method>.json`` here was recorded by running the authors' poison generator (outside this repository,
on CPU) on the fixed inputs in ``poison_inputs.npz``:

- ``images``: 32 uint8 3 x 32 x 32 images (0-15 uniform noise, so clamps act; 16-31 smooth colour fields);
- ``labels``: a class per image (class 0 at six scattered indices), for CTRL's clean-label selection;
- ``htba_patch``: defbench's 10 x 10 HTBA pattern, handed to SSL-Backdoor's ``add_watermark`` as its trigger
  image so that both sides paste the same patch.

The authors' generators draw from Python's ``random`` / numpy, which defbench's torch generator cannot
reproduce; each trace therefore records the reference's random choices (draws, picks, pasted positions) and
the test feeds the same choices to defbench, comparing everything that is deterministic given them.
Images are stored as hex strings of their uint8 bytes (C order, 3 x 32 x 32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import _classic_common as C

HERE = Path(__file__).parent
INPUTS = HERE / "poison_inputs.npz"


def inputs() -> dict[str, np.ndarray]:
    return C.inputs(INPUTS)


def load_trace(method: str) -> dict:
    """The recorded trace, after checking it was made from the inputs file that is here."""
    return C.load_trace(method, INPUTS)


def images() -> torch.Tensor:
    """All fixed images, uint8 N x 3 x 32 x 32."""
    return torch.from_numpy(inputs()["images"])


def unhex(text: str, shape=(3, 32, 32)) -> torch.Tensor:
    """A uint8 image stored as the hex string of its bytes."""
    return torch.from_numpy(np.frombuffer(bytes.fromhex(text), dtype=np.uint8).copy()).reshape(shape)


def differing_columns(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Columns (last axis) where two C x H x W images differ anywhere."""
    return (a != b).any(dim=0).any(dim=0).nonzero().flatten().tolist()
