"""What every command shares: one-line errors, the profile options, the environment, up-front checks.

Errors are handled by *where* they come from, not by a list of exception
types: every deliberate error of the project is a :class:`~defbench.core.UserError`
(printed as its one line); an ``OSError``/``sqlite3.Error`` raised while the
state directory, the store or the database is being opened is re-said as one
line naming the path (:func:`where`); anything else is a bug, said in one line
with the file its traceback was written to.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from ...core import UserError
from ...encoders import pick_device
from .. import paths
from ..datasets import load_dataset
from ..pipeline.results import ResultsDB
from ..pipeline.settings import load_profile, parse_sets
from ..pipeline.stages import Env
from ..pipeline.store import ArtifactStore


def fail(message: str) -> None:
    click.echo(f"defbench: error: {' '.join(str(message).split())}", err=True)
    sys.exit(2)


@contextlib.contextmanager
def where(what: str, hint: str = ""):
    """Re-say an OSError or SQLite error raised while doing ``what`` as a one-line UserError."""
    try:
        yield
    except (OSError, sqlite3.Error) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"{what}: {reason}" + (f"; {hint}" if hint else "")) from None


def _log_traceback() -> Path | None:
    text = traceback.format_exc()
    for folder in (paths.home() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"defbench-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def friendly_errors(fn):
    """Bad input ends in one line that says what to do, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            fail(str(err))
        except KeyboardInterrupt:
            fail("interrupted; finished stages are kept, rerun the same command to resume")
        except Exception as err:  # a bug: one line here, the traceback in a file
            log = _log_traceback()
            kept = f"; traceback in {log}" if log else ""
            fail(f"unexpected {type(err).__name__} in {fn.__name__}: {err}{kept} (please report it)")
    return wrapper


def profile_options(fn):
    options = [
        click.option("--profile", default="tiny", show_default=True,
                     help="paper, tiny, ci, or a path to a .toml profile"),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="override a setting, e.g. --set defense.lr=1e-3 (repeatable)"),
        click.option("--seed", type=int, default=None, help="seed for every stage (default: the profile's)"),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N"),
        click.option("--data-dir", default=None, help="real datasets live here (default: $DEFBENCH_DATA)"),
        click.option("-v", "--verbose", is_flag=True, help="log each stage"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def profile_from_options(profile: str, sets, seed: int | None):
    overrides = parse_sets(sets)
    if seed is not None:
        overrides["seed"] = seed
    return load_profile(profile, overrides)


def open_env(prof, device: str, data_dir: str | None, verbose: bool = False) -> Env:
    """The artifact store, the results database, the data folder and the device, each checked."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    home = paths.home()
    with where(f"cannot use DEFBENCH_HOME={home}", "point DEFBENCH_HOME at a writable folder"):
        if home.exists() and not home.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        (home / "artifacts").mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    with where(f"cannot open the results database {paths.results_db()}",
               "move the file away (it is not a defbench results database) or point DEFBENCH_HOME elsewhere"):
        db = ResultsDB(paths.results_db())
    return Env(store=ArtifactStore(paths.artifacts_dir()), db=db,
               data_dir=paths.data_dir(data_dir or prof.data_dir or None), device=pick_device(device))


def _three_floats(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise click.BadParameter(f"expects three comma-separated numbers (R,G,B), got {value!r}")
    return numbers


def encoder_options(fn):
    """--image-size/--mean/--std: how to read a checkpoint that does not record them (the file's own values win
    otherwise: a flag given here overrides the file)."""
    options = [
        click.option("--image-size", type=click.IntRange(min=8), default=None,
                     help="input size of the encoder (default: the file's, else 32 for CIFAR-stem layouts, 224 for "
                          "torchvision's)"),
        click.option("--mean", default=None, callback=_three_floats, metavar="R,G,B",
                     help="normalisation mean (default: the file's, else CIFAR-10's or ImageNet's by layout)"),
        click.option("--std", default=None, callback=_three_floats, metavar="R,G,B", help="normalisation std"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def format_value(value) -> str:
    """A recorded value on one line: numbers to 4 significant digits, long lists summarised."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        if len(value) <= 8:
            return "[" + ", ".join(format_value(v) for v in value) + "]"
        return f"{len(value)} values: {format_value(value[0])} ... {format_value(value[-1])}"
    return str(value)


def make_profile_env(profile, sets, seed, device, data_dir, verbose):
    prof = profile_from_options(profile, sets, seed)
    return prof, open_env(prof, device, data_dir, verbose)


def check_datasets(prof, env: Env, pretrain: str, tasks: list[str], targets: dict[str, int] | None = None) -> None:
    """Load every dataset up front so a missing or unusable one fails in one line before any training."""
    load_dataset(pretrain, "pretrain", env.data_dir, prof.encoder.image_size)
    for task in tasks:
        train = load_dataset(task, "train", env.data_dir, prof.encoder.image_size)
        test = load_dataset(task, "test", env.data_dir, prof.encoder.image_size)
        target = (targets or {}).get(task)
        if target is not None:
            classes = max(train.num_classes, test.num_classes)
            if not 0 <= target < classes:
                raise UserError(f"target class {target} is not a class of {task} (classes 0..{classes - 1}); "
                                "set attack.target to one of them")


def names(text: str, option: str) -> list[str]:
    """A comma-separated list; an explicitly empty one (``--defenses ,``) is an error, not "everything"."""
    items = [n.strip() for n in text.split(",") if n.strip()]
    if text.strip() and not items:
        raise UserError(f"{option} {text!r} names nothing; give comma-separated names or leave the option out")
    return items
