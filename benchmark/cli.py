"""The ``defbench`` command line."""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import click

from ..attacks import ATTACKS
from ..defenses import DEFENSES
from ..encoders import CheckpointError, pick_device
from ..encoders.registry import RegistryError
from ..reports.tables import ReportError
from . import paths
from .datasets import DATASETS, DatasetError, load_dataset
from .plan import downstream_tasks, planned_evaluation_key
from .profiles import ConfigError, builtin_profiles, load_profile, parse_sets, valid_keys
from .results import ResultsDB
from .store import ArtifactStore
from .stages import Env

USER_ERRORS = (ConfigError, DatasetError, RegistryError, CheckpointError, ReportError)


def _fail(message: str) -> None:
    click.echo(f"defbench: error: {message}", err=True)
    sys.exit(2)


def friendly_errors(fn):
    """Bad input ends in one line that says what to do, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            _fail(str(err))
        except ValueError as err:  # device names, trigger geometry, ...
            _fail(str(err))
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


def make_profile_env(profile, sets, seed, device, data_dir, verbose):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    overrides = parse_sets(sets)
    if seed is not None:
        overrides["seed"] = seed
    prof = load_profile(profile, overrides)
    env = Env(store=ArtifactStore(paths.artifacts_dir()), db=ResultsDB(paths.results_db()),
              data_dir=paths.data_dir(data_dir or prof.data_dir or None), device=pick_device(device))
    return prof, env


@click.group()
@click.version_option(package_name="defbench")
def main():
    """defbench: backdoor defenses for self-supervised image encoders, compared on one footing."""


@main.command()
@click.option("--attack", default="badencoder", show_default=True)
@click.option("--defense", default="ft", show_default=True)
@click.option("--pretrain", default=None, help="pre-training set (default: the profile's first)")
@click.option("--downstream", multiple=True, help="downstream task (repeatable; default: the pre-training set's family)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
@profile_options
@friendly_errors
def run(attack, defense, pretrain, downstream, as_json, profile, sets, seed, device, data_dir, verbose):
    """Run one benchmark cell: clean, undefended and defended ACC/ASR on each downstream task."""
    from .cell import format_cell_table, run_cell
    prof, env = make_profile_env(profile, sets, seed, device, data_dir, verbose)
    ATTACKS.get(attack), DEFENSES.get(defense)
    pretrain = pretrain or prof.grid.pretrain[0]
    check_datasets(prof, env, pretrain, downstream_tasks(pretrain, downstream))
    results, outcomes = run_cell(prof, env, attack, defense, pretrain, list(downstream))
    failed = [o for o in outcomes if o.status == "failed"]
    if as_json:
        click.echo(json.dumps({"profile": prof.name, "device": str(env.device), "seed": prof.seed,
                               "results": results,
                               "failed": [{"stage": o.stage.label, "error": o.error} for o in failed]},
                              indent=1, default=_json_number))
    else:
        click.echo(format_cell_table(results, prof, attack, defense, pretrain, outcomes))
    if failed:
        for o in failed:
            click.echo(f"defbench: stage failed: {o.stage.label}: {o.error}", err=True)
        sys.exit(1)


def check_datasets(prof, env, pretrain: str, tasks: list[str]) -> None:
    """Load every dataset up front so a missing one fails in one line before any training."""
    load_dataset(pretrain, "pretrain", env.data_dir, prof.encoder.image_size)
    for task in tasks:
        for split in ("train", "test"):
            load_dataset(task, split, env.data_dir, prof.encoder.image_size)


def _json_number(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


@main.command()
@click.option("--attacks", default="", help="comma-separated attacks (default: the profile's grid.attacks)")
@click.option("--defenses", default="", help="comma-separated defenses (default: the profile's grid.defenses)")
@click.option("--pretrain", "pretrain_sets", default="", help="comma-separated pre-training sets")
@click.option("--downstream", default="", help="comma-separated tasks (default: each pre-training set's family)")
@click.option("--executor", type=click.Choice(["local", "submitit", "submitit-local"]), default="local",
              show_default=True, help="local processes, or submitit (SLURM when available)")
@click.option("--workers", type=int, default=1, show_default=True,
              help="parallel stages (local: processes, one per GPU when CUDA is used; submitit: jobs in flight)")
@profile_options
@friendly_errors
def grid(attacks, defenses, pretrain_sets, downstream, executor, workers, profile, sets, seed, device, data_dir,
         verbose):
    """Run the attack x defense x pre-training x task grid; finished stages are skipped."""
    from .grid import expand_grid, grid_spec
    prof, env = make_profile_env(profile, sets, seed, device, data_dir, verbose)
    spec = grid_spec(prof, _names(attacks), _names(defenses), _names(pretrain_sets), _names(downstream))
    for name in spec.attacks:
        ATTACKS.get(name)
    for name in spec.defenses:
        DEFENSES.get(name)
    for pretrain in spec.pretrain:
        check_datasets(prof, env, pretrain, downstream_tasks(pretrain, spec.downstream))
    cells = expand_grid(prof, spec)
    env.store.sweep_temporaries()
    started = time.perf_counter()
    outcomes = run_grid_from_cli(list(cells.values()), env, executor, workers, prof)
    click.echo(format_summary(outcomes, time.perf_counter() - started, env.store))
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


def format_summary(outcomes, seconds: float, store=None) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "cached", "failed", "skipped")}
    lines = [f"grid: {len(outcomes)} stages in {seconds:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    by_kind: dict[str, list[float]] = {}
    for o in outcomes:
        if o.status == "ran":
            by_kind.setdefault(o.stage.kind, []).append(o.seconds)
    for kind, times in by_kind.items():
        lines.append(f"  ran {len(times):3d} {kind:<8} stages, {sum(times):8.0f} s")
    if store is not None and counts["cached"]:
        earlier = sum(_recorded_seconds(store, o.stage) for o in outcomes if o.status == "cached")
        total = earlier + sum(sum(t) for t in by_kind.values())
        lines.append(f"  the {counts['cached']} cached stages took {earlier:.0f} s when they ran; "
                     f"all {counts['ran'] + counts['cached']} finished stages: {total:.0f} s ({total / 3600:.1f} h) "
                     "of compute")
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"  FAILED  {o.stage.label}: {o.error}")
    skipped = counts["skipped"]
    if skipped:
        lines.append(f"  {skipped} stages skipped because an input failed")
    return "\n".join(lines)


def _recorded_seconds(store, stage) -> float:
    """The compute time a finished stage's artifact recorded (0 where the record is unreadable)."""
    try:
        return float(store.read_meta(stage.kind, stage.key).get("seconds", 0.0))
    except (OSError, ValueError, TypeError):
        return 0.0


