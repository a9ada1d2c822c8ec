"""The one registry type: name -> item, with "did you mean" errors and entry-point plugins.

Attacks, defenses, architectures, datasets, trigger types, measurements,
detectors and studies are all :class:`Registry` instances. Attacks and defenses
use :class:`ComponentRegistry`, whose items are :class:`Component` s: a callable
plus a config dataclass (defaults = the published "paper" settings) and its
per-profile values (``profiles={"tiny": {...}, "ci": {...}}``). Third-party
packages add items through an entry-point group (``defbench.attacks``,
``defbench.defenses``): the entry point names a module, importing it runs its
``register`` calls. Registration options are explicit keyword arguments of ``register_attack`` /
``register_defense`` kept in a frozen :class:`Options` dataclass per kind, so a misspelt option fails when the
method registers and a misspelt read fails when it is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from .config import build_config
from .errors import RegistryError, UserError  # noqa: F401  (UserError: re-exported)

T = TypeVar("T")
log = logging.getLogger("defbench")


def unknown_name_message(kind: str, name: str, known) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown {kind} {name!r}; {hint}known: {', '.join(known)}"


class Registry(Generic[T]):
    """Named items of one kind; ``get`` fails with the nearest known names."""

    def __init__(self, kind: str, entry_point_group: str | None = None, extra_names: tuple[str, ...] = ()):
        self.kind = kind
        self.group = entry_point_group
        self.extra_names = extra_names  # shown in "known: ..." (e.g. the npz:PATH dataset spelling)
        self._items: dict[str, T] = {}
        self._renamed: dict[str, str] = {}  # a former name -> the current one (``formerly=`` at registration)
        self._plugins_loaded = entry_point_group is None

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``; registering another item under a taken name is an error."""
        if name in self._items and self._items[name] is not item:
            raise RegistryError(f"{self.kind} {name!r} is registered twice ({_origin(self._items[name])} and "
                                f"{_origin(item)})")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda item: self.add(name, item)

    def load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        load_plugin_files()
        for ep in metadata.entry_points(group=self.group):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must not take the built-ins down
                log.warning("could not load %s plugin %r (%s): %s", self.kind, ep.name, ep.value, err)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._items)

    def rename(self, old: str, new: str, check_only: bool = False) -> None:
        """``old`` is the former name of the item now registered as ``new``: looking ``old`` up finds it."""
        if old in self._items:
            raise RegistryError(f"{self.kind} {new!r} was formerly {old!r}, but {old!r} is still registered "
                                f"({_origin(self._items[old])})")
        if self._renamed.get(old, new) != new:
            raise RegistryError(f"{self.kind} {new!r} was formerly {old!r}, but so was {self._renamed[old]!r}")
        if not check_only:
            self._renamed[old] = new

    def renamed(self) -> dict[str, str]:
        """Former name -> current name, for every renamed item (results stored under a former name are its)."""
        self.load_plugins()
        return dict(self._renamed)

    def get(self, name: str) -> T:
        """The item registered as ``name``, or formerly registered as ``name`` (it was renamed since)."""
        self.load_plugins()
        name = self._renamed.get(name, name)
        if name not in self._items:
            raise RegistryError(unknown_name_message(self.kind, name, [*self._items, *self.extra_names]))
        return self._items[name]

    __getitem__ = get  # registry["name"]: the same lookup, the same "did you mean" error

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._items or name in self._renamed

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def items(self) -> list[T]:
        return [self._items[n] for n in self.names()]


PLUGIN_ENV = "DEFBENCH_PLUGINS"
_loaded_files: set[str] = set()


