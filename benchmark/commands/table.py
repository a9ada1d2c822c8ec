"""``defbench table``: Table I or the defense cost table, rendered from the results database."""
from __future__ import annotations

import functools
from pathlib import Path

import click
import pandas as pd

from ...attacks import ATTACKS
from ...core import UserError
from ...defenses import DEFENSES
from ...reports import tables
from ...core import paths
from ..datasets import FAMILIES
from ..pipeline.external import Suspect
from ..pipeline.plan import expand_grid, grid_spec, planned_evaluation_key, planned_suspect_key
from ..pipeline.results import ResultsDB
from ..pipeline.scheduler import diverged_stages
from ..pipeline.settings import parse_sets
from ..pipeline.store import ArtifactStore
from .common import check_writable_folder, friendly_errors, names, profile_from_options, where


def open_results(profile: str, fill: str = "") -> ResultsDB:
    """The results database, read-only (works on a read-only copy; never creates one).

    `fill` is the command that would compute the missing results (default: the profile's grid)."""
    path = paths.results_db()
    if not path.is_file():
        fill = fill or f"defbench grid --profile {profile}"
        raise tables.ReportError(f"no results database at {path}; run `{fill}` first")
    with where(f"cannot read the results database {path}",
               "is it a defbench results database? move it away or point DEFBENCH_HOME elsewhere"):
        return ResultsDB(path, readonly=True)


def write_output(text: str, output: str | None) -> None:
    if not output:
        click.echo(text, nl=not text.endswith("\n"))  # CSV/markdown end with their own newline
        return
    with where(f"cannot write {output}", "choose a path in a writable folder"):
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    click.echo(f"wrote {output}")


TABLE1_ROLES = ("clean", "undefended", "defended")


def suspects_in_rows(rows) -> dict[str, Suspect]:
    """The external encoders (``defbench grid --suspect`` / ``[suspects]``) behind ``rows``, by name: the newest
    record of each (a name given to another file since then makes the older rows stale)."""
    found: dict[str, Suspect] = {}
    for _, row in rows.sort_values("created_at").iterrows():
        record = (tables.json_field(row.extra) or {}).get("suspect")
        if record:
            try:
                found[row.attack] = Suspect.from_record(record)
            except (KeyError, TypeError):
                continue
    return found


def planned_key(prof, suspects: dict[str, Suspect], attack, defense, role, pretrain, downstream) -> str | None:
    """The key today's code gives a Table I row: a built-in cell's, or an external suspect's (from its record)."""
    if attack in suspects:
        return planned_suspect_key(prof, suspects[attack], defense, role, pretrain, downstream)
    return planned_evaluation_key(prof, attack, defense, role, pretrain, downstream)


@click.command()
@click.argument("name", type=click.Choice(["table1", "cost"]))
@click.option("--profile", default="tiny", show_default=True)
@click.option("--seed", type=int, default=None, help="rows of this seed (default: the profile's)")
@click.option("--seeds", default="", metavar="0,1,2",
              help="rows of each of these seeds: cells show mean ± sd, and a best only where it is separated")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="rows computed with these overrides")
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "csv"]), default="md", show_default=True)
@click.option("--asr-convention", type=click.Choice(["all", "exclude-target"]), default="all", show_default=True)
@click.option("--compare-paper", is_flag=True, help="show the paper's published value beside each cell")
@click.option("--defenses", default="", help="comma-separated columns (default: the profile's grid + any others found)")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write here instead of stdout")
@friendly_errors
def table(name, profile, seed, seeds, sets, fmt, asr_convention, compare_paper, defenses, output):
    """Render Table I (or the defense cost table) from the results database."""
    profiles = seed_profiles(profile, sets, seed, seeds)
    prof = profiles[0]
    chosen = names(defenses, "--defenses")
    if output:
        check_writable_folder(Path(output).parent, "the table")
    db = open_results(prof.name)
    with where(f"cannot read the results database {db.path}"):
        found = db.evaluations(profile=prof.name)
    found = found[found.role.isin(TABLE1_ROLES)]  # not `defbench evaluate`'s rows, nor a study's other roles
    suspects = suspects_in_rows(found)
    per_seed, stale = [], 0
    for p in profiles:
        rows, left_out = tables.select_rows(found, p.seed, functools.partial(planned_key, p, suspects),
                                            p.overrides_for)
        per_seed.append(rows)
        stale += left_out
    every = pd.concat(per_seed, ignore_index=True)
    for defense in chosen:
        if defense not in DEFENSES and defense not in set(every.defense):
            raise UserError(f"--defenses: {defense!r} is neither a registered defense nor in the results; "
                            f"known: {', '.join(DEFENSES.names())}")
    notes = [tables.stale_note(stale, prof.name)] if stale else []
    seed_text = ", ".join(str(p.seed) for p in profiles)
    if name == "cost":
        text = tables.render_cost(tables.cost_table(every), fmt, notes)
    else:
        columns = chosen or list(prof.grid.defenses) + sorted(
            set(every[every.role == "defended"].defense) - set(prof.grid.defenses))
        frames, table_notes = [], []
        measured = [(p, rows) for p, rows in zip(profiles, per_seed) if not rows[rows.role != "clean"].empty]
        for _, rows in measured or list(zip(profiles, per_seed))[:1]:  # none measured: table1 says so
            frame, frame_notes = tables.table1(rows, columns, asr_convention, compare_paper)
            frames.append(frame)
            # the † note is said below, for the combined table
            table_notes += [n for n in frame_notes if n not in table_notes and not n.startswith("†")]
        measured_seeds = {p.seed for p, _ in measured}
        unmeasured = [str(p.seed) for p in profiles if p.seed not in measured_seeds]
        if unmeasured:
            table_notes.append(f"seed(s) {', '.join(unmeasured)}: no rows in the database yet "
                               f"(`defbench grid --profile {prof.name} --seeds ...` computes them).")
        mean, sd = tables.combine_seeds(frames)
        table_notes += [tables.partial_average_note(attack)
                        for attack in mean[mean[("downstream", "")] == "†"][("attack", "")]]
        table_notes += [f"external encoder {s.describe()}" for name, s in sorted(suspects.items())
                        if name in set(every.attack)]
        table_notes += diverged_notes(profiles, sorted(set(prof.grid.attacks) | set(every.attack)), columns,
                                      table_tasks(prof.grid.pretrain, every))
        title = f"Table I, profile {prof.name}, seed{'s' if len(profiles) > 1 else ''} {seed_text}: ACC / ASR (%)"
        text = tables.render(mean, columns, fmt, table_notes + notes, title, sd, len(frames), per_seed=frames)
    write_output(text, output)


