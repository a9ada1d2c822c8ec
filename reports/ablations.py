"""The paper's studies as figures and tables, rendered from the results database alone.

``benchmark/analysis/studies.py`` says what each study runs and names its
renderer here; its result rows carry the study's name and the arm they belong
to. Here every study becomes a figure
(PNG and SVG) and a table with the numbers the figure shows. A study whose
rows are missing or partial is not drawn: :func:`match_rows` raises a
:class:`ReportError` naming what is missing and the command that computes it.

Conventions in every figure: ACC is a line, ASR bars (the paper's style), both
in % on one axis; the undefended encoder is a dashed reference line; when a
study runs on several downstream tasks, figures show the mean over tasks and
the tables list every task.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .plotting import pyplot_and_seaborn

if TYPE_CHECKING:
    from matplotlib.figure import Figure
from .tables import ASR_COLUMNS, ASR_NOTE, ReportError, json_field  # noqa: F401  (ASR_NOTE: for the page header)

MATCH_KEYS = ["arm", "role", "defense", "downstream", "attack", "seed"]
ACC_COLOUR, ASR_COLOUR, REF_COLOUR = "#1f77b4", "#d62728", "0.35"


@dataclass
class StudyReport:
    name: str
    title: str
    paper: str
    figure: Figure
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------- reading

def match_rows(rows: pd.DataFrame, expected: list[dict], study: str, profile: str, seeds: list[int],
               diverged: frozenset[str] = frozenset()) -> pd.DataFrame:
    """The newest row for every expected (arm, role, defense, task, attack, seed) whose stage key is the
    one today's code and settings give it (a row of an older code version is stale); all must be there,
    except those whose training diverged (keys in ``diverged``): they stay, with NaN metrics."""
    want = pd.DataFrame(expected)
    stale = pd.DataFrame(columns=MATCH_KEYS)
    seed = ",".join(map(str, seeds))
    if len(rows):
        rows = rows[(rows.profile == profile) & rows.seed.isin(seeds)]
        rows = rows.assign(key=rows["eval_key"] if "eval_key" in rows else rows["stage_key"])
        current = rows.key.isin(want.key)
        stale = rows[~current][MATCH_KEYS].drop_duplicates()
        rows = rows[current].sort_values("created_at").drop_duplicates([*MATCH_KEYS, "key"], keep="last")
        merged = want.merge(rows, on=[*MATCH_KEYS, "key"], how="left", indicator=True)
    else:
        merged = want.assign(_merge="left_only")
    missing = merged[(merged._merge == "left_only") & ~merged.key.isin(diverged)]
    if len(missing):
        first = missing.iloc[0]
        n_stale = len(missing[MATCH_KEYS].merge(stale, on=MATCH_KEYS))  # missing, but an older version is there
        older = f", {n_stale} of them only from an older code version or settings" if n_stale else ""
        raise ReportError(
            f"report {study}: {len(missing)} of {len(want)} results missing for profile {profile}, "
            f"seed{'s' if len(seeds) > 1 else ''} {seed}"
            f"{older} (first: arm {first.arm!r}, {first.role} {first.defense} on {first.downstream}); "
            f"compute them with `defbench report {study} --profile {profile}"
            f"{f' --seeds {seed}' if len(seeds) > 1 else ''}`")
    return merged.drop(columns="_merge")


# ----------------------------------------------------------------- helpers

def _mean_by(rows: pd.DataFrame, keys: list[str], asr: str) -> pd.DataFrame:
    """ACC/ASR (and defense seconds) averaged over tasks, one row per ``keys``, order of first appearance; with
    several seeds the mean over seeds of the per-seed means, and ``ACC sd``/``ASR sd`` their spread (NaN with
    one seed)."""
    rows = rows.assign(_order=range(len(rows)))
    if "seed" not in rows:
        rows = rows.assign(seed=0)
    per_seed = rows.groupby([*keys, "seed"], sort=False, dropna=False).agg(
        ACC=("acc", "mean"), ASR=(asr, "mean"), seconds=("encoder_seconds", "mean"), _order=("_order", "min"))
    out = per_seed.groupby(keys, sort=False, dropna=False).agg(
        ACC=("ACC", "mean"), ASR=("ASR", "mean"), seconds=("seconds", "mean"), _order=("_order", "min"),
        **{"ACC sd": ("ACC", "std"), "ASR sd": ("ASR", "std")})
    return out.sort_values("_order").drop(columns="_order").reset_index()


def _err(values) -> np.ndarray | None:
    """Error-bar sizes, or None when there is no spread (one seed)."""
    values = np.asarray(values, dtype=float)
    return None if np.isnan(values).all() else np.nan_to_num(values)


def _reference(rows: pd.DataFrame, role: str, asr: str) -> tuple[float, float]:
    ref = rows[rows.role == role].drop_duplicates(["downstream", "seed"] if "seed" in rows else "downstream")
    return float(ref.acc.mean()), float(ref[asr].mean())


def _bars_and_line(ax, labels: list[str], acc, asr, undefended: tuple[float, float] | None = None,
                   xlabel: str = "", acc_sd=None, asr_sd=None) -> None:
    x = np.arange(len(labels))
    ax.bar(x, asr, width=0.6, color=ASR_COLOUR, alpha=0.75, label="ASR",
           yerr=_err(asr_sd) if asr_sd is not None else None, capsize=3)
    ax.errorbar(x, acc, yerr=_err(acc_sd) if acc_sd is not None else None, marker="o", color=ACC_COLOUR,
                linewidth=2, capsize=3, label="ACC")
    if undefended is not None:
        ax.axhline(undefended[1], color=REF_COLOUR, linestyle="--", linewidth=1, label="ASR undefended")
        ax.axhline(undefended[0], color=REF_COLOUR, linestyle=":", linewidth=1, label="ACC undefended")
    ax.set_xticks(x, labels)
    _percent_axis(ax, xlabel)


def _percent_axis(ax, xlabel: str = "", ylabel: str = "ACC / ASR (%)", legend_columns: int = 4) -> None:
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    _legend_below(ax, legend_columns)


def _legend_below(ax, ncol: int = 4, offset: float = -0.2) -> None:
    """The legend under the axes: bars and lines reach 100 %, so a legend inside would cover data.
    ``offset`` (axes fraction) moves it further down under rotated tick labels."""
    ax.legend(fontsize=8, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, offset), frameon=False)


def _per_task_table(rows: pd.DataFrame, index: list[str], asr: str) -> pd.DataFrame:
    """ACC/ASR per task (columns "TASK ACC", "TASK ASR") plus their means when there are several tasks, and
    the sds over seeds of the means when there are several seeds."""
    tasks = list(dict.fromkeys(rows.downstream))
    means = _mean_by(rows, index, asr)
    spread = ["ACC sd", "ASR sd"] if means["ACC sd"].notna().any() else []
    table = means[index + ["ACC", "ASR", *spread]]
    if len(tasks) > 1:
        for task in tasks:
            part = _mean_by(rows[rows.downstream == task], index, asr)
            table[f"{task} ACC"] = part.ACC.values
            table[f"{task} ASR"] = part.ASR.values
        table = table.rename(columns={"ACC": "mean ACC", "ASR": "mean ASR", "ACC sd": "mean ACC sd",
                                      "ASR sd": "mean ASR sd"})
    return table


def _figure(ncols: int = 1, width: float = 6.4) -> tuple[Figure, list]:
    plt, sns = pyplot_and_seaborn()
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, 4.2), squeeze=False)
    return fig, list(axes[0])


# ----------------------------------------------------------------- the studies

def components(rows, asr, meas=None) -> tuple[Figure, pd.DataFrame, list[str]]:
    defended = rows[rows.role == "defended"]
    table = _per_task_table(defended, ["arm"], asr)
    undefended = _reference(rows, "undefended", asr)
    fig, (ax,) = _figure(width=7.5)
    means = _mean_by(defended, ["arm"], asr)
    _bars_and_line(ax, ["undefended"] + list(means.arm), [undefended[0], *means.ACC], [undefended[1], *means.ASR],
                   xlabel="MIMIC variant", acc_sd=[np.nan, *means["ACC sd"]], asr_sd=[np.nan, *means["ASR sd"]])
    ax.set_title("MIMIC without one component")
    table = pd.concat([pd.DataFrame([{"arm": "undefended", table.columns[1]: undefended[0],
                                      table.columns[2]: undefended[1]}]), table], ignore_index=True)
    return fig, table.rename(columns={"arm": "variant"}), []


def regime(rows, asr, meas=None):
    """The studied defense under each one-factor change: ACC line, ASR bars, with each arm's undefended
    reference (the width arm has its own encoder) and the defense's wall time."""
    defended = rows[rows.role == "defended"]
    means = _mean_by(defended, ["arm"], asr)
    reference = _mean_by(rows[rows.role == "undefended"], ["arm"], asr).set_index("arm")
    fig, (ax,) = _figure(width=8.5)
    _bars_and_line(ax, list(means.arm), means.ACC, means.ASR, xlabel="setting (one factor changed)",
                   acc_sd=means["ACC sd"], asr_sd=means["ASR sd"])
    ax.plot(range(len(means)), reference.loc[means.arm, "ASR"], linestyle="none", marker="_", markersize=18,
            color=REF_COLOUR, label="ASR undefended")
    ax.tick_params(axis="x", labelrotation=20)
    _legend_below(ax, offset=-0.36)  # under the rotated labels and the axis title
    table = _per_task_table(defended, ["arm"], asr)
    table.insert(1, "final objective", [_final_objective(defended[defended.arm == arm]) for arm in means.arm])
    table.insert(1, "seconds", means.seconds.values)
    table.insert(1, "undefended ASR", reference.loc[means.arm, "ASR"].values)
    return fig, table.rename(columns={"arm": "setting"}), [
        "one factor changed at a time around the profile's setting; seconds = the defend stage's wall time; "
        "the width arm pre-trains and attacks its own wider encoder (its undefended ASR is its own)",
        "final objective = L0 + L1 + L2 of the distillation's last epoch on the clean set (mean over tasks and "
        "seeds): the label-free rule of docs/methods/mimic.md compares it between settings of the same budget "
        "and data (the lr arms); arms that change the loss, the budget or the encoder are not comparable by it"]