@main.command()
@click.argument("name", type=click.Choice(["table1", "cost"]))
@click.option("--profile", default="tiny", show_default=True)
@click.option("--seed", type=int, default=None, help="rows of this seed (default: the profile's)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="rows computed with these overrides")
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "csv"]), default="md", show_default=True)
@click.option("--asr-convention", type=click.Choice(["all", "exclude-target"]), default="all", show_default=True)
@click.option("--compare-paper", is_flag=True, help="show the paper's published value beside each cell")
@click.option("--defenses", default="", help="comma-separated columns (default: the profile's grid + any others found)")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write here instead of stdout")
@friendly_errors
def table(name, profile, seed, sets, fmt, asr_convention, compare_paper, defenses, output):
    """Render Table I (or the defense cost table) from the results database."""
    from ..reports import tables
    overrides = parse_sets(sets)
    if seed is not None:  # as `grid --seed` records it
        overrides["seed"] = seed
    prof = load_profile(profile, overrides)
    rows, stale = tables.read_evaluations(paths.results_db(), prof.name, prof.seed, prof.overrides,
                                          functools.partial(planned_evaluation_key, prof))
    notes = [tables.stale_note(stale, prof.name)] if stale else []
    if name == "cost":
        text = tables.render_cost(tables.cost_table(rows), fmt, notes)
    else:
        columns = _names(defenses) or list(prof.grid.defenses) + sorted(
            set(rows[rows.role == "defended"].defense) - set(prof.grid.defenses))
        frame, table_notes = tables.table1(rows, columns, asr_convention, compare_paper)
        title = f"Table I, profile {prof.name}, seed {prof.seed}: ACC / ASR (%)"
        text = tables.render(frame, columns, fmt, table_notes + notes, title)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=not text.endswith("\n"))  # CSV/markdown end with their own newline


@main.command()
@click.argument("name")
@click.option("--executor", type=click.Choice(["local", "submitit", "submitit-local"]), default="local",
              show_default=True, help="as for `defbench grid`")
@click.option("--workers", type=int, default=1, show_default=True, help="parallel stages")
@click.option("--no-run", is_flag=True, help="only render from the results database (fail if results are missing)")
@click.option("--asr-convention", type=click.Choice(["all", "exclude-target"]), default="all", show_default=True)
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/out"),
              show_default=True, help="where the figures, tables and markdown go")
