"""``defbench golden check|update``: the regression subset (``make ci-small``) against this CPU kind's golden file.

The file is ``tests/golden/ci-small.<kind>.csv`` (kind: torch's CPU capability and the CPU vendor,
e.g. AVX512-GenuineIntel).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ...core import UserError
from ..analysis import golden as g
from .common import check_seed, check_writable_folder, friendly_errors, make_profile_env, names, where


@click.group()
def golden():
    """The regression subset (`make ci-small`): check against, or rewrite, tests/golden/ci-small.<cpu kind>.csv."""


def _golden_options(fn):
    fn = click.option("--file", "golden_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="golden CSV (default: tests/golden/ci-small.<cpu kind>.csv, "
                           "e.g. AVX512-GenuineIntel)")(fn)
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(fn)
    fn = click.option("--workers", type=click.IntRange(min=1, max=4 * (os.cpu_count() or 1)), default=1,
                      show_default=True, help="parallel stages (processes), each at the subset's fixed thread "
                      "count, so the values do not depend on it")(fn)
    return fn


@golden.command(name="check")
@_golden_options
@click.option("--all", "show_all", is_flag=True, help="list every value, not only those that moved")
@friendly_errors
def golden_check(golden_file, device, workers, show_all):
    """Run the subset on the ci profile at the golden seed and diff every ACC/ASR against the golden file."""
    path = golden_file or g.default_file()
    if golden_file is None and not path.is_file():
        raise g.missing_kind_error(path)
    expected = g.read_golden(path)
    prof, env = make_profile_env("ci", (), g.golden_seed(path), device, None, False)
    diff = g.compare(g.run_subset(prof, env, workers), expected)
    click.echo(g.format_diff(diff, show_all))
    if (diff.status != "ok").any():
        hint = g.cpu_hint(g.golden_cpu(path))
        if hint:
            click.echo(hint)
        sys.exit(1)


@golden.command(name="update")
@_golden_options
@click.option("--seeds", default="0,1,2", show_default=True,
              help="comma-separated seeds: the first gives the values, all of them the tolerances")
@friendly_errors
def golden_update(golden_file, device, workers, seeds):
    """Deliberately rewrite the golden file (run the subset for every seed; tolerances from their spread)."""
    try:
        seed_list = [check_seed(int(s), "--seeds") for s in names(seeds, "--seeds")]
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    if not seed_list:
        raise UserError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    path = golden_file or g.default_file()
    check_writable_folder(path.parent, "the golden file")
    runs = []
    for seed in seed_list:
        prof, env = make_profile_env("ci", (), seed, device, None, False)
        click.echo(f"golden: running the subset with seed {seed}")
        runs.append(g.run_subset(prof, env, workers))
    with where(f"cannot write {path}"):
        g.write_golden(g.golden_frame(runs), path, seed_list, str(env.device))
    click.echo(f"wrote {path} ({len(runs[0])} cells x ACC/ASR, seeds {seed_list})")
    others = g.other_cpu_files(path)
    if others:
        click.echo(f"not rewritten: {', '.join(map(str, others))} (other CPU kinds). If a change of numerics "
                   "made this update, they are stale: delete them, and a machine of each kind writes its own.")
