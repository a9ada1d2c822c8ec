"""Table I and the cost table, rendered from the results database alone.

A cell's number is the newest ``evaluations`` row with the cell's labels
(profile, seed, --set overrides, attack, defense/role, pre-training set,
task); a cell without a row is shown as missing ("—"), never filled in.
Averages are over the cells present; an average that misses cells is marked
with a dagger and says how many it used.
"""
from __future__ import annotations

import json
from importlib import resources

import pandas as pd

from ..core import UserError

ASR_COLUMNS = {"all": "asr_all", "exclude-target": "asr_excl"}
ASR_NOTE = {"all": "ASR over every trigger-stamped test image (the papers' convention)",
            "exclude-target": "ASR over trigger-stamped test images outside the target class (stricter)"}
MISSING = "—"


class ReportError(UserError):
    """Results that are missing or partial; the message says which and how to produce them."""


def select_rows(rows: pd.DataFrame, seed: int | None = None, planned_key=None,
                overrides_of=None) -> tuple[pd.DataFrame, int]:
    """The newest row per (attack, defense, role, pretrain, downstream) among ``rows`` (one profile's rows from
    the results database) of ``seed``, and how many rows :func:`current_rows` left out as stale (when
    ``planned_key`` is given). Rows are matched by stage key, not by how the settings were spelled: two
    spellings of one setting (``defense.epochs`` / ``defense.ft.epochs``) give the same key and the same rows."""
    if seed is not None and len(rows):
        rows = rows[rows.seed == seed]
    left_out = 0
    if planned_key is not None:
        rows, left_out = current_rows(rows, planned_key, overrides_of)
    return rows.sort_values("created_at").drop_duplicates(
        ["attack", "defense", "role", "pretrain", "downstream"], keep="last"), left_out


def current_rows(rows: pd.DataFrame, planned_key, overrides_of=None) -> tuple[pd.DataFrame, int]:
    """Only the rows that today's code and settings would produce: a row is kept when its ``eval_key`` is
    ``planned_key(attack, defense, role, pretrain, downstream)``. Rows left by an older code version (or an
    unregistered component) would otherwise stand in for results nobody recomputed. Returns the kept rows
    and how many were left out as stale; given ``overrides_of(attack, defense)`` (the table's --set values that
    take effect for a row of that attack and defense, as the row records them), only rows computed with those
    count as stale: a row of other overrides (a study's arm) belongs to another table."""
    if rows.empty:
        return rows, 0
    cache: dict[tuple, str | None] = {}

    def is_current(row) -> bool:
        cell = (row.attack, row.defense, row.role, row.pretrain, row.downstream)
        if cell not in cache:
            cache[cell] = planned_key(*cell)
        return row.eval_key == cache[cell]

    keep = rows.apply(is_current, axis=1).astype(bool)
    stale = ~keep
    if overrides_of is not None and "overrides" in rows:  # the seed is matched on its own column
        stale &= rows.apply(lambda row: _without_seed(json_field(row.overrides))
                            == _without_seed(overrides_of(row.attack, row.defense)), axis=1).astype(bool)
    return rows[keep], int(stale.sum())


def _without_seed(overrides: dict | None) -> dict | None:
    return {k: v for k, v in overrides.items() if k != "seed"} if isinstance(overrides, dict) else None


def json_field(text) -> dict | None:
    """A results row's JSON column (``extra``, ``overrides``) as a dict: ``{}`` when empty, None when it is
    malformed or not an object (a row edited by hand), so one bad row costs its own cell, not the report."""
    try:
        value = json.loads(text or "{}")
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def stale_note(left_out: int, profile: str) -> str:
    return (f"{left_out} result(s) in the database come from an older code version or settings and are left "
            f"out; `defbench grid --profile {profile}` recomputes them.")


def partial_average_note(attack: str) -> str:
    """The note under a table whose Average row for ``attack`` (marked †) misses some cells."""
    return f"† {attack}: the average of a column uses only the cells present in it."


def paper_table() -> pd.DataFrame:
    path = resources.files("defbench.benchmark") / "data" / "paper_table1.csv"
    return pd.read_csv(path.open())


def _paper_name(dataset: str) -> str:
    return dataset.removeprefix("synth-")


