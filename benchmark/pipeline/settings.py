"""Profiles: every setting of a run, resolved in one typed pass, with where each value came from.

Layers, lowest first:

1. the dataclass defaults (the paper's settings);
2. each attack's/defense's own ``profiles=`` entry for the built-in profiles of the chain;
3. the profile TOML files, base first (a file may say ``base = "tiny"`` to inherit a built-in or
   another file, and then gets tiny's component entries too);
4. ``--set key=value`` from the command line.

Within one layer a specific key (``defense.mimic.epochs``) beats the generic one (``defense.epochs``,
whichever defense runs). Every value is coerced to its field's type and range-checked
(:mod:`defbench.core.config`) when the profile is loaded or a component's config is built, i.e. when
stages are planned, before anything computes. ``Profile.explain`` (``defbench config``) lists each value
with its layer.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ...attacks import ATTACKS
from ...core import ComponentRegistry, ConfigError, build_config, coerce
from ...core.config import check_range, field_types, unknown_field_message
from ...defenses import DEFENSES
from ...encoders import EncoderConfig, SimCLRConfig
from .keys import canonical_json  # noqa: F401  (re-exported: older imports)

DEFAULT_SOURCE = "paper default"
SET_SOURCE = "--set"
MAX_SEED = 2**63 - 1  # SQLite's integer range
MAX_WIDTH = 65_536  # layer sizes: beyond this a model does not fit any accelerator; surely a typo
MAX_ENCODER = {"width": 1024, "image_size": 1024, "proj_hidden": MAX_WIDTH, "proj_dim": MAX_WIDTH}


@dataclass
class PretrainSettings(SimCLRConfig):
    max_images: int = 0  # cap on the pre-training set (random, seeded); 0: all


@dataclass
class CleanSettings:
    fraction: float = 0.04  # of the pre-training set's training images
    max_images: int = 0  # 0: no cap
    poison_ratio: float = 0.0  # share of the clean set stamped with the attack's trigger (robustness study)

    def validate(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"clean.fraction must be in (0, 1], got {self.fraction}")


@dataclass
class EvalSettings:
    # the MIMIC code's probe (wssun/MIMIC training_downstream_classifier.py, evaluation/nn_classifier.py): 1000
    # epochs, batch 64, Adam lr 1e-4, hidden 512-256, dropout 0.5; it does not shuffle, this probe does
    # (docs/evaluation.md)
    epochs: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    hidden: tuple[int, int] = (512, 256)
    dropout: float = 0.5
    max_train: int = 0  # caps on the downstream sets (random, seeded); 0: all
    max_test: int = 0
    feature_batch: int = 512

    def validate(self):
        if min(self.hidden) < 1 or max(self.hidden) > MAX_WIDTH:
            raise ValueError(f"evaluate.hidden must be sizes between 1 and {MAX_WIDTH:,}, got {list(self.hidden)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"evaluate.dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"evaluate.lr must be positive, got {self.lr}")


PROTOCOLS = ("mlp", "linear", "knn", "finetune", "zeroshot")
DEFAULT_PROTOCOL = "mlp"


@dataclass
class ProtocolSettings:
    """Downstream protocols other than the MLP probe (``pipeline/protocols.py``); ``mlp`` uses ``evaluate``."""
    knn_k: int = 200
    knn_temperature: float = 0.5
    finetune_epochs: int = 10
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    prompt: str = "a photo of a {}."

    def validate(self):
        if self.knn_k < 1 or self.finetune_epochs < 1 or self.finetune_batch_size < 1:
            raise ValueError("protocols.knn_k, finetune_epochs and finetune_batch_size must be at least 1")
        if self.knn_temperature <= 0 or self.finetune_lr <= 0:
            raise ValueError("protocols.knn_temperature and finetune_lr must be positive")
        if "{}" not in self.prompt:
            raise ValueError(f"protocols.prompt needs a {{}} where the class name goes, got {self.prompt!r}")


@dataclass
class GridSettings:
    # the profile files name them (the paper's: badencoder, bassl; ft ... mimic; cifar10, stl10)
    attacks: list[str] = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    # used by `--executor submitit` on a SLURM cluster
    slurm_partition: str = ""
    slurm_gpus: int = 1
    slurm_cpus: int = 8
    slurm_timeout_min: int = 24 * 60


@dataclass
class StudySettings:
    """Where the studies of ``defbench report`` run (``benchmark/analysis/studies.py``)."""
    attack: str = "badencoder"
    defense: str = "mimic"  # the defense the MIMIC studies (components, lambdas, trigger size, ...) vary
    pretrain: str = ""  # "": the grid's first pre-training set
    downstream: list[str] = field(default_factory=list)  # empty: every task of the pre-training set's family


SECTIONS = {"encoder": EncoderConfig, "pretrain": PretrainSettings, "clean": CleanSettings,
            "evaluate": EvalSettings, "grid": GridSettings, "studies": StudySettings, "protocols": ProtocolSettings}
TOP_LEVEL = {"seed": int, "data_dir": str, "description": str}
COMPONENTS: dict[str, ComponentRegistry] = {"attack": ATTACKS, "defense": DEFENSES}
SUSPECTS = "suspects"  # [suspects] NAME = "PATH[:TRIGGER[:TARGET]]": external encoders as row groups of the grid


@dataclass
class Layer:
    source: str  # what set these values, for `defbench config`
    values: dict[str, object]  # flat keys: "seed", "encoder.width", "defense.epochs", "defense.mimic.epochs"


@dataclass
class Profile:
    name: str
    chain: list[str]  # this profile, its base, the base's base...
    layers: list[Layer]  # profile files (base first), then --set
    builtin_chain: list[str] = field(default_factory=list)  # built-in profiles of the chain, base first
    origin: str = ""  # what load_profile was given (a built-in name or a path): reload with other --set values
    description: str = ""
    seed: int = 0
    data_dir: str = ""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    clean: CleanSettings = field(default_factory=CleanSettings)
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    grid: GridSettings = field(default_factory=GridSettings)
    studies: StudySettings = field(default_factory=StudySettings)
    protocols: ProtocolSettings = field(default_factory=ProtocolSettings)
    overrides: dict[str, object] = field(default_factory=dict)  # the --set values, for the record
    sources: dict[str, str] = field(default_factory=dict)  # "section.field" -> the layer that set it
    # external encoders of the grid ([suspects] NAME = "PATH[:TRIGGER[:TARGET]]" or a table; pipeline/external.py)
    suspects: dict[str, object] = field(default_factory=dict)
    suspect_dirs: dict[str, str] = field(default_factory=dict)  # NAME -> the folder its relative paths start at

    def attack_config(self, name: str):
        return self.component_config("attack", name)[0]

    def defense_config(self, name: str):
        return self.component_config("defense", name)[0]

    def component_config(self, kind: str, name: str) -> tuple[object, dict[str, str]]:
        """(config, field -> source) of attack or defense ``name`` under this profile."""
        component = COMPONENTS[kind].get(name)
        name = component.name  # a former name (formerly=) reads the settings of the current one
        unknown = sorted(set(component.profiles) - set(builtin_profiles()))
        if unknown:
            raise ConfigError(f"{kind} {name} has profiles= entries for unknown profiles {unknown} "
                              f"(known: {', '.join(builtin_profiles())})")
        fields = component.config_fields()
        values: dict[str, object] = {}
        sources = {f: DEFAULT_SOURCE for f in fields}
        for builtin in self.builtin_chain:
            for key, value in component.profiles.get(builtin, {}).items():
                values[key] = value
                sources[key] = f"{name}'s {builtin!r} entry (profiles= in {component.module})"
        for layer in self.layers:
            for key in (f"{kind}.{{}}", f"{kind}.{name}.{{}}"):  # generic first: the specific key wins
                for fname in fields:
                    if key.format(fname) in layer.values:
                        values[fname] = layer.values[key.format(fname)]
                        sources[fname] = layer.source
        return build_config(component.config, values, f"{kind}.{name}"), sources

    def takes_effect(self, key: str, kind: str, name: str) -> bool:
        """Whether ``--set key`` sets a field of component ``kind`` ``name``: a specific key (``defense.mimic.lr``)
        of that component, or a generic one (``defense.epochs``) that it has and that no ``--set`` key names
        specifically for it (the specific key wins)."""
        parsed = component_key(key)
        if parsed is None or parsed[0] != kind or name not in COMPONENTS[kind]:
            return False
        _, owner, fname = parsed
        if owner is not None:
            return owner == name
        return fname in COMPONENTS[kind].get(name).config_fields() and f"{kind}.{name}.{fname}" not in self.overrides

    def overrides_for(self, attack: str | None = None, defense: str | None = None) -> dict[str, object]:
        """The ``--set`` values a result computed with ``attack`` and ``defense`` (None, ``none`` or an
        unregistered name such as a suspect's: none of that kind) was computed with, as its results row records
        them: every section and top-level key, and an attack/defense key only where it takes effect."""
        components = {"attack": attack, "defense": defense}
        return {key: value for key, value in self.overrides.items()
                if component_key(key) is None
                or any(name and self.takes_effect(key, kind, name) for kind, name in components.items())}

    def check_reach(self, used: dict[str, set[str]]) -> list[str]:
        """A generic attack/defense key of ``--set`` (``defense.epochs``) must take effect for a component that
        runs (``used``: kind -> names, e.g. ``plan.components_used``), otherwise a ConfigError naming the method
        and its fields; returns one line per generic key that takes effect for some of them and not others. (A
        specific key, ``defense.mimic.lr``, names a field its method has; where that method does not run it does
        nothing, and no results row records it.)"""
        notes = []
        for key, value in self.overrides.items():
            parsed = component_key(key)
            if parsed is None or parsed[1] is not None:
                continue
            kind, _, fname = parsed
            names = sorted(used.get(kind, ()))
            took = [name for name in names if self.takes_effect(key, kind, name)]
            if not took:
                raise ConfigError(self._no_effect(key, kind, fname, names))
            missed = [name for name in names if name not in took]
            if missed:
                notes.append(f"--set {key}={value!r} takes effect for {kind} {', '.join(took)}; not for "
                             f"{', '.join(missed)} (no such setting, or a {kind}.NAME.{fname} key sets it)")
        return notes

    @staticmethod
    def _no_effect(key: str, kind: str, fname: str, names: list[str]) -> str:
        """Why the generic ``--set key`` takes effect for none of ``names`` (the components of ``kind`` that run)."""
        if not names:
            return f"--set {key}: nothing here runs a{'n' if kind == 'attack' else ''} {kind}, so it would do nothing"
        fields = {name: list(COMPONENTS[kind].get(name).config_fields()) for name in names}
        shadowed = [name for name in names if fname in fields[name]]
        if shadowed:
            return (f"--set {key}: every {kind} here that has {fname!r} gets it from a more specific key "
                    f"({', '.join(f'{kind}.{name}.{fname}' for name in shadowed)})")
        if len(names) == 1:
            return f"--set {key}: " + unknown_field_message(f"{kind} {names[0]}", fname, fields[names[0]])
        return (f"--set {key}: no {kind} run here has a setting {fname!r} ("
                + "; ".join(f"{name}: {', '.join(fields[name]) or 'no settings'}" for name in names) + ")")

    def explain(self, kinds: dict[str, list[str]] | None = None) -> list[tuple[str, object, str]]:
        """(key, value, source) of every section setting and of the named components (``{"attack": [...]}``)."""
        rows = [(k, getattr(self, k), self.sources.get(k, DEFAULT_SOURCE)) for k in ("seed", "data_dir")]
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                key = f"{section}.{f.name}"
                rows.append((key, getattr(getattr(self, section), f.name), self.sources.get(key, DEFAULT_SOURCE)))
        for kind, names in (kinds or {}).items():
            for name in names:
                config, sources = self.component_config(kind, name)
                rows += [(f"{kind}.{name}.{f.name}", getattr(config, f.name), sources[f.name])
                         for f in dataclasses.fields(config)]
        return rows


# ----------------------------------------------------------------- reading profile files

def builtin_profiles() -> list[str]:
    folder = resources.files("defbench.benchmark") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(name_or_path: str, relative_to: Path | None = None) -> tuple[str, str, dict]:
    """(name, source label, parsed table) of a built-in profile name or a .toml path."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"profile file not found: {path}")
        try:
            text, name, source = path.read_text(), path.stem, f"profile file {path}"
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read the profile file {path}: {getattr(err, 'strerror', None) or err}") from None
    else:
        if name_or_path not in builtin_profiles():
            close = difflib.get_close_matches(name_or_path, builtin_profiles(), n=2)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"unknown profile {name_or_path!r}; {hint}known: {', '.join(builtin_profiles())} "
                              "(or pass a path to a .toml file)")
        text = (resources.files("defbench.benchmark") / "profiles" / f"{name_or_path}.toml").read_text()
        name, source = name_or_path, f"profile {name_or_path} (benchmark/profiles/{name_or_path}.toml)"
    try:
        return name, source, tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"profile {name_or_path!r} is not valid TOML: {err}") from None