def _final_objective(rows: pd.DataFrame) -> float:
    """Mean over rows of the last epoch's summed distillation losses (MIMIC's ``loss_history`` record, or
    its ``loss_history_last`` when the history was too long for the row)."""
    finals = []
    for extra in rows.get("extra", pd.Series(dtype=object)):
        extra = json_field(extra) or {}
        last = (extra.get("loss_history") or [None])[-1] or extra.get("loss_history_last")
        if last:
            finals.append(float(sum(v for v in last if v is not None)))  # None: a switched-off term
    return float(np.mean(finals)) if finals else float("nan")


def lambdas(rows, asr, meas=None):
    defended = rows[rows.role == "defended"]
    undefended = _reference(rows, "undefended", asr)
    fig, axes = _figure(2)
    tables = []
    for ax, sweep in zip(axes, ["lambda1", "lambda2"]):
        part = _mean_by(defended[defended.sweep == sweep], ["x"], asr).sort_values("x")
        name = {"lambda1": "λ1 (weight of NT-Xent, L1)", "lambda2": "λ2 (multiplier of the β-weighted attention, L2)"}
        _bars_and_line(ax, [f"{v:g}" for v in part.x], part.ACC, part.ASR, undefended, xlabel=name[sweep],
                       acc_sd=part["ACC sd"], asr_sd=part["ASR sd"])
        ax.set_title(f"{sweep} sweep (the other weight at 1)")
        tables.append(_per_task_table(defended[defended.sweep == sweep], ["sweep", "x"], asr).sort_values("x"))
    table = pd.concat(tables, ignore_index=True).rename(columns={"x": "value"})
    return fig, table, [f"undefended: ACC {undefended[0]:.2f}, ASR {undefended[1]:.2f}"]


