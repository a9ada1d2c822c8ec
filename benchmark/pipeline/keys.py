"""Stage keys: canonical JSON, digests, and the code version of a stage.

A stage's code version hashes the *normalised source* of every project module
the stage's code uses: its root modules and, transitively, every ``defbench``
module they import (``import`` statements read from the source, so a helper
imported from another attack or defense counts). Normalised = the module's
syntax tree without docstrings, so comments, docstrings and formatting never
re-key an artifact, while any change of code does. Harness modules
(``defbench.benchmark.*``) are followed only when a stage names them as roots:
how results are stored or scheduled never changes what a stage computes.

Two things that are not code changes re-key nothing:

- the registration plumbing (:data:`NEUTRAL`: the registries and the registration functions) contributes a fixed
  hash instead of its source's, so a registration option or a clearer error message there re-keys nothing;
- a method renamed with ``formerly=("old",)`` (``register_attack`` / ``register_defense``) is hashed as it was
  registered under its first name, without that keyword, so its stages keep their keys and its rows
  (:func:`_undo_renames`; its stages keep that first name too, ``Component.key_name``).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

HARNESS = "defbench.benchmark"
# Registration plumbing: modules whose code never changes what a stage computes (registries, registration
# functions, the contract's containers; whatever they do to a setting shows in the stage's spec). Each contributes
# this fixed hash -- its source's hash when it was declared neutral, so that declaring it re-keyed nothing --
# instead of its source's; its imports are still followed. Nothing that computes may be added to them.
NEUTRAL = {"defbench.core.registry": "c06c2cffeda201bf", "defbench.attacks.base": "f2332269f702b9e8",
           "defbench.defenses.base": "3738f5b25d129faa"}
RENAMED = "formerly"  # the registration keyword of a renamed method: its earlier names, oldest first


def canonical_json(obj) -> str:
    """Stable JSON for hashing: sorted keys, dataclasses and tuples as plain structures."""
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON-able: {type(o).__name__}")
    return json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))


def digest(payload, length: int = 24) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:length]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _undo_renames(tree: ast.AST) -> ast.AST:
    """A registration call with ``formerly=("first", ...)`` as if it still registered ``"first"`` without that
    keyword: renaming a method is not a change of its code. (Modules without the keyword are untouched.)"""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        renamed = [k for k in node.keywords if k.arg == RENAMED]
        if not renamed:
            continue
        value = renamed[0].value
        names = value.elts if isinstance(value, (ast.Tuple, ast.List)) else [value]
        if names and isinstance(names[0], ast.Constant) and isinstance(names[0].value, str):
            node.args[0] = ast.Constant(names[0].value)
            node.keywords = [k for k in node.keywords if k.arg != RENAMED]
    return tree


def normalised_source_hash(source: str) -> str:
    """Hash of a module's syntax tree without docstrings (comments, docstrings and layout do not count) and with
    its methods' renames undone (:func:`_undo_renames`)."""
    tree = _undo_renames(_strip_docstrings(ast.parse(source)))
    normalised = ast.dump(tree, annotate_fields=False, include_attributes=False)
    return hashlib.sha256(normalised.encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def _module_info(name: str) -> tuple[str, tuple[str, ...]]:
    """(hash of the normalised source, the defbench modules it imports) of module ``name``."""
    spec = _spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return hashlib.sha256(name.encode()).hexdigest()[:16], ()
    source = Path(spec.origin).read_text()
    tree = ast.parse(source)
    is_package = spec.submodule_search_locations is not None
    package = name if is_package else name.rpartition(".")[0]
    imports: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            imports.add(base)
            for alias in node.names:  # `from . import x` / `from .pkg import module`
                candidate = f"{base}.{alias.name}"
                if _is_project(candidate) and _exists(candidate):
                    imports.add(candidate)
    return normalised_source_hash(source), tuple(sorted(i for i in imports if _is_project(i)))


def _is_project(name: str) -> bool:
    return name.split(".")[0] in ("defbench", "defbench_plugins")


def _spec(name: str):
    """The module's spec; modules loaded from a file path ($DEFBENCH_PLUGINS) are found in sys.modules."""
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:
        return loaded.__spec__
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


@lru_cache(maxsize=None)
def _exists(name: str) -> bool:
    return _spec(name) is not None


def module_closure(*roots: str) -> dict[str, str]:
    """module name -> normalised-source hash, for ``roots`` and every project module they import, transitively
    (harness modules only as roots)."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or not _exists(name):
            continue
        source_hash, imports = _module_info(name)
        seen[name] = NEUTRAL.get(name, source_hash)
        todo.extend(i for i in imports if i not in seen and not (i.startswith(HARNESS) and i not in roots))
    return seen


def code_version(*roots: str) -> str:
    """One hash of :func:`module_closure`: changes exactly when code a stage runs changes."""
    return digest(sorted(module_closure(*roots).items()), 12)
