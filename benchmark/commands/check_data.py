"""``defbench check-data``: the premises a backdoor benchmark's images must meet, measured on a dataset.

Three premises (docs/data.md): a natural amplitude spectrum, a trigger that is out of distribution (no
near-white 10x10 window in clean images or their SimCLR views, the trigger's box not already white), and
a clean encoder whose "ASR" stays near chance on the task. The first two are statistics of the pixels;
the third is read from the results database (the grid's clean rows), never computed here.
"""
from __future__ import annotations

import json

import click
import numpy as np
import pandas as pd

from ..datasets import FAMILIES
from ..datasets.premises import TARGETS, data_premises
from .common import friendly_errors, where

CHANCE_MARGIN = 5.0  # clean-encoder ASR may exceed chance (100 / classes) by at most this many points


def _line(label: str, value: str, target: str, ok: bool | None) -> str:
    verdict = "" if ok is None else ("ok" if ok else "FAILS")
    return f"{label:<64} {value:>9}   {target:<18} {verdict}"


def _on_version(config: str, version: str) -> bool:
    """Was this evaluation computed on data ``version`` (its spec's ``data``)?"""
    try:
        return json.loads(config)["eval"]["data"] == version
    except (TypeError, ValueError, KeyError):
        return False


def _trigger(config) -> str:
    """The trigger a clean evaluation stamped, as stable text ("" when the row does not record it)."""
    try:
        return json.dumps(json.loads(config)["eval"].get("trigger"), sort_keys=True)
    except (TypeError, ValueError, KeyError, AttributeError):
        return ""


def profile_rows(rows, profile: str):
    """Only the rows today's code and the profile's own settings give, seed by seed (Table I's rule,
    ``tables.current_rows``): a study arm's clean encoder (a wider one) or an attacker-side variant's
    trigger is another scenario, not the data's premise."""
    import functools

    from ...reports import tables
    from ..pipeline.plan import planned_evaluation_key
    from ..pipeline.settings import load_profile

    kept = [tables.current_rows(same, functools.partial(planned_evaluation_key,
                                                        load_profile(profile, {"seed": int(seed)})))[0]
            for seed, same in rows.groupby("seed", sort=False)]
    return pd.concat(kept) if kept else rows


def clean_encoder_rows(name: str, profile: str, classes: int, version: str) -> tuple[list[str], bool]:
    """One line per clean-encoder evaluation of task ``name`` on data ``version`` in the results database
    (read-only), naming the row groups (attacks) whose trigger it stamps: rows computed on an earlier draw
    of the set say nothing about this one. Also whether the premise holds for every row group (read on
    the mean over seeds where there are several); True when there are no rows to read."""
    from ...reports.tables import ReportError
    from .table import open_results

    try:
        db = open_results(profile)
    except ReportError:  # no database yet: say how to make the rows
        return [f"clean-encoder ASR: no results database; run `defbench grid --profile {profile}` first"], True
    rows = db.evaluations(profile=profile, role="clean", downstream=name)
    rows = rows[[_on_version(config, version) for config in rows.config]] if not rows.empty else rows
    rows = profile_rows(rows, profile)
    if rows.empty:
        return [f"clean-encoder ASR: no clean rows for {name} ({version}) at profile {profile}; "
                f"`defbench grid --profile {profile}` computes them"], True
    limit = 100.0 / classes + CHANCE_MARGIN
    lines, draws = [], {}
    # row groups whose triggers are alike share one clean evaluation: one line that names them all
    for _, same in rows.groupby("eval_key", sort=False):
        row = same.iloc[0]
        groups = ", ".join(sorted(set(same.attack)))
        lines.append(_line(f"clean-encoder ASR [{groups}] ({row.pretrain}, seed {row.seed})",
                           f"{row.asr_all:.2f} %", f"<= {limit:.1f} %", row.asr_all <= limit))
        # seeds are matched by pre-training set and trigger, not by which row groups happen to share a seed
        draw = draws.setdefault((row.pretrain, _trigger(row.config)), {"attacks": set(), "asr": {}})
        draw["attacks"] |= set(same.attack)
        draw["asr"][row.seed] = row.asr_all
    # one seed is one draw (README, "Where things go"): with several, the premise is read on their mean
    holds = True
    for (pretrain, _), draw in draws.items():
        values = np.array(list(draw["asr"].values()))
        holds = holds and values.mean() <= limit
        if len(values) > 1:
            groups = ", ".join(sorted(draw["attacks"]))
            lines.append(_line(f"clean-encoder ASR [{groups}] ({pretrain}, mean of {len(values)} seeds)",
                               f"{values.mean():.2f} ± {values.std(ddof=1):.2f} %", f"<= {limit:.1f} %",
                               values.mean() <= limit))
    return lines, holds


@click.command(name="check-data")
@click.argument("name")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("-n", "count", type=click.IntRange(min=16), default=2000, show_default=True,
              help="images drawn (seeded) from the split")
@click.option("--profile", default="tiny", show_default=True, help="whose clean-encoder rows to read")
@click.option("--data-dir", default=None, help="real datasets live here (default: $DEFBENCH_DATA)")
@friendly_errors
def check_data(name, split, count, profile, data_dir):
    """Measure a dataset's backdoor-benchmark premises (spectrum, white windows, clean-encoder ASR)."""
    from ...core import paths
    from ..datasets import load_dataset

    folder = str(paths.data_dir(data_dir))
    with where(f"cannot load dataset {name!r}", "see `defbench list datasets`"):
        classes = len(set(load_dataset(name, "test", folder, 32).labels.tolist()))
    measured = data_premises(name, split=split, n=count, data_dir=folder)
    passes = measured["passes"]
    low, high = TARGETS["spectrum_slope"]
    click.echo(f"{name} ({measured['data_version']}), {split} split, {measured['n']} images")
    click.echo(_line("amplitude-spectrum slope", f"{measured['slope']:.3f}", f"in [{low}, {high}]",
                     passes["spectrum_slope"]))
    for key, label in (("white_window_clean", "white 10x10 window, clean"),
                       ("white_window_augmented", "white 10x10 window, SimCLR views"),
                       ("trigger_box_half_white", "trigger box half white")):
        click.echo(_line(label, f"{100 * measured[key]:.2f} %", f"<= {100 * TARGETS[key]:.0f} %", passes[key]))
    clean_holds = True
    if any(name == task for tasks in FAMILIES.values() for task, _ in tasks):
        lines, clean_holds = clean_encoder_rows(name, profile, classes, measured["data_version"])
        for line in lines:
            click.echo(line)
    if not (all(passes.values()) and clean_holds):
        raise SystemExit(1)