def _before_after(rows, asr, by: str, before_role: str = "undefended", after_role: str = "defended"):
    before = _mean_by(rows[rows.role == before_role], [by], asr)
    after = _mean_by(rows[rows.role == after_role], [by], asr)
    return before.merge(after, on=by, suffixes=(" before", " after"), sort=False)


def _before_after_series(both: pd.DataFrame) -> dict[str, tuple]:
    return {when_name: (both[f"ACC {when}"], both[f"ASR {when}"], colour, both[f"ACC sd {when}"],
                        both[f"ASR sd {when}"])
            for when, when_name, colour in (("before", "undefended", REF_COLOUR), ("after", "MIMIC", ASR_COLOUR))}


def _with_spread(table: pd.DataFrame, both: pd.DataFrame) -> pd.DataFrame:
    """Add the before/after sds over seeds to a table, when there are several seeds."""
    for col in ("ACC sd before", "ASR sd before", "ACC sd after", "ASR sd after"):
        if both[col].notna().any():
            table[col] = both[col].values
    return table


def _grouped(ax, labels, series: dict[str, tuple], xlabel: str) -> None:
    """ASR bars side by side and ACC lines, one pair per series name: {name: (acc, asr, colour, acc_sd, asr_sd)}."""
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, (acc, asr, colour, acc_sd, asr_sd)) in enumerate(series.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), asr, width=width * 0.95, color=colour, alpha=0.55, label=f"ASR {name}",
               yerr=_err(asr_sd), capsize=3)
        ax.errorbar(x, acc, yerr=_err(acc_sd), marker="o", color=colour, linewidth=2, capsize=3, label=f"ACC {name}")
    ax.set_xticks(x, labels)
    _percent_axis(ax, xlabel)