def _flatten(raw: dict, where: str) -> dict[str, object]:
    """TOML tables to flat keys: [encoder] width -> encoder.width; [defense.mimic] epochs -> defense.mimic.epochs;
    [defense] epochs -> defense.epochs (whichever defense runs)."""
    flat: dict[str, object] = {}
    for key, value in raw.items():
        if key == "base":
            continue
        if key == SUSPECTS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [suspects] must be a table of NAME = \"PATH[:TRIGGER[:TARGET]]\"")
            flat.update({f"{SUSPECTS}.{name}": item for name, item in value.items()})
            continue
        if not isinstance(value, dict):
            flat[key] = value
            continue
        for sub, item in value.items():
            if isinstance(item, dict):
                if key not in COMPONENTS:
                    raise ConfigError(f"{where}: [{key}.{sub}] is not a settings table; only [attack.NAME] and "
                                      "[defense.NAME] have sub-tables")
                flat.update({f"{key}.{sub}.{fname}": v for fname, v in item.items()})
            else:
                flat[f"{key}.{sub}"] = item
    return flat


def _profile_chain(name_or_path: str) -> list[tuple[str, str, dict]]:
    """The profile and its bases, each (name, source, table), the profile itself first."""
    chain, relative_to, current = [], None, name_or_path
    while current is not None:
        name, source, raw = _read_toml(current, relative_to)
        if any(source == s for _, s, _ in chain):
            raise ConfigError(f"profile {name_or_path!r}: its bases form a cycle at {current!r}")
        chain.append((name, source, raw))
        base = raw.get("base")
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{source}: base must be a profile name or a .toml path, got {base!r}")
        if source.startswith("profile file "):
            relative_to = Path(source.removeprefix("profile file ")).parent
        current = base
    return chain


