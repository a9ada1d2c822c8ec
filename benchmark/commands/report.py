"""``defbench report``: the paper's studies beyond Table I, each a small grid plus a figure and a table."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ...reports import ablations
from ...reports.tables import ReportError
from ...core import paths
from ..analysis.studies import STUDIES, plan_study
from ..pipeline.plan import components_used
from ..pipeline.scheduler import diverged_stages
from ..pipeline.store import ArtifactStore
from .common import (check_datasets, check_settings_reach, check_writable_folder, friendly_errors, open_env,
                     profile_options, where)
from .grid import check_workers, executor_options, run_and_summarise
from .publish import publish_pages, rank_pages
from .table import open_results, seed_profiles


@click.command()
@click.argument("name")
@click.option("--seeds", default="", metavar="0,1,2", help="run and render over these seeds (mean ± sd, error bars)")
@executor_options
@click.option("--no-run", is_flag=True, help="only render from the results database (fail if results are missing)")
@click.option("--update", is_flag=True, help="publish: first add the database's current rows to OUT_DIR/rows.csv")
@click.option("--asr-convention", type=click.Choice(["all", "exclude-target"]), default="all", show_default=True)
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/out"),
              show_default=True, help="where the figures, tables and markdown go")
@profile_options
@friendly_errors
def report(name, seeds, executor, workers, no_run, update, asr_convention, out_dir, profile, sets, seed, device,
           data_dir, verbose):
    """Run one of the paper's studies (or `all`) through the grid runner and render its figure and table;
    or render the result pages with paired statistics (`ranks`, `publish`).

    Studies: components, lambdas, trigger-size, clean-ratio, poison-ratio, clean-encoders, mi-layers,
    adaptive, cost, frontier, protocols, mimic-regime. `all` also writes OUT_DIR/ablations.md with every figure and
    its numbers. `ranks` renders, from the results database, one page per row group (Table I rows over seeds,
    paired Wilcoxon-Holm tests, Friedman ranks, critical-difference diagram, every seed). `publish` renders
    the same pages from the snapshot OUT_DIR/rows.csv alone (`--update` first adds the database's rows)."""
    if name in ("ranks", "publish"):
        seed_list = [p.seed for p in seed_profiles(profile, sets, seed, seeds)] if seeds else None
        if name == "ranks":
            rank_pages(profile, out_dir, seed_list)
        else:
            publish_pages(profile, out_dir, update, seed_list)
        return
    check_workers(executor, workers)
    profiles = seed_profiles(profile, sets, seed, seeds)
    prof = profiles[0]
    studies = STUDIES.names() if name == "all" else [STUDIES.get(name).name]
    plans = {n: [plan_study(n, profile, p.overrides) for p in profiles] for n in studies}  # study -> one per seed
    check_settings_reach(prof, components_used([s for per_seed in plans.values() for plan in per_seed
                                                for s in plan.stages]))
    check_writable_folder(out_dir, "the report")  # before hours of compute, not after
    if no_run:  # only reads: the database opened read-only, nothing else touched
        db = open_results(prof.name, f"defbench report {name} --profile {prof.name}")
    else:
        env = open_env(prof, device, data_dir, verbose)
        db = env.db
        for per_seed in plans.values():
            targets: dict[str, set[int]] = {}
            for plan in per_seed:
                for stage in plan.evaluations:
                    targets.setdefault(stage.spec["downstream"], set()).add(stage.spec["target"])
            check_datasets(prof, env, per_seed[0].pretrain, per_seed[0].tasks, targets)
        stages = [s for per_seed in plans.values() for plan in per_seed for s in plan.stages]
        run_and_summarise(stages, env, executor, workers, prof)
    store = env.store if not no_run else ArtifactStore(paths.artifacts_dir())  # its records of diverged stages
    failures: dict[str, str] = {}
    sections = []
    seed_list = [p.seed for p in profiles]
    for per_seed in plans.values():
        study = per_seed[0].study
        expected = [row for plan in per_seed for row in plan.expected(plan.evaluations)]
        expected_measurements = [row for plan in per_seed for row in plan.expected(plan.measurements)]
        diverged = diverged_stages([s for plan in per_seed for s in (*plan.evaluations, *plan.measurements)],
                                   store)
        try:
            with where(f"cannot read the results database {db.path}"):
                evaluations, measurements = db.evaluations(study=study.name), db.measurements(study=study.name)
            built = ablations.build(study, evaluations, measurements, expected, expected_measurements, prof.name,
                                    seed_list, asr_convention, diverged)
        except ReportError as err:
            failures[study.name] = str(err)
            click.echo(f"defbench: {err}", err=True)  # the message names the study
            continue
        with where(f"cannot write the report into {out_dir}"):
            written = ablations.write(built, out_dir)
        sections.append(ablations.section(built))
        click.echo(f"report {study.name}: wrote {written['png']}, {written['svg']}, {written['md']}")
    if name == "all":
        seed_text = f"seed{'s' if len(seed_list) > 1 else ''} {', '.join(map(str, seed_list))}"
        header = (f"# The paper's studies, profile {prof.name}, {seed_text}\n\n"
                  f"Rendered by `defbench report all --profile {prof.name}` from the results database; "
                  f"ASR convention: {ablations.ASR_NOTE[asr_convention]}. All numbers in %, times in seconds.")
        with where(f"cannot write into {out_dir}"):
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "ablations.md").write_text(ablations.page(sections, failures, header))
        click.echo(f"wrote {out_dir / 'ablations.md'}")
    if failures:
        sys.exit(1)