def table1(rows: pd.DataFrame, defenses: list[str], convention: str = "all",
           compare_paper: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Wide table: one row per (attack, pretrain, downstream) + an Average row per attack.

    Columns: (column, metric) with column in Undefended + defenses and metric in ACC/ASR
    (+ paper ACC/ASR when ``compare_paper``). Returns the table and the notes to print under it.
    """
    asr = ASR_COLUMNS[convention]
    columns = ["undefended", *defenses]
    paper = paper_table().set_index(["attack", "pretrain", "downstream", "defense"]) if compare_paper else None
    records = []
    for (attack, pretrain, task), group in rows[rows.role != "clean"].groupby(["attack", "pretrain", "downstream"],
                                                                           sort=False):
        record = {("attack", ""): attack, ("pretrain", ""): pretrain, ("downstream", ""): task}
        for column in columns:
            hit = group[group.role == "undefended"] if column == "undefended" else \
                group[(group.role == "defended") & (group.defense == column)]
            record[(column, "ACC")] = hit.acc.iloc[0] if len(hit) else None
            record[(column, "ASR")] = hit[asr].iloc[0] if len(hit) else None
            if paper is not None:
                key = (attack, _paper_name(pretrain), _paper_name(task), column)
                found = key in paper.index
                record[(column, "paper ACC")] = paper.loc[key, "acc"] if found else None
                record[(column, "paper ASR")] = paper.loc[key, "asr"] if found else None
        records.append(record)
    if not records:
        raise ReportError("no evaluations for this profile/seed/overrides in the results database")
    table = pd.DataFrame.from_records(records)
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    table = table.sort_values([("attack", ""), ("pretrain", ""), ("downstream", "")]).reset_index(drop=True)
    notes = [ASR_NOTE[convention] + "; all numbers in %."]
    out = []
    for attack, group in table.groupby(("attack", ""), sort=False):
        out.append(group)
        average = _average_row(attack, group, group.columns[3:])
        if average[("downstream", "")]:
            notes.append(partial_average_note(attack))
        out.append(pd.DataFrame([average], columns=group.columns))
    with_pretrain = defenses_using_pretrain_data(rows, defenses)
    if with_pretrain:
        notes.append(f"data: {', '.join(with_pretrain)} also used the suspect's unlabelled pre-training set (the "
                     "poisoned one after a data-poisoning attack: PatchSearch's threat model); every other column "
                     "used only the defender's clean set.")
    if compare_paper:
        notes.append("paper = the MIMIC paper's Table I (real CIFAR-10/STL-10/GTSRB/SVHN); synthetic "
                     "stand-ins are compared with the dataset they stand in for.")
    return pd.concat(out, ignore_index=True), notes


def _average_row(attack: str, group: pd.DataFrame, metrics) -> dict:
    """An attack's Average row: each metric's mean over the task rows that have it; the downstream
    cell is "†" when some metric misses a row (a partial average), else empty."""
    average = {("attack", ""): attack, ("pretrain", ""): "Average", ("downstream", ""): ""}
    for col in metrics:
        present = group[col].dropna()
        average[col] = present.mean() if len(present) else None
        if 0 < len(present) < len(group):
            average[("downstream", "")] = "†"
    return average


PRETRAIN_DATA = "clean set + pre-training set"  # a defended row's extra["defense_data"] (benchmark.pipeline.stages)


def defenses_using_pretrain_data(rows: pd.DataFrame, defenses: list[str]) -> list[str]:
    """The columns whose defended rows say they used the suspect's pre-training set besides the clean set."""
    if "extra" not in rows:
        return []
    found = set()
    for _, row in rows[rows.role == "defended"].iterrows():
        if (json_field(row.extra) or {}).get("defense_data") == PRETRAIN_DATA:
            found.add(row.defense)
    return [d for d in defenses if d in found]


def combine_seeds(tables: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Mean and standard deviation over seeds of several :func:`table1` frames (one per seed), cell by cell.

    A task row's mean and sd are over the seeds that measured it. An attack's Average row is the average
    of its task rows' means, and its sd the spread of the per-seed averages of the seeds that measured
    every one of those rows (none when fewer than two did): averages over different task sets are never
    mixed. With one seed the sd is None: there is no spread to report."""
    if len(tables) == 1:
        return tables[0], None
    keys = [("attack", ""), ("pretrain", ""), ("downstream", "")]
    is_task = [t[("pretrain", "")] != "Average" for t in tables]
    stacked = pd.concat([t[rows] for t, rows in zip(tables, is_task)], ignore_index=True)
    metrics = [c for c in stacked.columns if c not in keys]
    grouped = stacked.groupby(keys, sort=False)
    order = stacked[keys].drop_duplicates()
    mean = order.merge(grouped[metrics].mean().reset_index(), on=keys, how="left")[stacked.columns]
    sd = order.merge(grouped[metrics].std(ddof=1).reset_index(), on=keys, how="left")[stacked.columns]
    mean_parts, sd_parts = [], []
    for attack, group in mean.groupby(("attack", ""), sort=False):
        mean_parts.append(group)
        sd_parts.append(sd.loc[group.index])
        needed = set(map(tuple, group[keys[1:]].values))
        complete = [t[~rows & (t[("attack", "")] == attack)] for t, rows in zip(tables, is_task)
                    if set(map(tuple, t[rows & (t[("attack", "")] == attack)][keys[1:]].values)) == needed]
        average = _average_row(attack, group, metrics)
        spread = {key: average[key] for key in keys}
        for col in metrics:
            values = [t[col].iloc[0] for t in complete if len(t)]
            spread[col] = pd.Series(values, dtype=float).std(ddof=1) if len(values) > 1 else None
        mean_parts.append(pd.DataFrame([average], columns=stacked.columns))
        sd_parts.append(pd.DataFrame([spread], columns=stacked.columns))
    return pd.concat(mean_parts, ignore_index=True), pd.concat(sd_parts, ignore_index=True)


def _paired_best(row: pd.Series, per_seed: list[pd.DataFrame] | None, defenses: list[str]) -> tuple:
    """The best ACC and the lowest ASR of a table row, each only where a paired Wilcoxon test against the
    runner-up separates them (:func:`defbench.reports.stats.paired_best`). The pairs are the seeds' values of a
    task row, or every (task, seed) of an Average row; with one seed nothing is marked."""
    from .stats import paired_best
    if not per_seed or len(per_seed) < 2:
        return None, None
    keys = [("attack", ""), ("pretrain", ""), ("downstream", "")]
    blocks = []
    for frame in per_seed:
        same = frame[keys[0]] == row[keys[0]]
        if row[keys[1]] == "Average":
            hits = frame[same & (frame[keys[1]] != "Average")]
        else:
            hits = frame[same & (frame[keys[1]] == row[keys[1]]) & (frame[keys[2]] == row[keys[2]])]
        blocks.append(hits)
    blocks = pd.concat(blocks, ignore_index=True)
    best = []
    for metric, lower in (("ACC", False), ("ASR", True)):
        values = pd.DataFrame({d: pd.to_numeric(blocks[(d, metric)]) for d in defenses if (d, metric) in blocks})
        best.append(paired_best(values, lower) if len(values.columns) else None)
    return tuple(best)


def _cells(table: pd.DataFrame, sd: pd.DataFrame | None, defenses: list[str], bold,
           per_seed: list[pd.DataFrame] | None = None) -> tuple[list, list]:
    metric_cols = [c for c in table.columns[3:]]
    headers = ["attack", "pre-train → downstream"] + [f"{c[0]} {c[1]}" for c in metric_cols]
    body = []
    for i, row in table.iterrows():
        sd_row = sd.loc[i] if sd is not None else None
        best_acc, best_asr = _paired_best(row, per_seed, defenses)
        where = row[("pretrain", "")] if row[("pretrain", "")] == "Average" else \
            f"{row[('pretrain', '')]} → {row[('downstream', '')]}"
        if row[("pretrain", "")] == "Average" and row[("downstream", "")]:
            where += " " + row[("downstream", "")]
        cells = [row[("attack", "")], where]
        for col in metric_cols:
            value = row[col]
            text = MISSING if pd.isna(value) else f"{value:.2f}"
            if sd_row is not None and not pd.isna(value) and not col[1].startswith("paper") and pd.notna(sd_row[col]):
                text += f" ± {sd_row[col]:.2f}"
            if (col == (best_acc, "ACC") or col == (best_asr, "ASR")) and not pd.isna(value):
                text = bold(text)
            cells.append(text)
        body.append(cells)
    return headers, body


def _bold_note(table: pd.DataFrame, sd: pd.DataFrame | None, n_seeds: int) -> str:
    if sd is None:
        return ("No best is marked: with one seed there is no spread to tell a best from noise "
                "(`--seeds 0,1,2` gives mean ± sd and marks separated bests).")
    note = (f"mean ± sd over {n_seeds} seeds. Bold: best ACC / lowest ASR among the defenses (Undefended "
            "excluded), only where a two-sided Wilcoxon signed-rank test against the runner-up, paired over the "
            "seeds (a task row) or over every task and seed (an Average row), gives p < 0.05; with fewer than 6 "
            "pairs no cell can be bold.")
    measured = [c for c in table.columns[3:] if not c[1].startswith("paper")]
    if (table[measured].notna() & sd[measured].isna()).any().any():
        note += (" A cell without ± rests on one seed (the other seeds' rows are not in the database yet) and "
                 "is never bold.")
    return note


def render(table: pd.DataFrame, defenses: list[str], fmt: str, notes: list[str], title: str,
           sd: pd.DataFrame | None = None, n_seeds: int = 1, per_seed: list[pd.DataFrame] | None = None) -> str:
    """Table I as md, latex or csv; ``per_seed`` (the seeds' own :func:`table1` frames) lets the paired test
    mark a best."""
    from tabulate import tabulate
    if fmt == "csv":
        flat = table.copy()
        for col in table.columns[3:]:  # a column with a missing cell holds objects: numeric, so %.2f applies
            flat[col] = pd.to_numeric(flat[col])
        flat.columns = ["_".join(x for x in c if x).replace(" ", "_").lower() for c in table.columns]
        if sd is not None:
            for col in table.columns[3:]:
                flat["_".join(x for x in col if x).replace(" ", "_").lower() + "_sd"] = sd[col].values
        return flat.to_csv(index=False, float_format="%.2f")
    if fmt == "md":
        headers, body = _cells(table, sd, defenses, lambda t: f"**{t}**", per_seed)
        text = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
        return f"### {title}\n\n{text}\n\n" + "\n".join(f"- {n}" for n in notes) + \
            f"\n- {_bold_note(table, sd, n_seeds)}\n"
    if fmt == "latex":
        notes = notes + [_bold_note(table, sd, n_seeds)]
        headers, body = _cells(table, sd, defenses, lambda t: f"\\textbf{{{t}}}", per_seed)
        def escape(text: str) -> str:
            for raw, tex in (("±", "$\\pm$"), ("→", "$\\rightarrow$"), ("_", "\\_"), ("%", "\\%")):
                text = text.replace(raw, tex)
            return text
        lines = ["\\begin{table}", "\\centering", f"\\caption{{{escape(title)}}}", "\\small",
                 "\\begin{tabular}{ll" + "r" * (len(headers) - 2) + "}", "\\toprule",
                 " & ".join(escape(h) for h in headers) + " \\\\", "\\midrule"]
        lines += [" & ".join(escape(c) for c in row) + " \\\\" for row in body]
        lines += ["\\bottomrule", "\\end{tabular}", "\\\\[2pt]".join([""] + [escape(n) for n in notes]),
                  "\\end{table}"]
        return "\n".join(lines) + "\n"
    raise ReportError(f"unknown format {fmt!r}; use md, latex or csv")


def render_cost(cost: pd.DataFrame, fmt: str, notes: list[str]) -> str:
    if fmt == "md":
        return cost.to_markdown(floatfmt=("", ".0f") + (".1f",) * 4) + "".join(f"\n\n- {n}" for n in notes) + "\n"
    if fmt == "csv":
        return cost.to_csv(float_format="%.1f")
    return cost.to_latex(float_format="%.1f")


def cost_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Wall time of each defense per cell (seconds), from the defended rows."""
    defended = rows[rows.role == "defended"].drop_duplicates("encoder_key")
    if defended.empty:
        raise ReportError("no defended evaluations for this profile in the results database")
    cost = defended.groupby("defense").encoder_seconds.agg(["count", "mean", "median", "min", "max"])
    cost = cost.rename(columns={"count": "cells", "mean": "mean s", "median": "median s", "min": "min s",
                                "max": "max s"}).sort_values("mean s")
    return cost.astype({"cells": int})