def trigger_size(rows, asr, meas=None):
    both = _before_after(rows, asr, "arm")
    fig, (ax,) = _figure()
    _grouped(ax, list(both.arm), _before_after_series(both), xlabel="trigger size (pixels, white patch)")
    ax.set_title("BadEncoder with a smaller trigger, before and after MIMIC")
    table = both[["arm", "ACC before", "ASR before", "ACC after", "ASR after"]].copy()
    table["ASR reduction"] = table["ASR before"] - table["ASR after"]
    table["ACC loss"] = table["ACC before"] - table["ACC after"]
    return fig, _with_spread(table, both).rename(columns={"arm": "trigger"}), ["before = undefended, after = MIMIC"]


def clean_ratio(rows, asr, meas=None):
    defended = rows[rows.role == "defended"]
    undefended = _reference(rows, "undefended", asr)
    means = _mean_by(defended, ["defense", "x"], asr)
    fig, axes = _figure(2)
    for ax, metric, ref in zip(axes, ["ACC", "ASR"], undefended):
        for defense, part in means.groupby("defense", sort=False):
            ax.errorbar(part.x * 100, part[metric], yerr=_err(part[f"{metric} sd"]), marker="o", linewidth=1.5,
                        capsize=2, label=defense)
        ax.axhline(ref, color=REF_COLOUR, linestyle="--", linewidth=1, label="undefended")
        ax.set_title(f"{metric} after each defense")
        ax.set_xticks(sorted(means.x.unique() * 100))
        _percent_axis(ax, "clean data (% of the pre-training set)", f"{metric} (%)", legend_columns=5)
    table = means.pivot(index="x", columns="defense", values=["ACC", "ASR"])
    table.columns = [f"{d} {m}" for m, d in table.columns]
    table = table[[f"{d} {m}" for d in dict.fromkeys(means.defense) for m in ("ACC", "ASR")]].reset_index()
    table["x"] = (table.x * 100).map(lambda v: f"{v:g}%")
    return fig, table.rename(columns={"x": "clean data"}), [
        f"undefended: ACC {undefended[0]:.2f}, ASR {undefended[1]:.2f}"]


def poison_ratio(rows, asr, meas=None):
    defended = _mean_by(rows[rows.role == "defended"], ["x"], asr).sort_values("x")
    undefended = _reference(rows, "undefended", asr)
    fig, (ax,) = _figure()
    _bars_and_line(ax, [f"{v:.0%}" for v in defended.x], defended.ACC, defended.ASR, undefended,
                   xlabel="triggered images in the defender's clean set", acc_sd=defended["ACC sd"],
                   asr_sd=defended["ASR sd"])
    ax.set_title("MIMIC with a poisoned clean set")
    table = _per_task_table(rows[rows.role == "defended"], ["x"], asr).sort_values("x")
    table["x"] = table.x.map(lambda v: f"{v:.0%}")
    return fig, table.rename(columns={"x": "poisoned share"}), [
        f"undefended: ACC {undefended[0]:.2f}, ASR {undefended[1]:.2f}"]


