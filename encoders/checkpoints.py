"""Saving and loading encoders without ever unpickling arbitrary objects.

Encoders come from strangers (that is the threat model), and a pickle can run
code, so every load goes through ``torch.load(weights_only=True)``: only
tensors and plain containers are accepted. Two layouts are understood:

- defbench's own: ``{"format": "defbench-encoder/1", "config": {...},
  "state_dict": {...}}``,
- the BadEncoder / MIMIC release: ``{"state_dict": {"f.f.0.weight": ...,
  "g.0.weight": ...}}`` (or the bare state dict), keys of a torchvision
  ResNet-18 wrapped in ``f.f`` (children conv1, bn1, relu, layer1..layer4,
  avgpool) and the projection head in ``g``.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import torch

from ..core import UserError
from .base import CIFAR10_MEAN, CIFAR10_STD, Encoder, EncoderConfig

FORMAT = "defbench-encoder/1"

# Position of each torchvision child inside the release's nn.Sequential `f.f`.
_RELEASE_CHILDREN = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}


class CheckpointError(UserError):
    """A checkpoint that cannot (or must not) be loaded; the message says what to do."""


def save_encoder(encoder: Encoder, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": encoder.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "meta": meta or {},
    }
    buffer = io.BytesIO()  # a file name would end up inside the zip: bytes would differ between runs
    torch.save(payload, buffer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def _safe_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refused to load {path}: it contains pickled Python objects, not just weights "
            f"({first[:160]}); re-save only its state_dict with torch.save if you trust the file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: {str(err)[:160]}); "
            "is the file complete and saved with torch.save?"
        ) from None


def _release_to_defbench(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = re.sub(r"^module\.", "", key)
        if key.startswith("f.f."):
            index, _, rest = key[len("f.f."):].partition(".")
            if index not in _RELEASE_CHILDREN:
                raise CheckpointError(f"unexpected key {key!r} in a BadEncoder-layout checkpoint")
            out[f"backbone.{_RELEASE_CHILDREN[index]}.{rest}"] = value
        elif key.startswith("g."):
            out["head." + key[2:]] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in a BadEncoder-layout checkpoint")
    return out


def _infer_config(state: dict, mean, std, image_size: int) -> EncoderConfig:
    try:
        width = state["backbone.conv1.weight"].shape[0]
        proj_hidden = state["head.0.weight"].shape[0]
        proj_dim = state["head.3.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"checkpoint lacks {err.args[0]!r}; is it a ResNet-18 SimCLR encoder?") from None
    return EncoderConfig(width=width, proj_hidden=proj_hidden, proj_dim=proj_dim,
                         mean=tuple(mean), std=tuple(std), image_size=image_size)


def _build(config: EncoderConfig, state: dict, path: Path) -> Encoder:
    encoder = Encoder(config)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match a {config.arch} of width {config.width}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    return encoder


def load_encoder(path: str | os.PathLike, *, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 image_size: int = 32) -> Encoder:
    """Load a defbench checkpoint or import one in the BadEncoder/MIMIC release layout.

    ``mean``/``std``/``image_size`` apply only to imported release checkpoints,
    which do not record their normalisation.
    """
    path = Path(path)
    payload = _safe_load(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
    try:
        if payload.get("format") == FORMAT:
            config = EncoderConfig.from_dict(payload["config"])
            return _build(config, payload["state_dict"], path)
        state = payload.get("state_dict", payload)
        if isinstance(state, dict) and any(re.sub(r"^module\.", "", str(k)).startswith("f.f.") for k in state):
            state = _release_to_defbench({k: v for k, v in state.items() if torch.is_tensor(v)})
            return _build(_infer_config(state, mean, std, image_size), state, path)
    except (RuntimeError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a valid encoder checkpoint: {str(err)[:200]}") from None
    raise CheckpointError(
        f"{path} is neither a defbench encoder nor a BadEncoder/MIMIC release checkpoint "
        "(expected keys 'format'/'config'/'state_dict', or 'f.f.*' and 'g.*' weights)"
    )


def load_meta(path: str | os.PathLike) -> dict:
    payload = _safe_load(Path(path))
    return payload.get("meta", {}) if isinstance(payload, dict) else {}
