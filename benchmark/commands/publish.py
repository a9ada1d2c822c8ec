"""``defbench report publish`` and ``defbench report ranks``: result pages with paired statistics.

``publish`` renders docs-ready pages from a committed snapshot of result rows (``OUT/rows.csv``) and nothing
else; ``--update`` first adds the results database's current rows to that snapshot. ``ranks`` writes the
same pages straight from the results database into OUT (its own snapshot beside them).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import pandas as pd

from ...reports import publish as pages
from ...reports.tables import ReportError
from ..analysis.golden import cpu_kind
from ..pipeline.settings import load_profile
from .common import where
from .table import open_results, planned_key


def current_rows(rows: pd.DataFrame, profile: str) -> tuple[pd.DataFrame, int]:
    """The rows today's code and settings would produce (their eval key is the planned one), and how many
    were left out as stale. Each row is planned with its own recorded overrides (``--set``, seed)."""
    keep = []
    for overrides, group in rows.groupby("overrides", dropna=False):
        try:
            prof = load_profile(profile, json.loads(overrides) if isinstance(overrides, str) else {})
        except (ValueError, TypeError):  # settings today's code no longer accepts: every row is stale
            continue
        cache: dict[tuple, str | None] = {}
        for index, row in group.iterrows():
            cell = (row.attack, row.defense, row.role, row.pretrain, row.downstream)
            if cell not in cache:
                try:
                    cache[cell] = planned_key(prof, {}, *cell)
                except Exception:  # an unregistered method or a dataset that is gone: cannot be current
                    cache[cell] = None
            if row.eval_key == cache[cell]:
                keep.append(index)
    return rows.loc[keep], len(rows) - len(keep)


def database_rows(profile: str, seeds: list[int] | None) -> pd.DataFrame:
    db = open_results(profile)
    with where(f"cannot read the results database {db.path}"):
        rows = db.evaluations(profile=profile)
    rows = pages.snapshot_rows(rows, cpu_kind())
    if seeds:
        rows = rows[rows.seed.isin(seeds)]
    current, stale = current_rows(rows, profile)
    if stale:
        click.echo(f"left out {stale} row(s) of an older code version or settings", err=True)
    if current.empty:
        raise ReportError(f"no current Table I rows for profile {profile} in {db.path}; run `defbench grid "
                          f"--profile {profile}` first")
    return current


def publish_pages(profile: str, out_dir: Path, update: bool, seeds: list[int] | None) -> None:
    """``report publish``: (with ``update``: merge the database's rows into OUT/rows.csv, then) render OUT."""
    snapshot = out_dir / "rows.csv"
    if update:
        old = pages.read_snapshot(snapshot) if snapshot.is_file() else None
        merged = pages.merge_snapshot(old, database_rows(profile, seeds))
        with where(f"cannot write the snapshot {snapshot}"):
            pages.write_snapshot(merged, snapshot)
        click.echo(f"snapshot {snapshot}: {len(merged)} rows ({len(merged) - (0 if old is None else len(old))} new)")
    with where(f"cannot write the pages into {out_dir}"):
        written = pages.publish(snapshot, out_dir)
    click.echo("wrote " + ", ".join(str(p) for p in written))


def rank_pages(profile: str, out_dir: Path, seeds: list[int] | None) -> None:
    """``report ranks``: the pages of every row group in the database, into OUT (with the rows they used)."""
    rows = pages.merge_snapshot(None, database_rows(profile, seeds))
    with where(f"cannot write into {out_dir}"):
        pages.write_snapshot(rows, out_dir / "rows.csv")
        written = pages.publish(out_dir / "rows.csv", out_dir)
    click.echo("wrote " + ", ".join(str(p) for p in written))