def clean_encoders(rows, asr, meas=None):
    before = rows[rows.role == "clean"].drop_duplicates(["downstream", "seed"])
    after = rows[rows.role == "clean-defended"]
    acc_before = float(before.acc.mean())
    per_defense = _mean_by(after, ["defense"], asr)
    fig, (ax,) = _figure(width=7.5)
    x = np.arange(len(per_defense))
    ax.bar(x, per_defense.ACC, width=0.6, color=ACC_COLOUR, alpha=0.75, label="ACC after the defense",
           yerr=_err(per_defense["ACC sd"]), capsize=3)
    ax.axhline(acc_before, color=REF_COLOUR, linestyle="--", linewidth=1, label="ACC of the clean encoder")
    ax.set_xticks(x, per_defense.defense)
    _percent_axis(ax, "defense applied to a clean encoder", "ACC (%)")
    ax.set_title("Cost of each defense on an encoder without a backdoor")
    table = _per_task_table(after, ["defense"], asr)
    acc_col = "mean ACC" if "mean ACC" in table else "ACC"
    table.insert(1, "ACC before", acc_before)
    table["ACC change"] = table[acc_col] - acc_before
    return fig, table, [f"clean encoder: ACC {acc_before:.2f} (mean over tasks)"]


def mi_layers(rows, asr, meas: pd.DataFrame | None = None):
    records, lost = [], []
    for _, m in meas.iterrows():
        if not isinstance(m.result, str):  # its encoder's training diverged: no estimate (NaN, with a note)
            lost.append(m)
            continue
        for inputs, layers in json.loads(m.result)["mi"].items():
            records += [_mi_record(m, inputs, layer, value) for layer, value in layers.items()]
    stages = list(dict.fromkeys(r["layer"] for r in records)) or ["layer4"]
    records += [_mi_record(m, inputs, layer, float("nan"))
                for m in lost for inputs in ("clean", "triggered") for layer in stages]
    per_seed = pd.DataFrame(records).groupby(["encoder", "inputs", "layer", "seed"], sort=False).MI.mean()
    frame = per_seed.groupby(["encoder", "inputs", "layer"], sort=False).agg(["mean", "std"]).reset_index()
    frame = frame.rename(columns={"mean": "MI", "std": "MI sd"})
    encoders = list(dict.fromkeys(frame.encoder))
    fig, axes = _figure(len(encoders))
    top = frame.MI.max() * 1.15 if frame.MI.max() > 0 else 1.0  # NaN (all diverged) or 0: a unit axis
    for ax, encoder in zip(axes, encoders):
        part = frame[frame.encoder == encoder]
        for inputs, colour in (("clean", ACC_COLOUR), ("triggered", ASR_COLOUR)):
            p = part[part.inputs == inputs]
            ax.errorbar(p.layer, p.MI, yerr=_err(p["MI sd"]), marker="o", linewidth=2, capsize=3, color=colour,
                        label=f"{inputs} inputs")
        ax.set_ylim(-0.03 * top, top)  # a little room below 0: markers at an estimate of 0 stay whole
        ax.set_xlabel("stage")
        ax.set_ylabel("MI estimate I(stage; feature) (nats)")
        ax.set_title(f"{encoder} encoder")
        ax.legend(fontsize=8)
    table = frame.pivot_table(index=["encoder", "inputs"], columns="layer", values="MI", sort=False,
                              dropna=False).reset_index()
    table.columns.name = None
    return fig, table, ["MINE (Donsker-Varadhan) with the profile's MIMIC estimator settings, on the "
                        "defender's clean images and the same images with the trigger; a negative estimate "
                        "(noise around 0) is clipped to 0, as MIMIC does"]


def _mi_record(m: pd.Series, inputs: str, layer: str, value: float) -> dict:
    return {"encoder": m.arm, "inputs": inputs, "layer": layer, "MI": value, "downstream": m.downstream,
            "seed": m.get("seed", 0)}


def adaptive(rows, asr, meas=None):
    both = _before_after(rows, asr, "arm")
    fig, (ax,) = _figure()
    _grouped(ax, list(both.arm), _before_after_series(both), xlabel="attack")
    ax.set_title("An adaptive attack that hides its MI profile")
    table = both[["arm", "ACC before", "ASR before", "ACC after", "ASR after"]].copy()
    return fig, _with_spread(table, both).rename(columns={"arm": "attack"}), ["before = undefended, after = MIMIC"]


