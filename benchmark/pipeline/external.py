"""Encoders the benchmark did not make (bring your own): a checkpoint file as a stage of the pipeline.

An ``import`` stage's artifact is the file read into the defbench format; its
key hashes the file's *content* (sha256) and the input size and normalisation
it is read with, never its path, so the same file under two names is one
stage and an edited file is a new one. From there the file goes through the
ordinary stages: ``defend`` (the registered defense on a clean set) and
``evaluate`` (the benchmark's probe, ACC/ASR), cached like the grid's.

A :class:`Suspect` is an external encoder in the grid: a row group of Table I
named like an attack, with its trigger and target (both optional: without a
trigger only ACC is measured). Defenses see only the file and the clean set,
never the trigger or the target, exactly as in the grid's own cells.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ...attacks.triggers import load_trigger
from ...core import UserError
from ...encoders.tower_checkpoints import TOWER_LAYOUTS, load_any_checkpoint as load_checkpoint
from .settings import Profile
from .stages import Stage

IMPORT = "file"  # the name of every import stage: what it imports is its spec (the file's content)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SUSPECT_FIELDS = ("path", "trigger", "target", "image_size", "mean", "std")


def import_stage(path: str | Path, info: dict) -> Stage:
    """The stage that reads checkpoint ``path`` (as ``load_checkpoint`` described it in ``info``)."""
    spec = {"sha256": info["sha256"], "image_size": info["image_size"], "mean": list(info["mean"]),
            "std": list(info["std"])}
    if info.get("layout") in TOWER_LAYOUTS:  # a ViT / CLIP tower: its stages run the tower code (stages.py)
        spec["layout"] = info["layout"]
    return Stage("import", IMPORT, spec, labels={"label": f"import {path}", "path": str(path)})


@dataclass(frozen=True)
class Suspect:
    """An external encoder in the grid: a row group of Table I (``name`` in the attack column)."""
    name: str
    path: str
    sha256: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = ""
    trigger: dict | None = None  # the trigger's description (content, not a file name)
    target: int | None = None  # None: each downstream task's default target (when there is a trigger)
    trigger_spec: str = ""  # the trigger as the user named it, for display

    def record(self) -> dict:
        """JSON-able; stored with each result row, so a table can re-plan the row's key without the file."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_record(cls, record: dict) -> "Suspect":
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})

    def stage(self) -> Stage:
        return import_stage(self.path, {"sha256": self.sha256, "image_size": self.image_size, "mean": self.mean,
                                        "std": self.std, "layout": self.layout})

    def describe(self) -> str:
        trigger = (f"trigger {self.trigger_spec or self.trigger.get('type')}" if self.trigger
                   else "no trigger (ACC only)")
        target = f", target {self.target}" if self.target is not None else ""
        return f"{self.name}: {self.path} ({self.layout} layout, sha256 {self.sha256[:12]}, {trigger}{target})"


def resolve_suspect(name: str, path: str, trigger: str | None = None, target: int | None = None,
                    image_size: int | None = None, mean=None, std=None) -> Suspect:
    """Read the file (every check of ``load_checkpoint``) and the trigger; one-line errors for either."""
    if not _NAME.match(name or ""):
        raise UserError(f"suspect name {name!r}: use letters, digits and _.+- (it names a row group of Table I)")
    _, info = load_checkpoint(path, image_size=image_size, mean=mean, std=std)
    description = load_trigger(trigger, info["image_size"]).describe() if trigger else None
    if target is not None and description is None:
        raise UserError(f"suspect {name}: a target class without a trigger means nothing; give PATH:TRIGGER:TARGET")
    return Suspect(name, str(path), info["sha256"], info["image_size"], tuple(info["mean"]), tuple(info["std"]),
                   info["layout"], description, target, trigger or "")


def _rebase(path: str, base: str) -> str:
    return str(Path(base) / path) if base and not Path(path).expanduser().is_absolute() else path


def _split_path(parts: list[str], base: str) -> tuple[str, list[str]]:
    """The longest leading run of ``parts`` that names an existing file (paths may hold ':'), and the rest."""
    for i in range(len(parts), 0, -1):
        candidate = _rebase(":".join(parts[:i]), base)
        if Path(candidate).expanduser().is_file():
            return candidate, parts[i:]
    return _rebase(parts[0], base), parts[1:]


def parse_suspect(text: str, base: str = "") -> tuple[str, dict]:
    """``NAME=PATH[:TRIGGER[:TARGET]]`` -> (name, {path, trigger, target}); TRIGGER is ``patch:SIZE`` or a file.
    Relative file names start at ``base`` (default: the working directory)."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise UserError(f"--suspect expects NAME=PATH[:TRIGGER[:TARGET]], got {text!r}")
    path, rest_parts = _split_path(rest.split(":"), base)
    trigger, target = None, None
    if rest_parts:
        if rest_parts[0] == "patch":
            size = rest_parts[1:2] if len(rest_parts) > 1 and rest_parts[1].isdigit() else []
            trigger, rest_parts = ":".join(["patch", *size]), rest_parts[1 + len(size):]
        elif rest_parts[0]:
            trigger, rest_parts = _split_path(rest_parts, base)
        if rest_parts:
            if len(rest_parts) > 1 or not rest_parts[0].lstrip("-").isdigit():
                raise UserError(f"--suspect {text!r}: after the trigger comes the target class, an integer "
                                f"(NAME=PATH[:TRIGGER[:TARGET]], TRIGGER = patch:SIZE or a file)")
            target = int(rest_parts[0])
    return name.strip(), {"path": path, "trigger": trigger, "target": target}


def suspect_from_setting(name: str, value, base: str = "") -> Suspect:
    """A ``[suspects]`` entry of a profile: ``NAME = "PATH[:TRIGGER[:TARGET]]"`` or a table with ``path`` and
    optionally ``trigger``, ``target``, ``image_size``, ``mean``, ``std``; relative paths start at ``base``
    (the profile file's folder)."""
    if isinstance(value, str):
        fields = parse_suspect(f"{name}={value}", base)[1]
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(SUSPECT_FIELDS))
        if unknown or "path" not in value:
            raise UserError(f"suspects.{name}: a table needs 'path' and may have {', '.join(SUSPECT_FIELDS[1:])}"
                            + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        fields = dict(value)
        fields["path"] = _rebase(str(fields["path"]), base)
        trigger = fields.get("trigger")
        if trigger and not (trigger == "patch" or trigger.startswith("patch:")):
            fields["trigger"] = _rebase(trigger, base)
    else:
        raise UserError(f"suspects.{name} must be \"PATH[:TRIGGER[:TARGET]]\" or a table, got {value!r}")
    return resolve_suspect(name, **fields)


def profile_suspects(profile: Profile) -> list[Suspect]:
    return [suspect_from_setting(name, value, profile.suspect_dirs.get(name, ""))
            for name, value in profile.suspects.items()]
