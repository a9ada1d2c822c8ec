"""``defbench grid``: the attack x defense x pre-training x task grid of Table I, cached and resumable."""
from __future__ import annotations

import os
import sys
import time

import click

from ...attacks import ATTACKS
from ...core import UserError
from ...defenses import DEFENSES, on_transformers
from ..pipeline.scheduler import run_grid
from ...encoders.tower_checkpoints import TOWER_LAYOUTS
from ..pipeline import zoo
from ..pipeline.external import parse_suspect, profile_suspects, resolve_suspect
from ..pipeline.plan import components_used, expand_grid, grid_spec
from .common import check_datasets, check_settings_reach, friendly_errors, names, open_env, profile_options


def executor_options(fn):
    fn = click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                      help="parallel stages (local: processes, one per GPU when CUDA is used; submitit: jobs in "
                           "flight)")(fn)
    fn = click.option("--executor", type=click.Choice(["local", "submitit", "submitit-local"]), default="local",
                      show_default=True, help="local processes, or submitit (SLURM when available)")(fn)
    return fn


@click.command()
@click.option("--attacks", default="", help="comma-separated attacks (default: the profile's grid.attacks; none: only "
                                            "the --suspect encoders)")
@click.option("--defenses", default="", help="comma-separated defenses (default: the profile's grid.defenses)")
@click.option("--pretrain", "pretrain_sets", default="", help="comma-separated pre-training sets")
@click.option("--downstream", default="", help="comma-separated tasks (default: each pre-training set's family)")
@click.option("--seeds", default="", metavar="0,1,2", help="run the grid once per seed (stages are keyed by seed)")
@click.option("--suspect", "suspect_specs", multiple=True, metavar="NAME=PATH[:TRIGGER[:TARGET]]",
              help="an external encoder checkpoint as a row group beside the attacks (repeatable); TRIGGER: "
                   "patch:SIZE or a file (.npz, .png with alpha); zoo:NAME for a fetched zoo checkpoint (its "
                   "trigger and target from the manifest); also [suspects] in a profile")
@executor_options
@profile_options
@friendly_errors
def grid(attacks, defenses, pretrain_sets, downstream, seeds, suspect_specs, executor, workers, profile, sets, seed,
         device, data_dir, verbose):
    """Run the attack x defense x pre-training x task grid; finished stages are skipped."""
    from .table import seed_profiles
    check_workers(executor, workers)
    profiles = seed_profiles(profile, sets, seed, seeds)
    prof = profiles[0]
    suspects = profile_suspects(prof) + [_suspect(text) for text in suspect_specs]
    spec = grid_spec(prof, names(attacks, "--attacks"), names(defenses, "--defenses"),
                     names(pretrain_sets, "--pretrain"), names(downstream, "--downstream"), suspects)
    for what, items in (("attacks", spec.attacks or spec.suspects), ("defenses", spec.defenses),
                        ("pretrain", spec.pretrain)):
        if not items:
            raise UserError(f"no {what} to run: give --{what} or set grid.{what} in the profile")
    for name in spec.attacks:
        ATTACKS.get(name)
    seen = set(spec.attacks) | set(ATTACKS.names())
    for suspect in spec.suspects:
        if suspect.name in seen:
            raise UserError(f"suspect name {suspect.name!r} is taken (an attack or another suspect); "
                            "name each suspect differently")
        seen.add(suspect.name)
    for name in spec.defenses:
        DEFENSES.get(name)
        towers = [s.name for s in spec.suspects if s.layout in TOWER_LAYOUTS]
        refused = on_transformers.REFUSED.get(name)
        if towers and refused:  # said before any compute, as `defbench defend` does
            raise UserError(f"{name} cannot run on the transformer tower(s) {', '.join(towers)}: {refused}")
    cells = {}  # plans every stage of every seed: every setting is checked before anything runs
    for p in profiles:
        cells.update({(*key, p.seed): stage for key, stage in expand_grid(p, spec).items()})
    check_settings_reach(prof, components_used(list(cells.values())))
    env = open_env(prof, device, data_dir, verbose)
    for pretrain in spec.pretrain:
        targets: dict[str, set[int]] = {}
        for (_, _, cell_pretrain, task, _), stage in cells.items():
            if cell_pretrain == pretrain:
                found = targets.setdefault(task, set())
                if stage.spec["target"] is not None:  # None: a suspect without a trigger (ACC only)
                    found.add(stage.spec["target"])
        check_datasets(prof, env, pretrain, list(targets), targets)
    outcomes = run_and_summarise(list(cells.values()), env, executor, workers, prof)
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


def _suspect(text: str):
    """``--suspect zoo:NAME`` (a fetched zoo checkpoint) or ``NAME=PATH[:TRIGGER[:TARGET]]``."""
    if text.startswith("zoo:"):
        return zoo.suspect(text[len("zoo:"):])
    name, fields = parse_suspect(text)
    return resolve_suspect(name, **fields)


def check_workers(executor: str, workers: int) -> None:
    """Local workers are processes, each holding a model and a copy of the data: beyond a few per core they
    only exhaust memory."""
    limit = 4 * (os.cpu_count() or 1)
    if executor == "local" and workers > limit:
        raise UserError(f"--workers {workers}: this machine has {os.cpu_count()} CPU cores; use at most {limit} "
                        "local workers (or --executor submitit for jobs on a cluster)")


def run_and_summarise(stages, env, executor, workers, prof):
    """Run ``stages`` with the chosen executor and print the summary; returns the outcomes."""
    started = time.perf_counter()
    outcomes = run_grid(stages, env, executor, workers,
                        slurm={"partition": prof.grid.slurm_partition, "gpus": prof.grid.slurm_gpus,
                               "cpus": prof.grid.slurm_cpus, "timeout_min": prof.grid.slurm_timeout_min})
    click.echo(format_summary(outcomes, time.perf_counter() - started, env.store))
    return outcomes


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