def fit_exponent(sizes, seconds) -> float:
    """Slope of log(time) against log(clean-set size): time ~ size^exponent."""
    sizes, seconds = np.asarray(sizes, float), np.asarray(seconds, float)
    ok = (sizes > 0) & (seconds > 0)
    if ok.sum() < 2 or len(set(sizes[ok])) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes[ok]), np.log(seconds[ok]), 1)[0])


def cost(rows, asr, meas=None):
    defended = rows[rows.role == "defended"].drop_duplicates("encoder_key").copy()
    defended["n_clean"] = defended.extra.map(lambda e: (json_field(e) or {}).get("n_clean"))
    if defended.n_clean.isna().any():
        raise ReportError("report cost: some defended rows lack the clean-set size (rows written by an older "
                          "defbench); rerun `defbench report cost` to refresh them")
    per = defended.groupby(["defense", "x"], sort=False).agg(
        seconds=("encoder_seconds", "mean"), n_clean=("n_clean", "mean")).reset_index()
    order = list(dict.fromkeys(defended.defense))
    largest = per[per.x == per.x.max()].set_index("defense").loc[order].reset_index()
    fig, axes = _figure(2)
    axes[0].bar(largest.defense, largest.seconds, color=ACC_COLOUR, alpha=0.8)
    axes[0].set_ylabel("wall time per defense run (s)")
    axes[0].set_xlabel(f"defense ({largest.n_clean.mean():.0f} clean images)")
    axes[0].set_title("Time per defense")
    exponents = {}
    for defense in order:
        part = per[per.defense == defense].sort_values("n_clean")
        # rounded as printed; + 0.0 turns -0.0 into 0.0, so a flat time reads "0.00", not "-0.00"
        exponents[defense] = round(fit_exponent(part.n_clean, part.seconds), 2) + 0.0
        axes[1].plot(part.n_clean, part.seconds, marker="o", label=f"{defense} (k = {exponents[defense]:.2f})")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    measured_sizes = sorted(per.n_clean.unique())
    axes[1].set_xticks(measured_sizes, [f"{n:.0f}" for n in measured_sizes])
    axes[1].set_xticks([], minor=True)  # the log scale's minor labels ("3x10^2") otherwise crowd the measured ones
    axes[1].set_xlabel("clean images (log scale)")
    axes[1].set_ylabel("wall time (s, log scale)")
    axes[1].set_title("Growth with the clean-set size: time ~ n^k")
    _legend_below(axes[1], ncol=3)
    sizes = per.groupby("x").n_clean.mean()
    table = per.pivot(index="defense", columns="x", values="seconds").loc[order]
    table.columns = [f"{sizes[c]:.0f} images (s)" for c in table.columns]
    table["exponent k"] = [exponents[d] for d in table.index]
    notes = ["wall time of the defend stage as recorded when it ran (device in the results database); "
             "k = least-squares slope of log time on log size",
             "ANP optimises its masks for a fixed number of iterations, MOTH hardens for a fixed number of model "
             "updates, and DECREE inverts its trigger for a step budget (with early stopping), whatever n is: a k "
             "near 0 there is by design"]
    return fig, table.reset_index(), notes


def frontier(rows, asr, meas=None):
    """ASR and ACC of each defense against its measured wall time, one line per defense over its budgets."""
    defended = rows[rows.role == "defended"]
    per = _mean_by(defended, ["sweep", "x", "arm"], asr).sort_values(["sweep", "x"], kind="stable")
    order = list(dict.fromkeys(defended.sweep))
    undefended = _reference(rows, "undefended", asr)
    fig, axes = _figure(2)
    for ax, metric, ref in zip(axes, ("ASR", "ACC"), (undefended[1], undefended[0])):
        for defense in order:
            part = per[per.sweep == defense]
            ax.errorbar(part.seconds, part[metric], yerr=_err(part[f"{metric} sd"]), marker="o", linewidth=1.5,
                        capsize=2, label=defense)
        ax.axhline(ref, color=REF_COLOUR, linestyle="--", linewidth=1, label="undefended")
        ax.set_xscale("log")
        ax.set_title(f"{metric} against compute")
        _percent_axis(ax, "wall time of the defense (s, log scale)", f"{metric} (%)", legend_columns=5)
    columns = ["sweep", "x", "arm", "seconds", "ACC", "ASR"] + [c for c in ("ACC sd", "ASR sd") if per[c].notna().any()]
    table = per[columns].rename(columns={"sweep": "defense", "x": "budget scale", "arm": "budget"})
    table["budget"] = table.budget.str.extract(r"\((.*)\)$", expand=False)
    table["defense"] = pd.Categorical(table.defense, order, ordered=True)
    table = table.sort_values(["defense", "budget scale"]).reset_index(drop=True)
    return fig, table, [f"undefended: ACC {undefended[0]:.2f}, ASR {undefended[1]:.2f}",
                        "each defense at 1/4, 1/2, 1, 2 and 4 times its own budget (the fields it declares); "
                        "seconds = the defend stage's measured wall time; nothing is selected by ASR"]