def load_plugin_files() -> None:
    """Import the ``.py`` files named in ``$DEFBENCH_PLUGINS`` (separated by ``os.pathsep``; a folder means every
    ``.py`` in it): a new attack or defense as one file, no package and no fork. Each becomes module
    ``defbench_plugins.<stem>``; a file that fails to import is logged and skipped."""
    entries = [e for e in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if e.strip()]
    files = []
    for entry in entries:
        path = Path(entry).expanduser()
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    for path in files:
        key = str(path.resolve())
        if key in _loaded_files:
            continue
        _loaded_files.add(key)
        name = f"defbench_plugins.{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"not a Python file: {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as err:  # a broken plugin must not take the built-ins down
            sys.modules.pop(name, None)
            log.warning("could not load plugin file %s (from $%s): %s", path, PLUGIN_ENV, err)


def _origin(item) -> str:
    return getattr(item, "module", None) or getattr(item, "__module__", None) or type(item).__name__


@dataclass(frozen=True)
class Options:
    """A component's registration options; each kind subclasses it (``AttackOptions``, ``DefenseOptions``).
    Read them as attributes; ``options["name"]`` and ``options.get("name", default)`` also work, and there too a
    name that is not an option is an error, never the default."""

    def __getitem__(self, name: str):
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            raise KeyError(f"{type(self).__name__} has no option {name!r} (options: {', '.join(names)})")
        return getattr(self, name)

    def get(self, name: str, default=None):  # an option always has a value (its default): ``default`` is unused
        return self[name]

    def check(self, where: str, config: type) -> None:
        """Checks that need the config (e.g. that named fields exist); a RegistryError at registration."""


@dataclass
class Component:
    """An attack or defense: ``fn`` plus its config dataclass, summary and per-profile values."""
    name: str
    fn: Callable[..., Any]
    config: type
    summary: str
    profiles: dict[str, dict] = field(default_factory=dict)
    options: Options = field(default_factory=Options)  # the kind's registration options
    kind: str = "component"
    formerly: tuple[str, ...] = ()  # earlier names, oldest first (a renamed method)

    @property
    def module(self) -> str:
        return self.fn.__module__

    @property
    def key_name(self) -> str:
        """The name its stages are keyed by: the first it was registered under, so a rename keeps its results."""
        return self.formerly[0] if self.formerly else self.name

    def config_fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.config)}

    def make_config(self, profile: str | None = None, *override_layers: dict) -> Any:
        """Paper defaults < this component's ``profiles[profile]`` < each override layer, typed and checked.

        (The benchmark resolves profiles with inheritance and provenance in ``benchmark.pipeline.settings``;
        this is the short form for tests and scripts.)"""
        values: dict[str, Any] = dict(self.profiles.get(profile, {})) if profile else {}
        for layer in override_layers:
            values.update(layer)
        return build_config(self.config, values, f"{self.kind} {self.name}")


class ComponentRegistry(Registry[Component]):
    """Attacks or defenses, registered with ``@registry.component(name, config=..., summary=...)``; ``options``:
    the kind's :class:`Options` subclass."""

    def __init__(self, kind: str, entry_point_group: str | None = None, options: type[Options] = Options):
        super().__init__(kind, entry_point_group)
        self.options_type = options

    def component(self, name: str, *, config: type, summary: str, profiles: dict | None = None,
                  formerly: tuple[str, ...] | str = (), options: Options | None = None) -> Callable:
        """``formerly``: the names this method was registered under before (oldest first): they still find it,
        and its stages keep the keys, and so the results, of its first name (``Component.key_name``).
        ``options``: an instance of this registry's options type (default: its defaults)."""
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"{self.kind} {name!r}: config must be a dataclass, got {config!r}")
        options = self.options_type() if options is None else options
        if not isinstance(options, self.options_type):
            raise TypeError(f"{self.kind} {name!r}: options must be {self.options_type.__name__}, got {options!r}")
        options.check(f"{self.kind} {name!r}", config)
        formerly = (formerly,) if isinstance(formerly, str) else tuple(formerly)

        def decorate(obj):
            fn = obj() if inspect.isclass(obj) else obj
            previous = self._items.get(name)
            if previous is not None and previous.fn is not fn:
                raise RegistryError(f"{self.kind} {name!r} is registered twice "
                                    f"({previous.module} and {fn.__module__})")
            if name in self._renamed:
                raise RegistryError(f"{self.kind} {name!r} is the former name of {self._renamed[name]!r}; "
                                    "choose another name")
            for old in formerly:  # every former name checked before any is taken
                self.rename(old, name, check_only=True)
            for old in formerly:
                self.rename(old, name)
            self._items[name] = Component(name, fn, config, summary, dict(profiles or {}), options, self.kind,
                                          formerly)
            return obj
        return decorate
