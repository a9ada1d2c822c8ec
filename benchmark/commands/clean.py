"""``defbench clean --stale``: remove what killed runs left behind in DEFBENCH_HOME.

Stale = temporaries whose process is gone (half-written artifact folders of
this host, ``.NAME.PID.tmp`` files of the dataset caches) and artifacts that
cannot be read back (a ``meta.json`` or a ``.pt`` file cut short, e.g. by a
full disk). Finished, readable artifacts are never touched, whatever code
version made them: the next run recomputes exactly what was removed.
"""
from __future__ import annotations

import shutil

import click

from ...core import UserError
from ...core import paths
from ..pipeline.store import ArtifactStore, stale_files
from .common import friendly_errors, where


@click.command()
@click.option("--stale", is_flag=True, help="remove temporaries of killed runs and artifacts cut short")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
@friendly_errors
def clean(stale, dry_run):
    """Remove stale temporaries and damaged artifacts from DEFBENCH_HOME (finished artifacts stay)."""
    if not stale:
        raise UserError("say what to clean: --stale (temporaries of killed runs and damaged artifacts)")
    home = paths.home()
    if not home.is_dir():
        click.echo(f"nothing to clean: {home} is not a folder")
        return
    store = ArtifactStore(paths.artifacts_dir())
    with where(f"cannot clean {home}"):
        found = {"temporary folders": store.stale_temporaries(), "temporary files": stale_files(home),
                 "damaged artifacts": store.damaged()}
        for items in found.values():
            for path in items:
                click.echo(f"{'would remove' if dry_run else 'removing'} {path}")
                if dry_run:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} " + ", ".join(f"{len(items)} {what}" for what, items in found.items()) + f" under {home}")