# ----------------------------------------------------------------- checking keys

def valid_keys() -> list[str]:
    keys = list(TOP_LEVEL) + [f"{SUSPECTS}.NAME"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    for kind, registry in COMPONENTS.items():
        for comp in registry.items():
            for fname in comp.config_fields():
                keys += [f"{kind}.{fname}", f"{kind}.{comp.name}.{fname}"]
    return sorted(set(keys))


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown setting {key!r}{hint} (see `defbench list settings`)"


def current_key(key: str) -> str:
    """``key`` with a renamed method's former name replaced by its current one (``defense.OLD.F`` ->
    ``defense.NEW.F``); every other key as it is."""
    parsed = component_key(key)
    if parsed is None or parsed[1] is None:
        return key
    kind, owner, fname = parsed
    return f"{kind}.{COMPONENTS[kind].renamed().get(owner, owner)}.{fname}"


def component_key(key: str) -> tuple[str, str | None, str] | None:
    """(kind, NAME or None, FIELD) of an attack or defense key (``defense.epochs``: NAME None, whichever
    defense runs; ``defense.mimic.lr``: NAME ``mimic``); None for a section or top-level key."""
    kind, *rest = key.split(".")
    if kind not in COMPONENTS or len(rest) not in (1, 2):
        return None
    return (kind, None, rest[0]) if len(rest) == 1 else (kind, rest[0], rest[1])


def _check_component_key(key: str, value, source: str) -> None:
    """A component key names a field, and its value fits that field's type and range (for a generic key, in one
    of the components that have the field), also where a more specific key or another component running
    leaves it unused: a typo is an error even in a setting that does not take effect."""
    kind, *rest = key.split(".")
    registry = COMPONENTS[kind]
    if len(rest) == 1:  # attack.FIELD: whichever attack runs
        owners = [c for c in registry.items() if rest[0] in c.config_fields()]
        if not owners:
            raise ConfigError(_unknown_key(key))
    elif len(rest) == 2:
        owners = [registry.get(rest[0])]
        if rest[1] not in owners[0].config_fields():
            raise ConfigError(_unknown_key(key))
    else:
        raise ConfigError(f"{source}: {key!r} should be {kind}.FIELD or {kind}.NAME.FIELD")
    errors = []
    for component in owners:  # a generic key must fit at least one owner (fields may differ in type)
        try:
            checked = coerce(key, value, field_types(component.config)[rest[-1]])
            for item in (checked if isinstance(checked, (list, tuple)) else (checked,)):
                check_range(key, rest[-1], item)
            return
        except ConfigError as err:
            errors.append(err)
    raise errors[0]


def _check_key(key: str, value, source: str) -> None:
    head = key.split(".")[0]
    if head == SUSPECTS:
        if key.count(".") != 1 or not key.split(".")[1]:
            raise ConfigError(f"{source}: {key!r} should be suspects.NAME")
        return
    if head in COMPONENTS:
        _check_component_key(key, value, source)
    elif key in TOP_LEVEL or key == "name":
        return
    elif head in SECTIONS and key.count(".") == 1:
        if key.split(".")[1] not in {f.name for f in dataclasses.fields(SECTIONS[head])}:
            raise ConfigError(_unknown_key(key))
    else:
        raise ConfigError(_unknown_key(key))


# ----------------------------------------------------------------- loading

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


def load_profile(name_or_path: str = "tiny", sets: dict[str, object] | None = None) -> Profile:
    """A built-in profile or a .toml file (with its bases), plus ``--set`` values; every value checked."""
    chain = _profile_chain(name_or_path)
    sets = {current_key(key): value for key, value in (sets or {}).items()}
    layers = [Layer(source, {current_key(k): v for k, v in _flatten(raw, source).items()})
              for _, source, raw in reversed(chain)]
    layers.append(Layer(SET_SOURCE, sets))
    for layer in layers:
        for key in layer.values:
            _check_key(key, layer.values[key], layer.source)
    builtins = [name for name, source, _ in reversed(chain) if not source.startswith("profile file")]
    profile = Profile(name=chain[0][0], chain=[name for name, _, _ in chain], layers=layers, builtin_chain=builtins,
                      origin=name_or_path)
    values: dict[str, object] = {}
    for layer in layers:
        for key, value in layer.values.items():
            if key.startswith(SUSPECTS + "."):
                name = key.split(".", 1)[1]
                profile.suspects[name] = value
                folder = layer.source.removeprefix("profile file ")
                profile.suspect_dirs[name] = str(Path(folder).parent) if folder != layer.source else ""
            elif key.split(".")[0] not in COMPONENTS and key != "name":
                values[key] = value
                profile.sources[key] = layer.source
    for key, kind in TOP_LEVEL.items():
        if key in values:
            setattr(profile, key, coerce(key, values[key], kind))
    if not 0 <= profile.seed <= MAX_SEED:
        raise ConfigError(f"seed must be between 0 and {MAX_SEED}, got {profile.seed}")
    for section, cls in SECTIONS.items():
        own = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(section + ".")}
        setattr(profile, section, build_config(cls, own, section))
    for name, limit in MAX_ENCODER.items():  # ResNet-18 at width 64 is the paper's; 1024 is 256 times its size
        if getattr(profile.encoder, name) > limit:
            raise ConfigError(f"encoder.{name} must be at most {limit:,}, got {getattr(profile.encoder, name)}")
    profile.overrides = dict(sorted(sets.items()))
    return profile