@profile_options
@friendly_errors
def report(name, executor, workers, no_run, asr_convention, out_dir, profile, sets, seed, device, data_dir,
           verbose):
    """Run one of the paper's studies (or `all`) through the grid runner and render its figure and table.

    Studies: components, lambdas, trigger-size, clean-ratio, poison-ratio, clean-encoders, mi-layers,
    adaptive, cost. `all` also writes OUT_DIR/ablations.md with every figure and its numbers."""
    from ..reports import ablations
    from .studies import STUDIES, plan_study
    prof, env = make_profile_env(profile, sets, seed, device, data_dir, verbose)
    names = list(STUDIES) if name == "all" else [name]
    plans = [plan_study(n, profile, prof.overrides) for n in names]
    failures: dict[str, str] = {}
    if not no_run:
        for plan in plans:
            check_datasets(prof, env, plan.pretrain, plan.tasks)
        env.store.sweep_temporaries()
        started = time.perf_counter()
        stages = [s for plan in plans for s in plan.stages]
        outcomes = run_grid_from_cli(stages, env, executor, workers, prof)
        click.echo(format_summary(outcomes, time.perf_counter() - started, env.store))
    sections = []
    for plan in plans:
        study = plan.study
        try:
            built = ablations.build(study.name, study.title, study.paper, paths.results_db(),
                                    plan.expected(plan.evaluations), plan.expected(plan.measurements),
                                    prof.name, prof.seed, asr_convention)
        except ReportError as err:
            failures[study.name] = str(err)
            click.echo(f"defbench: {err}", err=True)  # the message names the study
            continue
        written = ablations.write(built, out_dir)
        sections.append(ablations.section(built))
        click.echo(f"report {study.name}: wrote {written['png']}, {written['svg']}, {written['md']}")
    if name == "all":
        header = (f"# The paper's studies, profile {prof.name}, seed {prof.seed}\n\n"
                  f"Rendered by `defbench report all --profile {prof.name}` from the results database; "
                  f"ASR convention: {ablations.ASR_NOTE[asr_convention]}. All numbers in %, times in seconds.")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "ablations.md").write_text(ablations.page(sections, failures, header))
        click.echo(f"wrote {out_dir / 'ablations.md'}")
    if failures:
        sys.exit(1)


def run_grid_from_cli(stages, env, executor, workers, prof):
    from .grid import run_grid
    return run_grid(stages, env, executor, workers,
                    slurm={"partition": prof.grid.slurm_partition, "gpus": prof.grid.slurm_gpus,
                           "cpus": prof.grid.slurm_cpus, "timeout_min": prof.grid.slurm_timeout_min})


@main.group()
def golden():
    """The regression subset (`make ci-small`): check against, or rewrite, tests/golden/ci-small.csv."""


def _golden_options(fn):
    fn = click.option("--file", "golden_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="golden CSV (default: tests/golden/ci-small.csv)")(fn)
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(fn)
    fn = click.option("--workers", type=int, default=1, show_default=True, help="parallel stages")(fn)
    return fn


@golden.command(name="check")
@_golden_options
@click.option("--all", "show_all", is_flag=True, help="list every value, not only those that moved")
@friendly_errors
def golden_check(golden_file, device, workers, show_all):
    """Run the subset on the ci profile at the golden seed and diff every ACC/ASR against the golden file."""
    from . import golden as g
    path = golden_file or g.DEFAULT_FILE
    expected = g.read_golden(path)
    prof, env = make_profile_env("ci", (), g.golden_seed(path), device, None, False)
    diff = g.compare(g.run_subset(prof, env, workers), expected)
    click.echo(g.format_diff(diff, show_all))
    if (diff.status != "ok").any():
        sys.exit(1)


@golden.command(name="update")
@_golden_options
@click.option("--seeds", default="0,1,2", show_default=True,
              help="comma-separated seeds: the first gives the values, all of them the tolerances")
@friendly_errors
def golden_update(golden_file, device, workers, seeds):
    """Deliberately rewrite the golden file (run the subset for every seed; tolerances from their spread)."""
    from . import golden as g
    seed_list = [int(s) for s in _names(seeds)]
    if not seed_list:
        raise ValueError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    runs = []
    for seed in seed_list:
        prof, env = make_profile_env("ci", (), seed, device, None, False)
        click.echo(f"golden: running the subset with seed {seed}")
        runs.append(g.run_subset(prof, env, workers))
    path = golden_file or g.DEFAULT_FILE
    g.write_golden(g.golden_frame(runs), path, seed_list, str(env.device))
    click.echo(f"wrote {path} ({len(runs[0])} cells x ACC/ASR, seeds {seed_list})")


@main.command(name="list")
@click.argument("what", type=click.Choice(["attacks", "defenses", "datasets", "profiles", "settings"]),
                default="defenses")
def list_(what):
    """List the registered attacks, defenses, datasets, profiles or settings."""
    if what in ("attacks", "defenses"):
        registry = ATTACKS if what == "attacks" else DEFENSES
        for comp in registry.items():
            click.echo(f"{comp.name:<12} {comp.summary}")
    elif what == "datasets":
        for name, spec in sorted(DATASETS.items()):
            shown = f"{name}:PATH" if name in ("npz", "folder") else name
            click.echo(f"{shown:<16} {spec.description}")
    elif what == "profiles":
        for name in builtin_profiles():
            click.echo(f"{name:<8} {load_profile(name).description}")
    else:
        for key in valid_keys():
            click.echo(key)


from .detect import detect  # noqa: E402  (detect uses this module's error handling)
main.add_command(detect)

if __name__ == "__main__":  # pragma: no cover
    main()