def table_tasks(grid_pretrain, rows: pd.DataFrame) -> dict[str, list[str]]:
    """Pre-training set -> the downstream tasks a Table I may show for it: its family's (a built-in set) and
    those of its rows (a set named by path has no family: only its rows')."""
    tasks: dict[str, set[str]] = {}
    for pretrain in [*grid_pretrain, *rows.pretrain]:
        tasks.setdefault(pretrain, {task for task, _ in FAMILIES.get(pretrain, [])})
    for pretrain, task in zip(rows.pretrain, rows.downstream):
        tasks[pretrain].add(task)
    return {pretrain: sorted(found) for pretrain, found in tasks.items() if found}


def diverged_notes(profiles: list, attacks: list[str], columns: list[str],
                   tasks: dict[str, list[str]]) -> list[str]:
    """One note per (defense column, attack, pre-training set, seed) whose cells have no row because training
    diverged (the store's records; a cell of a diverged pre-training or attack names every column it
    feeds): shown as missing, and said to be a result, not work left to do."""
    store = ArtifactStore(paths.artifacts_dir())
    chosen = dict(attacks=[a for a in attacks if a in ATTACKS] or ["none"],
                  defenses=[d for d in columns if d in DEFENSES])
    found: dict[tuple, list[str]] = {}
    for p in profiles:
        cells = {}
        for pretrain, downstream in tasks.items():
            try:
                cells.update(expand_grid(p, grid_spec(p, **chosen, pretrain=[pretrain], downstream=downstream)))
            except UserError:  # a set named by a path that is gone: its rows render; no note can be planned
                continue
        hit = diverged_stages(list(cells.values()), store)
        for (attack, column, pretrain, task), stage in cells.items():
            if stage.key in hit and column != "clean":
                found.setdefault((column, attack, pretrain, p.seed), []).append(task)
    return [f"training diverged (NaN or inf; shown as {tables.MISSING}, not to be recomputed): {column} on "
            f"{attack} / {pretrain} -> {', '.join(lost)}, seed {seed}"
            for (column, attack, pretrain, seed), lost in found.items()]


def seed_profiles(profile: str, sets, seed: int | None, seeds: str) -> list:
    """The profile once per seed of ``--seeds`` (or once, with ``--seed`` or the profile's own seed)."""
    chosen = names(seeds, "--seeds")
    if chosen and seed is not None:
        raise UserError("give --seed or --seeds, not both")
    try:
        seed_list = [int(s) for s in chosen] or [seed]
    except ValueError:
        raise UserError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    if len(set(seed_list)) != len(seed_list):
        raise UserError(f"--seeds names a seed twice: {seeds!r}")
    return [profile_from_options(profile, sets, s) for s in seed_list]


__all__ = ["table", "open_results", "write_output", "parse_sets", "seed_profiles"]
