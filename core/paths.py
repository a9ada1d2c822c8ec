"""Where defbench keeps its state.

``DEFBENCH_HOME`` (default ``~/.cache/defbench``, or ``$XDG_CACHE_HOME/defbench``)
holds the artifact store, the results database and generated datasets.
``DEFBENCH_DATA`` (default ``$DEFBENCH_HOME/data``) is where real datasets live.
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("DEFBENCH_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "defbench"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get("DEFBENCH_DATA")
    return Path(env).expanduser() if env else home() / "data"


def cache_dir() -> Path:
    """Decoded / generated datasets, safe to delete."""
    return home() / "cache"


def results_db() -> Path:
    return home() / "results.sqlite"


def artifacts_dir() -> Path:
    return home() / "artifacts"