# ----------------------------------------------------------------- building and writing

def build(study, evaluations: pd.DataFrame, measurements: pd.DataFrame, expected_rows: list[dict],
          expected_measurements: list[dict], profile: str, seeds: list[int] | int,
          convention: str = "all", diverged: frozenset[str] = frozenset()) -> StudyReport:
    """Check the study's rows (from the results database) are complete, and draw its figure and table with
    the study's own renderer (``study.render``); with several seeds, means over seeds and their spread.
    ``diverged``: stage keys of the expected rows whose training diverged (shown as NaN, with a note)."""
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    rows = match_rows(evaluations, expected_rows, study.name, profile, seeds, diverged) if expected_rows else None
    meas = match_rows(measurements, expected_measurements, study.name, profile, seeds, diverged) \
        if expected_measurements else None
    fig, table, notes = study.render(rows, ASR_COLUMNS[convention], meas)
    notes = [*notes, *_divergence_notes(rows, expected_rows, diverged, "no ACC/ASR"),
             *_divergence_notes(meas, expected_measurements, diverged, "no measurement")]
    study, title, paper = study.name, study.title, study.paper
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=10)  # wrapped, never cut
    fig.tight_layout()
    return StudyReport(study, title, paper, fig, table, notes)


def _divergence_notes(rows: pd.DataFrame | None, expected: list[dict], diverged: frozenset[str],
                      lacking: str) -> list[str]:
    """One note per arm with a diverged row (an evaluation, or a measurement of a diverged encoder): a result
    of the study (NaN in its table), not a missing one; ``lacking`` names what the row has not."""
    if rows is None or not diverged:
        return []
    hit = pd.DataFrame(expected)
    hit = hit[hit.key.isin(diverged)]
    return [f"{arm}: training diverged (NaN or inf loss or weights){_defended_by(g)} on "
            f"{', '.join(sorted(set(g.downstream)))}, seed{'s' if g.seed.nunique() > 1 else ''} "
            f"{', '.join(map(str, sorted(set(g.seed))))}: {lacking} (nan in the table)"
            for arm, g in hit.groupby("arm", sort=False)]


def _defended_by(group: pd.DataFrame) -> str:
    defenses = sorted(set(group.defense) - {"none"})
    return f" for {', '.join(defenses)}" if defenses else ""


def _markdown_table(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".2f")


def write(report: StudyReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / f"{report.name}.png", "svg": out_dir / f"{report.name}.svg"}
    report.figure.savefig(paths["png"], dpi=130, bbox_inches="tight")
    report.figure.savefig(paths["svg"], bbox_inches="tight")
    pyplot_and_seaborn()[0].close(report.figure)
    paths["md"] = out_dir / f"{report.name}.md"
    paths["md"].write_text(section(report) + "\n")
    report.table.to_csv(out_dir / f"{report.name}.csv", index=False, float_format="%.4g")
    return paths


def section(report: StudyReport) -> str:
    notes = "".join(f"- {n}\n" for n in report.notes)
    return (f"## {report.name}: {report.title} (paper: {report.paper})\n\n"
            f"![{report.name}]({report.name}.png)\n\n{_markdown_table(report.table)}\n\n{notes}")


def page(sections: list[str], failures: dict[str, str], header: str) -> str:
    failed = "".join(f"## {name}: not rendered\n\n{message}\n\n" for name, message in failures.items())
    return header + "\n\n" + "\n".join(sections) + ("\n" + failed if failed else "")

