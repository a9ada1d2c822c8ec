"""Triggers: pixel-space operations stamped on images before normalisation.

- ``PatchTrigger``: a square of one grey value (the attacks' trigger; ``patch:SIZE`` on the command line);
- ``MaskTrigger``: any image-sized trigger, ``x' = x * keep + add`` per pixel and channel. It is what a
  trigger file becomes (:func:`load_trigger`): the BadEncoder release's ``.npz`` (arrays ``t``, the
  pattern in 0..255, and ``tm``, 1 where the image is kept, each N x H x W x 3, the first of the N used,
  as in the release's ``BadEncoderTestBackdoor``), an ``.npz`` with ``pattern`` and ``mask`` (1 where the
  trigger is), or a PNG whose alpha channel is the mask. Its description holds the arrays themselves
  (compressed), so a stored result names its trigger by content, not by a file path.
"""
from __future__ import annotations

import base64
import zlib
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..core import Registry, UserError


class TriggerError(UserError):
    """A trigger name or file that cannot be used; the message says why."""


@dataclass(frozen=True)
class PatchTrigger:
    """A ``size`` x ``size`` square of one grey value (255 = white).

    ``row``/``col`` give its top-left corner; -1 places it at the bottom-right
    with a ``margin``-pixel gap (rows/cols 21..30 for the paper's 10x10 on 32x32).
    """
    size: int = 10
    row: int = -1
    col: int = -1
    margin: int = 1
    value: int = 255
    image_size: int = 32

    def __post_init__(self):
        r0, c0 = self.origin
        if self.size < 1 or r0 < 0 or c0 < 0 or r0 + self.size > self.image_size or c0 + self.size > self.image_size:
            raise ValueError(f"a {self.size}x{self.size} trigger at ({r0}, {c0}) does not fit a "
                             f"{self.image_size}x{self.image_size} image; adjust trigger_size/row/col")

    @property
    def origin(self) -> tuple[int, int]:
        far = self.image_size - self.margin - self.size
        return (far if self.row < 0 else self.row, far if self.col < 0 else self.col)

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.image_size, self.image_size)
        r0, c0 = self.origin
        m[r0:r0 + self.size, c0:c0 + self.size] = 1
        return m

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp uint8 images (0..255) or float images (0..1), N x C x H x W; returns a new tensor."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"trigger built for {self.image_size}px images, got {tuple(images.shape[-2:])}")
        out = images.clone()
        r0, c0 = self.origin
        value = self.value if images.dtype == torch.uint8 else self.value / 255.0
        out[..., r0:r0 + self.size, c0:c0 + self.size] = value
        return out

    def describe(self) -> dict:
        return {"type": "patch", **asdict(self)}


@dataclass
class TriggerSettings:
    """Config fields every patch-trigger attack shares (a dataclass base for attack configs)."""
    trigger_size: int = 10
    trigger_row: int = -1
    trigger_col: int = -1
    target: int = -1  # -1: the downstream task's paper target class

    def make_trigger(self, image_size: int) -> PatchTrigger:
        return PatchTrigger(size=self.trigger_size, row=self.trigger_row, col=self.trigger_col,
                            image_size=image_size)


def _pack(array: torch.Tensor) -> str:
    return base64.b64encode(zlib.compress(array.to(torch.uint8).contiguous().numpy().tobytes(), 9)).decode()


def _unpack(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    data = zlib.decompress(base64.b64decode(text))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


@dataclass(frozen=True)
class MaskTrigger:
    """``x' = x * keep + add`` (pixel values 0..255), ``keep`` in [0, 1] (stored in steps of 1/255) and ``add``
    in 0..255, each 3 x H x W, packed as base64 of zlib-compressed uint8 (``from_arrays`` builds one)."""
    image_size: int
    keep: str
    add: str

    @classmethod
    def from_arrays(cls, keep: torch.Tensor, add: torch.Tensor) -> "MaskTrigger":
        """``keep`` (1 where the image stays) and ``add`` (0..255), each 3 x H x W with H = W."""
        size = keep.shape[-1]
        return cls(image_size=int(size), keep=_pack((keep.double() * 255).round().clamp(0, 255)),
                   add=_pack(add.double().round().clamp(0, 255)))

    @cached_property
    def arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (3, self.image_size, self.image_size)
        return _unpack(self.keep, shape).float() / 255.0, _unpack(self.add, shape).float()

    def mask(self) -> torch.Tensor:
        """Where the trigger changes the image (H x W, 1 = replaced)."""
        return 1.0 - self.arrays[0].min(0).values

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp uint8 images (0..255) or float images (0..1), N x C x H x W; returns a new tensor."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"trigger built for {self.image_size}px images, got {tuple(images.shape[-2:])}")
        keep, add = (a.to(images.device) for a in self.arrays)
        if images.dtype == torch.uint8:
            return (images.float() * keep + add).round_().clamp_(0, 255).to(torch.uint8)
        return images * keep + add / 255.0

    def describe(self) -> dict:
        return {"type": "mask", **asdict(self)}


TRIGGER_TYPES: Registry[type] = Registry("trigger type")
TRIGGER_TYPES.add("patch", PatchTrigger)
TRIGGER_TYPES.add("mask", MaskTrigger)


def trigger_from_description(description: dict):
    """Rebuild a trigger from its ``describe()`` output (how stored results name their trigger)."""
    d = dict(description)
    return TRIGGER_TYPES.get(d.pop("type", None))(**d)


# ----------------------------------------------------------------- triggers named on the command line

def _hwc(array: np.ndarray, name: str, path: Path) -> torch.Tensor:
    """An N x H x W x C, H x W x C or H x W array (first of N) as float 3 x H x W."""
    a = np.asarray(array)
    if a.dtype.kind not in "uifb":
        raise TriggerError(f"{path}: array {name!r} must be numeric, got {a.dtype}")
    if a.ndim == 4:
        a = a[0]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3) or a.shape[0] != a.shape[1]:
        raise TriggerError(f"{path}: array {name!r} must be [N x] H x W x C with H = W and C in {{1, 3}}, "
                           f"got {tuple(np.asarray(array).shape)}")
    t = torch.as_tensor(a.astype(np.float64)).permute(2, 0, 1)
    return t.expand(3, -1, -1).clone() if t.shape[0] == 1 else t


