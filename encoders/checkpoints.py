"""Saving and loading encoders without ever unpickling arbitrary objects.

Encoders come from strangers (that is the threat model), and a pickle can run
code, so every ``.pt`` load goes through ``torch.load(weights_only=True)``:
only tensors and plain containers are accepted. ``.safetensors`` files are read
by a small reader of that format (a JSON header and raw little-endian bytes:
nothing in it can run). Three layouts are understood:

- ``defbench``: this project's own, ``{"format": "defbench-encoder/1",
  "config": {...}, "state_dict": {...}}`` (in safetensors: the config in the
  header's metadata);
- ``badencoder``: the BadEncoder / MIMIC release, ``{"state_dict": {"f.f.0.weight":
  ..., "g.0.weight": ...}}`` (or the bare state dict), a torchvision ResNet-18
  with the CIFAR stem wrapped in ``f.f`` (children conv1, bn1, relu,
  layer1..layer4, avgpool) and the projection head in ``g``;
- ``torchvision``: a plain torchvision ResNet-18/34/50/101/152 state dict
  (``conv1.weight``, ``layer1.0.conv1.weight``, ..., ``fc.*``), bare or under
  ``state_dict``/``model``. The classifier ``fc`` is not part of the encoder,
  and the layout has no projection head: the encoder gets a fresh one, seeded
  from the file's hash. A 3x3 ``conv1`` of a ResNet-18 is read as the CIFAR
  variant (no max-pool).

A ``module.`` prefix (DataParallel) is accepted in the two imported layouts.
Input size and normalisation come from the file where it records them (the
defbench config; top-level ``image_size``/``mean``/``std`` entries or
safetensors metadata), else from the caller's values, else from the layout's
default (32 px and the CIFAR-10 statistics for the CIFAR stems, 224 px and
the ImageNet statistics for torchvision's stem). :func:`save_like` writes an
encoder back in the layout, container and key names of the file it was read
from; tensors of the file that are not part of the encoder (``fc.*``, an
optimizer state) are copied unchanged.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..core import UserError
from .base import CIFAR10_MEAN, CIFAR10_STD, Encoder, EncoderConfig
from .tvresnet import DEPTHS

FORMAT = "defbench-encoder/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")

# Position of each torchvision child inside the release's nn.Sequential `f.f`.
_RELEASE_CHILDREN = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}
_RELEASE_INDEX = {v: k for k, v in _RELEASE_CHILDREN.items()}
# torchvision blocks per stage (+ bottleneck?) -> depth
_TORCHVISION_DEPTH = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                      ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
EXPECTED = {
    "defbench": "a defbench encoder ('format': 'defbench-encoder/1', 'config', 'state_dict')",
    "badencoder": "the BadEncoder/MIMIC release ('f.f.0.weight', 'f.f.3.0.conv1.weight', 'g.0.weight', ...)",
    "torchvision": "a torchvision ResNet ('conv1.weight', 'layer1.0.conv1.weight', 'fc.weight', ...)",
}
_EXAMPLE_KEYS = ["f.f.0.weight", "f.f.3.0.conv1.weight", "g.0.weight", "conv1.weight", "bn1.weight",
                 "layer1.0.conv1.weight", "layer4.1.bn2.running_var", "fc.weight", "state_dict", "config"]


class CheckpointError(UserError):
    """A checkpoint that cannot (or must not) be loaded; the message says what to do."""


def _one_line(text: object, limit: int = 160) -> str:
    return " ".join(str(text).split())[:limit]


# ----------------------------------------------------------------- writing

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _torch_bytes(payload) -> bytes:
    buffer = io.BytesIO()  # a file name would end up inside the zip: bytes would differ between runs
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_encoder(encoder: Encoder, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    payload = {
        "format": FORMAT,
        "config": encoder.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "meta": meta or {},
    }
    _atomic_write(Path(path), _torch_bytes(payload))


# ----------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _is_safetensors(path: Path, head: bytes) -> bool:
    return path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{" and not head.startswith(b"PK"))


def _read_safetensors(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; any inconsistency is a CheckpointError."""
    def broken(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path} as a safetensors file ({why}); is the file complete?")
    if len(data) < 8:
        raise broken("shorter than its 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise broken(f"the header claims {size} bytes, the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as err:
        raise broken(f"its header is not JSON: {_one_line(err, 80)}") from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base, tensors = 8 + size, {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise broken(f"tensor {name!r} has an unreadable entry {_one_line(info, 80)}") from None
        count = math.prod(shape)
        if base + end > len(data) or end - begin != count * torch.empty((), dtype=dtype).element_size() or begin < 0:
            raise broken(f"tensor {name!r} runs past the end of the file or has the wrong byte size")
        chunk = bytearray(data[base + begin:base + end])
        tensors[name] = (torch.frombuffer(chunk, dtype=dtype) if count else torch.empty(0, dtype=dtype)).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> tensor) as a safetensors file, atomically."""
    _atomic_write(Path(path), _safetensors_bytes(tensors, {str(k): str(v) for k, v in (metadata or {}).items()}))


# ----------------------------------------------------------------- reading a file

@dataclass
class RawCheckpoint:
    """A checkpoint file as read: its tensors (keys as in the file) and where they sit."""
    path: Path
    container: str  # "torch" or "safetensors"
    payload: dict  # the torch payload ({} for safetensors)
    metadata: dict  # safetensors metadata ({} for torch files)
    state: dict[str, torch.Tensor]  # the state dict's tensors, keys as in the file
    state_key: str | None  # where the state dict sits in the payload (None: the payload is the state dict)
    prefix: str = ""  # stripped from every key ("module." of DataParallel)

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @cached_property
    def keys(self) -> dict[str, str]:
        """key without the prefix -> key in the file"""
        return {k[len(self.prefix):]: k for k in self.state}

    def tensor(self, key: str) -> torch.Tensor:
        return self.state[self.keys[key]]

    def recorded(self) -> dict:
        """Input size / normalisation the file records outside a defbench config (top-level entries or metadata)."""
        source = self.metadata if self.container == "safetensors" else self.payload
        out = {}
        for key in ("image_size", "mean", "std"):
            value = source.get(key)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    value = [float(v) for v in value.split(",")] if "," in value else value
            if value is not None:
                out[key] = value
        return out


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"(Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+|Unsupported operand \S+)", text)
        why = found.group(1) if found else (text.strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"refused to load {path}: it contains pickled Python objects, not just weights "
            f"({_one_line(why)}); re-save only its state_dict with torch.save if you trust the file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: {_one_line(err).split('. ')[0]}); "
            "is the file complete and saved with torch.save?"
        ) from None


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """The file's tensors and container, safely (``weights_only`` / the safetensors reader)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if _is_safetensors(path, head):
        tensors, metadata = _read_safetensors(path, path.read_bytes())
        raw = RawCheckpoint(path, "safetensors", {}, metadata, tensors, None)
    else:
        payload = _safe_load(path)
        if not isinstance(payload, dict):
            raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
        state, state_key = payload, None
        if not any(torch.is_tensor(v) for v in payload.values()):
            for key in CONTAINER_KEYS:
                if isinstance(payload.get(key), dict):
                    state, state_key = payload[key], key
                    break
        tensors = {str(k): v for k, v in state.items() if torch.is_tensor(v)}
        raw = RawCheckpoint(path, "torch", payload, {}, tensors, state_key)
    if raw.state and all(k.startswith("module.") for k in raw.state):
        raw.prefix = "module."
    return raw


# ----------------------------------------------------------------- layouts

@dataclass
class Plan:
    """How a file's tensors become an encoder: its layout, the architecture, encoder key -> file key."""
    layout: str
    config: dict  # EncoderConfig fields fixed by the weights (arch, width, projection sizes)
    mapping: dict[str, str]  # encoder state key -> key in the file (with its prefix)
    carried: list[str] = field(default_factory=list)  # file keys that are not part of the encoder
    head: bool = True  # the file holds the projection head
    defaults: dict = field(default_factory=dict)  # image_size / mean / std when nothing else says
    note: str = ""


def _is_defbench(raw: RawCheckpoint) -> bool:
    return raw.payload.get("format") == FORMAT or raw.metadata.get("format") == FORMAT


def _plan_defbench(raw: RawCheckpoint) -> Plan:
    config = raw.payload.get("config") if raw.container == "torch" else raw.metadata.get("config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{raw.path}: a defbench encoder file without a readable 'config'")
    try:
        defaults = EncoderConfig.from_dict(config).to_dict()
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{raw.path}: its encoder config is invalid ({_one_line(err)})") from None
    fixed = {k: v for k, v in defaults.items() if k not in ("image_size", "mean", "std")}
    return Plan("defbench", fixed, {k: k for k in raw.state},
                defaults={k: defaults[k] for k in ("image_size", "mean", "std")})


def _plan_badencoder(raw: RawCheckpoint) -> Plan:
    mapping, unexpected = {}, []
    for key, file_key in raw.keys.items():
        if key.startswith("f.f."):
            index, _, rest = key[len("f.f."):].partition(".")
            if index in _RELEASE_CHILDREN:
                mapping[f"backbone.{_RELEASE_CHILDREN[index]}.{rest}"] = file_key
                continue
        elif key.startswith("g."):
            mapping["head." + key[2:]] = file_key
            continue
        unexpected.append(file_key)
    if unexpected:
        raise CheckpointError(f"{raw.path}: unexpected key {unexpected[0]!r} in a BadEncoder-layout checkpoint "
                              "(expected only f.f.0/1/3/4/5/6.* and g.*)")
    blocks = _blocks(raw.keys, "f.f.{}.".format, [_RELEASE_INDEX[s] for s in ("layer1", "layer2", "layer3", "layer4")])
    if blocks != ((2, 2, 2, 2), False):
        raise CheckpointError(f"{raw.path}: a BadEncoder-layout ResNet with {_describe_blocks(blocks)}; only the "
                              "release's ResNet-18 (2 basic blocks per stage) is supported")
    config = {"arch": "resnet18", "width": _shape(raw, "f.f.0.weight")[0],
              "proj_hidden": _shape(raw, "g.0.weight")[0], "proj_dim": _shape(raw, "g.3.weight")[0]}
    return Plan("badencoder", config, mapping, defaults=_cifar_defaults())


def _plan_torchvision(raw: RawCheckpoint) -> Plan:
    blocks = _blocks(raw.keys, "{}.".format, ["layer1", "layer2", "layer3", "layer4"])
    kernel = _shape(raw, "conv1.weight")[-1]
    depth = _TORCHVISION_DEPTH.get(blocks)
    if depth is None:
        raise CheckpointError(f"{raw.path}: a torchvision-style ResNet with {_describe_blocks(blocks)} is not one of "
                              f"torchvision's ResNet-{'/'.join(map(str, DEPTHS))}")
    mapping = {f"backbone.{key}": file_key for key, file_key in raw.keys.items() if not key.startswith("fc.")}
    carried = [file_key for key, file_key in raw.keys.items() if key.startswith("fc.")]
    if kernel == 7:
        return Plan("torchvision", {"arch": f"tv-resnet{depth}", "width": 64}, mapping, carried, head=False,
                    defaults={"image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    if kernel == 3 and depth == 18:
        return Plan("torchvision", {"arch": "resnet18", "width": _shape(raw, "conv1.weight")[0]}, mapping, carried,
                    head=False, defaults=_cifar_defaults(),
                    note="3x3 conv1: read as the CIFAR variant of ResNet-18 (no max-pool)")
    raise CheckpointError(f"{raw.path}: a ResNet-{depth} whose conv1 is {kernel}x{kernel}; supported: torchvision's "
                          "7x7 stem, or a 3x3 stem on a ResNet-18 (the CIFAR variant)")


def _cifar_defaults() -> dict:
    return {"image_size": 32, "mean": CIFAR10_MEAN, "std": CIFAR10_STD}


def _shape(raw: RawCheckpoint, key: str) -> tuple[int, ...]:
    if key not in raw.keys:
        raise CheckpointError(f"{raw.path} lacks {key!r}, which its layout needs; is it a ResNet encoder?")
    return tuple(raw.tensor(key).shape)


def _blocks(keys, stage_prefix, stages: list[str]) -> tuple[tuple[int, ...], bool]:
    counts = []
    for stage in stages:
        prefix = stage_prefix(stage)
        indices = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        counts.append(max(indices) + 1 if indices else 0)
    bottleneck = any(re.match(re.escape(stage_prefix(stages[0])) + r"\d+\.conv3\.", k) for k in keys)
    return tuple(counts), bottleneck


def _describe_blocks(blocks: tuple[tuple[int, ...], bool]) -> str:
    counts, bottleneck = blocks
    return f"{'/'.join(map(str, counts))} {'bottleneck' if bottleneck else 'basic'} blocks per stage"


def plan_checkpoint(raw: RawCheckpoint) -> Plan:
    """Which layout the file is in and how its keys map onto an encoder; an unknown layout is a one-line error."""
    if _is_defbench(raw):
        return _plan_defbench(raw)
    keys = raw.keys
    if any(k.startswith("f.f.") for k in keys):
        return _plan_badencoder(raw)
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return _plan_torchvision(raw)
    raise CheckpointError(_unknown_layout(raw))


def _unknown_layout(raw: RawCheckpoint) -> str:
    found = list(raw.keys)[:5000] or [str(k) for k in raw.payload][:200]
    best, like, score = None, None, 0.0
    for key in found:
        for expected in _EXAMPLE_KEYS:
            ratio = difflib.SequenceMatcher(None, key, expected).ratio()
            if ratio > score:
                best, like, score = key, expected, ratio
    closest = (f"closest found: {best!r} (like {like!r}) among {len(raw.state)} tensors" if best is not None
               else "the file holds no tensors")
    return (f"{raw.path} is neither a defbench encoder nor a layout defbench imports: expected the keys of "
            f"{EXPECTED['defbench']}, of {EXPECTED['badencoder']} or of {EXPECTED['torchvision']}; {closest}")


# ----------------------------------------------------------------- building the encoder

def _resolve(plan: Plan, raw: RawCheckpoint, image_size, mean, std) -> tuple[dict, dict]:
    """(image_size/mean/std, where each came from): the caller's value, else the file's, else the layout's default."""
    given = {"image_size": image_size, "mean": mean, "std": std}
    recorded = {} if plan.layout == "defbench" else raw.recorded()
    values, sources = {}, {}
    for key in ("image_size", "mean", "std"):
        if given[key] is not None:
            values[key], sources[key] = given[key], "given"
        elif key in recorded:
            values[key], sources[key] = recorded[key], "file"
        elif plan.layout == "defbench":
            values[key], sources[key] = plan.defaults[key], "file"
        else:
            values[key], sources[key] = plan.defaults[key], f"{plan.layout} layout default"
    try:
        values["image_size"] = int(values["image_size"])
        values["mean"], values["std"] = (tuple(float(v) for v in values["mean"]),
                                         tuple(float(v) for v in values["std"]))
    except (TypeError, ValueError):
        raise CheckpointError(f"{raw.path}: unreadable image_size/mean/std {values}") from None
    return values, sources


def _build(raw: RawCheckpoint, plan: Plan, resolved: dict) -> Encoder:
    try:
        config = EncoderConfig.from_dict({**plan.config, **resolved})
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{raw.path}: {_one_line(err)}") from None
    if plan.head:  # every weight comes from the file (building draws from the global RNG, as it always has)
        encoder = Encoder(config)
    else:  # a fresh projection head, the same for the same file, without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(raw.sha256[:8], 16))
            encoder = Encoder(config)
    target = encoder.state_dict()
    what = f"a {config.arch}" + (f" of width {config.width}" if config.arch == "resnet18" else "")
    state, unexpected = {}, []
    for key, file_key in plan.mapping.items():
        if key not in target:
            unexpected.append(file_key)
            continue
        tensor = raw.state[file_key]
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise CheckpointError(f"{raw.path}: {file_key} has shape {tuple(tensor.shape)} but {what} expects "
                                  f"{tuple(target[key].shape)}; the file holds another architecture or is damaged")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = [fk for fk in plan.mapping.values() if raw.state[fk].is_floating_point()
                   and not torch.isfinite(raw.state[fk]).all()]
            raise CheckpointError(f"{raw.path}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); "
                                  "the checkpoint is broken")
        state[key] = tensor.to(target[key].dtype)
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")
               and (plan.head or not k.startswith("head."))]
    if missing or unexpected:
        raise CheckpointError(f"{raw.path} does not match {what} ({plan.layout} layout): missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}")
    encoder.load_state_dict(state, strict=False)
    return encoder


def _load(path, image_size, mean, std) -> tuple[Encoder, RawCheckpoint, Plan, dict, dict]:
    raw = read_checkpoint(path)
    try:
        plan = plan_checkpoint(raw)
        resolved, sources = _resolve(plan, raw, image_size, mean, std)
        return _build(raw, plan, resolved), raw, plan, resolved, sources
    except (RuntimeError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{raw.path} is not a valid encoder checkpoint: {_one_line(err, 200)}") from None


def load_checkpoint(path: str | os.PathLike, *, image_size: int | None = None, mean=None,
                    std=None) -> tuple[Encoder, dict]:
    """(encoder, what was read): the layout, architecture, sha256 of the file, image size and normalisation
    with where each came from, and the file's tensors that are not part of the encoder."""
    encoder, raw, plan, resolved, sources = _load(path, image_size, mean, std)
    info = {"path": str(raw.path), "sha256": raw.sha256, "container": raw.container, "layout": plan.layout,
            "arch": encoder.config.arch, "width": encoder.config.width, "image_size": resolved["image_size"],
            "mean": list(resolved["mean"]), "std": list(resolved["std"]), "sources": sources,
            "head": "from the file" if plan.head else "fresh (the layout has no projection head)",
            "carried": plan.carried, "prefix": raw.prefix, "note": plan.note}
    return encoder, info


def load_encoder(path: str | os.PathLike, *, image_size: int | None = None, mean=None, std=None) -> Encoder:
    """Load an encoder in any layout of the module docstring.

    ``image_size``/``mean``/``std`` override what the file records (or, for
    imported layouts that record nothing, the layout's default).
    """
    return _load(path, image_size, mean, std)[0]


def save_like(encoder: Encoder, source: str | os.PathLike, out: str | os.PathLike,
              sha256: str | None = None) -> dict:
    """Write ``encoder`` to ``out`` in the layout, container and key names of the checkpoint ``source``
    (the file it was read from; ``sha256`` checks that it has not changed). Returns what was written."""
    raw = read_checkpoint(source)
    if sha256 is not None and raw.sha256 != sha256:
        raise CheckpointError(f"{source} changed since it was read (sha256 {raw.sha256[:12]}, expected "
                              f"{sha256[:12]}); rerun on the current file")
    plan = plan_checkpoint(raw)
    out = Path(out)
    if plan.layout == "defbench":
        if raw.container == "torch":
            save_encoder(encoder, out, meta=raw.payload.get("meta") or {})
        else:
            state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
            save_safetensors(state, out, {**raw.metadata, "format": FORMAT,
                                          "config": json.dumps(encoder.config.to_dict())})
        return {"path": str(out), "layout": plan.layout, "container": raw.container, "sha256": file_sha256(out)}
    if any(encoder.config.to_dict()[k] != v for k, v in plan.config.items()):
        raise CheckpointError(f"the encoder ({encoder.config.arch}) is not the architecture of {source}; "
                              "cannot write it in that file's layout")
    current = encoder.state_dict()
    state = dict(raw.state)
    for key, file_key in plan.mapping.items():
        value = current[key].detach().cpu()
        if tuple(value.shape) != tuple(raw.state[file_key].shape):
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}, {file_key} in {source} has "
                                  f"{tuple(raw.state[file_key].shape)}; cannot write the encoder in that layout")
        state[file_key] = value.to(raw.state[file_key].dtype).clone()
    if raw.container == "safetensors":
        save_safetensors(state, out, raw.metadata)
    else:
        payload = dict(raw.payload)
        if raw.state_key is None:
            payload.update(state)
        else:
            payload[raw.state_key] = {**raw.payload[raw.state_key], **state}
        _atomic_write(out, _torch_bytes(payload))
    return {"path": str(out), "layout": plan.layout, "container": raw.container, "sha256": file_sha256(out),
            "carried_unchanged": plan.carried}


def load_meta(path: str | os.PathLike) -> dict:
    payload = _safe_load(Path(path))
    return payload.get("meta", {}) if isinstance(payload, dict) else {}
