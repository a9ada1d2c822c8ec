"""Name -> component registries, shared by attacks and defenses.

A component is a callable plus a config dataclass whose field defaults are
the published ("paper") settings, and optional per-profile overrides that
live beside it (``profiles={"tiny": {...}, "ci": {...}}``). Third-party
packages add components through an entry-point group (``defbench.attacks`` or
``defbench.defenses``): the entry point names a module, importing it runs its
``@register_...`` decorators.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from .runtime import log


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class Component:
    name: str
    fn: Callable[..., Any]
    config: type
    summary: str
    profiles: dict[str, dict] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific flags

    @property
    def module(self) -> str:
        return self.fn.__module__

    def config_fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.config)}

    def make_config(self, profile: str, *override_layers: dict) -> Any:
        """Paper defaults < this component's profile defaults < each override layer, in order."""
        values: dict[str, Any] = dict(self.profiles.get(profile, {}))
        for layer in override_layers:
            values.update(layer)
        unknown = set(values) - set(self.config_fields())
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, list(self.config_fields()), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RegistryError(f"{self.name} has no setting {key!r}{hint} "
                                f"(settings: {', '.join(self.config_fields())})")
        return self.config(**values)


class Registry:
    def __init__(self, kind: str, entry_point_group: str):
        self.kind = kind
        self.group = entry_point_group
        self._items: dict[str, Component] = {}
        self._plugins_loaded = False

    def register(self, name: str, *, config: type, summary: str, profiles: dict | None = None,
                 **options) -> Callable:
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"{self.kind} {name!r}: config must be a dataclass, got {config!r}")

        def decorate(obj):
            fn = obj() if inspect.isclass(obj) else obj
            if name in self._items and self._items[name].fn is not fn:
                raise RegistryError(f"{self.kind} {name!r} is registered twice "
                                    f"({self._items[name].module} and {fn.__module__})")
            self._items[name] = Component(name, fn, config, summary, dict(profiles or {}), options)
            return obj
        return decorate

    def load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.group):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must not take the built-ins down
                log.warning("could not load %s plugin %r (%s): %s", self.kind, ep.name, ep.value, err)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._items)

    def get(self, name: str) -> Component:
        self.load_plugins()
        if name not in self._items:
            known = sorted(self._items)
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}; {hint}known: {', '.join(known)}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return name in self._items

    def items(self) -> list[Component]:
        return [self._items[n] for n in self.names()]
