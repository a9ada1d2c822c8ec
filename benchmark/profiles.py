"""Profiles: named configs (TOML files shipped in ``profiles/``) plus ``--set`` overrides.

Layers, lowest first: the dataclass defaults (the paper's settings), the
profile TOML, then ``--set key=value`` from the command line. Attack and
defense settings come from the component itself (its paper defaults and its
own per-profile values), then the TOML's ``[attack.NAME]`` / ``[defense.NAME]``
tables, then ``--set attack.FIELD=`` (the selected attack) or
``--set defense.NAME.FIELD=`` (one defense by name).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..attacks import ATTACKS
from ..defenses import DEFENSES
from ..encoders import EncoderConfig, SimCLRConfig


class ConfigError(ValueError):
    """A profile or override that does not fit; the message names the valid keys."""


@dataclass
class PretrainSettings(SimCLRConfig):
    max_images: int = 0  # cap on the pre-training set (random, seeded); 0: all


@dataclass
class CleanSettings:
    fraction: float = 0.04  # of the pre-training set's training images
    max_images: int = 0  # 0: no cap
    poison_ratio: float = 0.0  # share of the clean set stamped with the attack's trigger (robustness study)


@dataclass
class EvalSettings:
    epochs: int = 500
    batch_size: int = 64
    lr: float = 1e-4
    hidden: tuple[int, int] = (512, 256)
    dropout: float = 0.5
    max_train: int = 0  # caps on the downstream sets (random, seeded); 0: all
    max_test: int = 0
    feature_batch: int = 512


@dataclass
class GridSettings:
    attacks: list[str] = field(default_factory=lambda: ["badencoder", "bassl"])
    defenses: list[str] = field(default_factory=lambda: ["ft", "fp", "nad", "anp", "moth", "decree", "medic", "mimic"])
    pretrain: list[str] = field(default_factory=lambda: ["cifar10", "stl10"])
    # used by `--executor submitit` on a SLURM cluster
    slurm_partition: str = ""
    slurm_gpus: int = 1
    slurm_cpus: int = 8
    slurm_timeout_min: int = 24 * 60


@dataclass
class StudySettings:
    """Where the studies of ``defbench report`` run (``benchmark/studies.py``)."""
    attack: str = "badencoder"
    pretrain: str = ""  # "": the grid's first pre-training set
    downstream: list[str] = field(default_factory=list)  # empty: every task of the pre-training set's family


SECTIONS = {"encoder": EncoderConfig, "pretrain": PretrainSettings, "clean": CleanSettings,
            "evaluate": EvalSettings, "grid": GridSettings, "studies": StudySettings}


@dataclass
class Profile:
    name: str
    description: str = ""
    seed: int = 0
    data_dir: str = ""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    clean: CleanSettings = field(default_factory=CleanSettings)
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    grid: GridSettings = field(default_factory=GridSettings)
    studies: StudySettings = field(default_factory=StudySettings)
    # component settings: {"*": {...}} applies to whichever attack/defense runs
    attack: dict[str, dict] = field(default_factory=dict)
    defense: dict[str, dict] = field(default_factory=dict)
    overrides: dict[str, object] = field(default_factory=dict)  # the --set values, for the record

    def attack_config(self, name: str):
        return self._component_config(ATTACKS, self.attack, name)

    def defense_config(self, name: str):
        return self._component_config(DEFENSES, self.defense, name)

    def _component_config(self, registry, tables: dict, name: str):
        component = registry.get(name)
        fields = component.config_fields()
        generic = {k: v for k, v in tables.get("*", {}).items() if k in fields}
        try:
            return component.make_config(self.name, tables.get(name, {}), generic)
        except (TypeError, KeyError) as err:
            raise ConfigError(str(err)) from None


def builtin_profiles() -> list[str]:
    folder = resources.files("defbench.benchmark") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"profile file not found: {path}")
        text, name = path.read_text(), path.stem
    else:
        if name_or_path not in builtin_profiles():
            close = difflib.get_close_matches(name_or_path, builtin_profiles(), n=2)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"unknown profile {name_or_path!r}; {hint}known: {', '.join(builtin_profiles())} "
                              "(or pass a path to a .toml file)")
        text = (resources.files("defbench.benchmark") / "profiles" / f"{name_or_path}.toml").read_text()
        name = name_or_path
    try:
        return name, tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"profile {name_or_path!r} is not valid TOML: {err}") from None


def _coerce(key: str, value, annotation):
    origin = typing.get_origin(annotation) or annotation
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        return origin(value)
    if origin in (int, float, str, bool) and not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise ConfigError(f"{key} expects {origin.__name__}, got {value!r}")
    return value


def _apply(obj, section: str, values: dict):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key in values:
        if key not in names:
            raise ConfigError(_unknown_key(f"{section}.{key}"))
    return dataclasses.replace(obj, **{k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()})


def valid_keys() -> list[str]:
    keys = ["seed", "data_dir"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES)):
        for comp in registry.items():
            for fname in comp.config_fields():
                keys += [f"{kind}.{fname}", f"{kind}.{comp.name}.{fname}"]
    return sorted(set(keys))


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown setting {key!r}{hint} (see `defbench list settings`)"


def parse_value(text: str):
    """TOML syntax for a value (3, 1e-3, true, [1, 2], "x"); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str] | tuple[str, ...]) -> dict[str, object]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _component_table(kind: str, registry, tables: dict, key: str, value, source: str) -> None:
    parts = key.split(".")
    if len(parts) == 2:  # attack.FIELD: whichever attack runs
        fname = parts[1]
        if not any(fname in c.config_fields() for c in registry.items()):
            raise ConfigError(_unknown_key(key))
        tables.setdefault("*", {})[fname] = value
    elif len(parts) == 3:
        name, fname = parts[1], parts[2]
        comp = registry.get(name)
        if fname not in comp.config_fields():
            raise ConfigError(_unknown_key(key))
        tables.setdefault(name, {})[fname] = value
    else:
        raise ConfigError(f"{source}: {key!r} should be {kind}.FIELD or {kind}.NAME.FIELD")


def load_profile(name_or_path: str = "tiny", sets: dict[str, object] | None = None) -> Profile:
    name, raw = _read_toml(name_or_path)
    profile = Profile(name=name)
    flat: dict[str, object] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in ("attack", "defense"):
            for comp, table in value.items():
                for fname, v in table.items():
                    flat[f"{key}.{comp}.{fname}"] = v
        elif isinstance(value, dict):
            for fname, v in value.items():
                flat[f"{key}.{fname}"] = v
        else:
            flat[key] = value
    flat.update(sets or {})
    sections: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, value in flat.items():
        head = key.split(".")[0]
        if key in ("name", "description"):
            setattr(profile, key, str(value) if key == "description" else profile.name)
        elif key in ("seed", "data_dir"):
            setattr(profile, key, _coerce(key, value, int if key == "seed" else str))
        elif head in SECTIONS and key.count(".") == 1:
            sections[head][key.split(".")[1]] = value
        elif head == "attack":
            _component_table("attack", ATTACKS, profile.attack, key, value, name)
        elif head == "defense":
            _component_table("defense", DEFENSES, profile.defense, key, value, name)
        else:
            raise ConfigError(_unknown_key(key))
    for section, values in sections.items():
        setattr(profile, section, _apply(getattr(profile, section), section, values))
    profile.overrides = dict(sorted((sets or {}).items()))
    return profile


def canonical_json(obj) -> str:
    """Stable JSON for hashing: sorted keys, dataclasses and tuples as plain structures."""
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON-able: {type(o).__name__}")
    return json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))
