"""Typed settings: every value is checked against its dataclass field before anything runs.

``build_config(cls, values, where)`` coerces each value to its field's type
(an int where a float is expected becomes a float; ``'flase'`` for a bool, 5.5
for an int, a string for a number are errors), checks the generic ranges below,
constructs the dataclass (whose ``__post_init__`` may check more) and calls its
``validate()`` when it has one. Errors are :class:`ConfigError` s naming the key.

Generic ranges (by field name, for every settings dataclass): budgets (``epochs``,
``*_epochs``, ``*steps``, ``iterations``, ``*_iters``, ``max_*``, ``*_images``,
``*_batches``) are integers in [0, MAX_BUDGET]; batch sizes (``batch_size``,
``*_batch_size``, ``*_batch``) integers in [1, MAX_BATCH]; ``*fraction`` /
``*ratio`` / ``*portion`` in [0, 1]; learning rates (``lr``, ``*_lr``) and
temperatures (``temperature``, ``*_temperature``) > 0; ``momentum`` in [0, 1];
``dropout`` in [0, 1); weight decays, loss weights (``*weight``) and
``lambda*`` >= 0; a ``target`` class >= -1 (-1: the task's default); every
float finite. A value outside its range makes a run degenerate (no training, a
loss maximised, a division by zero) rather than fail, so it is refused up front.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing

from .errors import ConfigError

MAX_BUDGET = 10_000_000  # epochs, steps, iterations, images: beyond this a setting is a typo
MAX_BATCH = 1_000_000


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce(key: str, value, annotation):
    """``value`` as ``annotation`` (a resolved type hint), or a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list) or annotation in (tuple, list):
        kind = origin or annotation
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, e.g. [1, 2], got {value!r}")
        if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key} expects {len(args)} values, got {len(value)}: {value!r}")
            return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        return kind(coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**63:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, float):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a table, got {value!r}")
        return value
    return value  # Any or a type we do not check


_BUDGET = re.compile(r"(^|_)(epochs|steps|iterations|iters|batches|images)$|^max_")
_BATCH = re.compile(r"(^|_)batch(_size)?$")
_SHARE = re.compile(r"(fraction|ratio|portion)$")
_POSITIVE = re.compile(r"(^|_)(lr|temperature)$")
_NON_NEGATIVE = re.compile(r"(^|_)(weight_decay|weight)$|^lambda")
_UNIT = re.compile(r"(^|_)momentum$")


def check_range(key: str, name: str, value) -> None:
    """The generic ranges of the module docstring for one field value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if _BATCH.search(name):
        if not 1 <= value <= MAX_BATCH:
            raise ConfigError(f"{key} must be between 1 and {MAX_BATCH:,}, got {value!r}")
    elif _BUDGET.search(name):
        if not 0 <= value <= MAX_BUDGET:
            raise ConfigError(f"{key} must be between 0 and {MAX_BUDGET:,} (a larger budget is surely a typo), "
                              f"got {value!r}")
    elif _SHARE.search(name) and not 0 <= value <= 1:
        raise ConfigError(f"{key} must be between 0 and 1, got {value!r}")
    elif _UNIT.search(name) and not 0 <= value <= 1:
        raise ConfigError(f"{key} must be between 0 and 1, got {value!r}")
    elif _POSITIVE.search(name) and not value > 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")
    elif _NON_NEGATIVE.search(name) and not value >= 0:
        raise ConfigError(f"{key} must be 0 or more, got {value!r}")
    elif name == "dropout" and not 0 <= value < 1:
        raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
    elif name == "target" and not value >= -1:
        raise ConfigError(f"{key} must be a class index (0, 1, ...) or -1 for the task's default target, "
                          f"got {value!r}")


def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def unknown_field_message(where: str, key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{where} has no setting {key!r}{hint} (settings: {', '.join(names)})"


def build_config(cls, values: dict, where: str):
    """An instance of the dataclass ``cls`` from ``values`` (field -> value), checked as the docstring says."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = field_types(cls)
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(unknown_field_message(where, key, names))
        checked[key] = coerce(f"{where}.{key}", value, hints[key])
    try:
        config = cls(**checked)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from None
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            check_range(f"{where}.{f.name}", f.name, item)
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{where}: {err}") from None
    return config
