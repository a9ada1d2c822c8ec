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
from ...core import paths
from ..datasets import DatasetError, load_dataset
from ..pipeline.inputs import dataset_split
from ..pipeline.results import ResultsDB
from ..pipeline.settings import MAX_SEED, load_profile, parse_sets
from ..pipeline.stages import Env
from ..pipeline.store import ArtifactStore, sweep_stale_files


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
        except click.ClickException:  # a usage error: the command group says it in one line
            raise
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


def check_settings_reach(prof, used: dict[str, set[str]]) -> None:
    """Every attack/defense key of --set must take effect where this command runs (``Profile.check_reach``:
    otherwise a one-line error naming the method and its fields); a generic key that takes effect for some of
    the methods run and not others is said in one line on stderr."""
    for note in prof.check_reach(used):
        click.echo(f"defbench: {note}", err=True)


def open_env(prof, device: str, data_dir: str | None, verbose: bool = False) -> Env:
    """The artifact store, the results database, the data folder and the device, each checked; temporaries
    that killed processes left behind are swept. Call it once every setting has been checked: it creates
    DEFBENCH_HOME and the results database, and nothing else."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    picked = pick_device(device)
    home = check_home()
    with where(f"cannot open the results database {paths.results_db()}",
               "move the file away (it is not a defbench results database) or point DEFBENCH_HOME elsewhere"):
        db = ResultsDB(paths.results_db())
    store = ArtifactStore(paths.artifacts_dir())
    with where(f"cannot clean up temporaries under {home}"):
        store.sweep_temporaries()
        sweep_stale_files(paths.cache_dir())
    return Env(store=store, db=db, data_dir=paths.data_dir(data_dir or prof.data_dir or None), device=picked)


def check_home(write: bool = True) -> Path:
    """DEFBENCH_HOME, created if absent, that is a folder we can write a few kilobytes into (not a file, not
    read-only, not full); otherwise a one-line error. ``write=False`` only checks that it is (or can become)
    a folder, creating and writing nothing (for commands that may only read from it)."""
    home = paths.home()
    with where(f"cannot use DEFBENCH_HOME={home}", "point DEFBENCH_HOME at a writable folder with free space"):
        if home.exists() and not home.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        existing = home
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a folder")
        if not write:
            return home
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(bytes(4096))
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    return home


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


def check_datasets(prof, env_or_dir, pretrain: str, tasks: list[str], targets: dict | None = None,
                   clean_set: bool = True) -> None:
    """Load every dataset up front and check what the stages will need of it, so a missing or unusable one
    fails in one line before any training: images in every split (``load_dataset`` checks labels), at least
    two classes in a task's training split, no test class the probe never sees in training, the attack's
    target a class of the task with images in both splits, and a clean set of at least two images.
    ``targets``: task -> target class (or a set of them); ``env_or_dir``: an Env or the data folder."""
    data_dir = getattr(env_or_dir, "data_dir", env_or_dir)
    size = prof.encoder.image_size
    pre = load_dataset(pretrain, "pretrain", data_dir, size)
    if clean_set:
        n = max(1, round(prof.clean.fraction * len(pre)))
        n = min(n, prof.clean.max_images) if prof.clean.max_images else n
        if n < 2:
            raise DatasetError(f"{pretrain}: the defender's clean set would hold {n} image (clean.fraction "
                               f"{prof.clean.fraction:g} of {len(pre)} pre-training images"
                               + (f", capped at clean.max_images {prof.clean.max_images}" if prof.clean.max_images
                                  else "") + "); raise clean.fraction or use a larger pre-training set")
    cap = {"train": prof.evaluate.max_train, "test": prof.evaluate.max_test}
    for task in tasks:
        # what the probe sees: the splits capped at evaluate.max_train / max_test (a seeded random subset)
        train, test = (dataset_split(data_dir, task, split, size, cap[split], prof.seed) for split in cap)
        note = {split: f" (its evaluate.max_{split}={cap[split]} subset)" if cap[split] else "" for split in cap}
        seen, tested = set(train.labels.unique().tolist()), set(test.labels.unique().tolist())
        if len(seen) < 2:
            raise DatasetError(f"{task}: the training split{note['train']} holds a single class ({min(seen)}); a "
                               "downstream task needs at least two")
        unseen = sorted(tested - seen)
        if unseen:
            shown = ", ".join(map(str, unseen[:5])) + (" ..." if len(unseen) > 5 else "")
            raise DatasetError(f"{task}: test labels {shown} never occur in the training split{note['train']}, so "
                               "no probe can predict them; check the labels (or raise evaluate.max_train)")
        wanted = (targets or {}).get(task)
        for target in sorted({wanted} if isinstance(wanted, int) else set(wanted or ())):
            whole = {split: load_dataset(task, split, data_dir, size) for split in cap}  # the attack's view
            classes = max(whole["train"].num_classes, whole["test"].num_classes)
            if not 0 <= target < classes:
                raise UserError(f"target class {target} is not a class of {task} (classes 0..{classes - 1}); "
                                "set attack.target to one of them")
            if not bool((whole["train"].labels == target).any()):
                raise DatasetError(f"{task}: the training split has no image of the attack's target class "
                                   f"{target}; set attack.target to a class it has")
            if target not in tested:
                raise DatasetError(f"{task}: the test split{note['test']} has no image of the attack's target class "
                                   f"{target}; set attack.target to a class it has")
            if tested == {target}:
                raise DatasetError(f"{task}: every test image{note['test']} is of the target class {target}, so the "
                                   "attack success rate on the other classes is undefined")


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed every RNG and the results database accept (0 .. 2**63-1)."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{option} must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail now, not after hours of compute, when ``folder`` cannot be created or written."""
    with where(f"cannot write {what} into {folder}", "choose a writable folder"):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")


def names(text: str, option: str) -> list[str]:
    """A comma-separated list; an explicitly empty one (``--defenses ,``) is an error, not "everything"."""
    items = [n.strip() for n in text.split(",") if n.strip()]
    if text.strip() and not items:
        raise UserError(f"{option} {text!r} names nothing; give comma-separated names or leave the option out")
    return items