def _from_npz(path: Path) -> MaskTrigger:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise TriggerError(f"cannot read trigger {path} as an .npz archive ({' '.join(str(err).split())[:120]})") \
            from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise TriggerError(f"{path} holds one array, not an .npz archive with 't' and 'tm' (or 'pattern' and 'mask')")
    with archive:
        try:
            if "t" in archive.files and "tm" in archive.files:  # the BadEncoder release: x * tm + t
                add, keep = _hwc(archive["t"], "t", path), _hwc(archive["tm"], "tm", path)
            elif "pattern" in archive.files and "mask" in archive.files:  # mask: 1 where the trigger is
                pattern, mask = _hwc(archive["pattern"], "pattern", path), _hwc(archive["mask"], "mask", path)
                keep, add = 1.0 - mask, pattern * mask
            else:
                raise TriggerError(f"{path} has arrays {', '.join(archive.files) or 'none'}; a trigger .npz holds "
                                   "'t' (pattern, 0..255) and 'tm' (1 where the image is kept), as in the BadEncoder "
                                   "release, or 'pattern' and 'mask'")
        except ValueError as err:  # object arrays would need pickle
            if isinstance(err, TriggerError):
                raise
            raise TriggerError(f"cannot read {path} without pickle ({' '.join(str(err).split())[:120]})") from None
    if keep.shape != add.shape:
        raise TriggerError(f"{path}: pattern and mask shapes differ ({tuple(add.shape)} vs {tuple(keep.shape)})")
    if keep.min() < 0 or keep.max() > 1 or add.min() < 0 or add.max() > 255:
        raise TriggerError(f"{path}: the mask must lie in [0, 1] and the pattern in [0, 255] (pixel values)")
    return MaskTrigger.from_arrays(keep, add)


def _from_image(path: Path) -> MaskTrigger:
    from PIL import Image
    try:
        with Image.open(path) as img:
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            rgba = np.asarray(img.convert("RGBA"))
    except Exception as err:
        raise TriggerError(f"cannot read trigger image {path} ({' '.join(str(err).split())[:120]})") from None
    if not has_alpha:
        raise TriggerError(f"{path} has no alpha channel; a trigger image's alpha is its mask "
                           "(255 where the trigger replaces the image, 0 where the image stays)")
    if rgba.shape[0] != rgba.shape[1]:
        raise TriggerError(f"{path} is {rgba.shape[1]}x{rgba.shape[0]}; a trigger image must be square, the size of "
                           "the encoder's input")
    rgb = torch.as_tensor(rgba[..., :3].astype(np.float64)).permute(2, 0, 1)
    alpha = torch.as_tensor(rgba[..., 3].astype(np.float64) / 255.0).expand(3, -1, -1)
    return MaskTrigger.from_arrays(1.0 - alpha, rgb * alpha)


def load_trigger(spec: str, image_size: int):
    """A trigger from its command-line name: ``patch`` / ``patch:SIZE`` (the attacks' white square at the
    bottom-right) or a file: ``.npz`` (the BadEncoder release's ``t``/``tm``, or ``pattern``/``mask``) or an
    image with an alpha channel (the mask). A file's trigger must have the encoder's input size."""
    name, _, arg = spec.partition(":")
    if name == "patch" and not Path(spec).exists():
        try:
            size = int(arg) if arg else PatchTrigger.size
            return PatchTrigger(size=size, image_size=image_size)
        except ValueError as err:
            raise TriggerError(f"trigger {spec!r}: {err}" if arg.isdigit() else
                               f"trigger {spec!r}: write patch:SIZE with an integer size, e.g. patch:10") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TriggerError(f"trigger {spec!r} is neither patch[:SIZE] nor an existing file (.npz, or .png with alpha)")
    trigger = _from_npz(path) if path.suffix.lower() == ".npz" else _from_image(path)
    if trigger.image_size != image_size:
        raise TriggerError(f"trigger {path} is {trigger.image_size}x{trigger.image_size} but the encoder reads "
                           f"{image_size}x{image_size} images; use a trigger of that size (or --image-size)")
    return trigger
