"""``defbench run``: one benchmark cell end to end: plan, execute (the grid's scheduler), collect, print."""
from __future__ import annotations

import json
import math
import sys

import click
from tabulate import tabulate

from ...attacks import ATTACKS
from ...defenses import DEFENSES
from ..pipeline.plan import cell_stages, components_used, downstream_tasks
from ..pipeline.scheduler import Outcome, run_grid
from ..pipeline.settings import Profile
from ..pipeline.stages import Env
from ...core import UserError
from ..pipeline.stages import StoreError
from .common import (check_datasets, check_settings_reach, friendly_errors, open_env, profile_from_options,
                     profile_options)


@click.command()
@click.option("--attack", default="badencoder", show_default=True)
@click.option("--defense", default="ft", show_default=True)
@click.option("--pretrain", default=None, help="pre-training set (default: the profile's first)")
@click.option("--downstream", multiple=True,
              help="downstream task (repeatable; default: the pre-training set's family)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
@profile_options
@friendly_errors
def run(attack, defense, pretrain, downstream, as_json, profile, sets, seed, device, data_dir, verbose):
    """Run one benchmark cell: clean, undefended and defended ACC/ASR on each downstream task."""
    prof = profile_from_options(profile, sets, seed)
    ATTACKS.get(attack)
    if defense != "none":
        DEFENSES.get(defense)
    if not (pretrain or prof.grid.pretrain):
        raise UserError("no pre-training set: name one with --pretrain (the profile's grid.pretrain is empty)")
    pretrain = pretrain or prof.grid.pretrain[0]
    tasks = downstream_tasks(pretrain, downstream)
    per_task = {task: cell_stages(prof, attack, defense, pretrain, task) for task in tasks}  # plans = checks
    check_settings_reach(prof, components_used([s for stages in per_task.values() for s in stages.values()]))
    env = open_env(prof, device, data_dir, verbose)
    check_datasets(prof, env, pretrain, tasks, {t: st["undefended"].spec["target"] for t, st in per_task.items()},
                   clean_set=defense != "none")
    results, outcomes = run_cell(prof, env, attack, defense, pretrain, per_task)
    failed = [o for o in outcomes if o.status == "failed"]  # each said in one line on stderr as it failed
    if as_json:
        click.echo(json.dumps({"profile": prof.name, "device": str(env.device), "seed": prof.seed,
                               "results": results,
                               "failed": [{"stage": o.stage.label, "error": o.error} for o in failed]},
                              indent=1, default=_json_number))
    else:
        click.echo(format_cell_table(results, prof, attack, defense, pretrain, outcomes))
    if failed:
        sys.exit(1)


def _json_number(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _metrics(env: Env, stage) -> dict | None:
    path = env.store.path(stage.kind, stage.key) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read the stored result {path} ({type(err).__name__}); delete the folder "
                         f"{path.parent} and rerun to recompute it") from None


def _meta(env: Env, stage) -> dict:
    return env.store.read_meta(stage.kind, stage.key) if env.store.exists(stage.kind, stage.key) else {}


def _small(records: dict) -> dict:
    """The records worth printing: scalars and small dicts of scalars (MI per layer, a score)."""
    def scalar(v):
        return isinstance(v, (int, float, str, bool))
    return {k: v for k, v in records.items()
            if scalar(v) or (isinstance(v, dict) and len(v) <= 8 and all(scalar(x) for x in v.values()))}


def _fmt_record(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt_record(v)}" for k, v in value.items()) + "}"
    return str(value)


def run_cell(profile: Profile, env: Env, attack: str, defense: str, pretrain: str,
             per_task: dict[str, dict], on_stage=None) -> tuple[list[dict], list[Outcome]]:
    """Run the planned stages of one cell (``per_task``: task -> role -> evaluate stage); one row per task.
    ``on_stage``: told before and after each stage (``run_grid``)."""
    outcomes = run_grid([s for stages in per_task.values() for s in stages.values()], env, on_stage=on_stage)
    elapsed = {o.stage.key: o.seconds for o in outcomes if o.status == "ran"}
    charged: set[str] = set()  # a stage shared by several tasks is charged to the first
    results = []
    for task, stages in per_task.items():
        row = {"attack": attack, "defense": defense, "pretrain": pretrain, "downstream": task,
               "target": stages["undefended"].spec["target"], "profile": profile.name, "seed": profile.seed}
        for role, stage in stages.items():
            m = _metrics(env, stage) or {}
            suffix = "" if role == "defended" else f"_{role}"
            row[f"acc{suffix}"] = m.get("acc")
            row[f"asr{suffix}"] = m.get("asr_all")
            row[f"asr_excl_target{suffix}"] = m.get("asr_excl")
            screen = {k: v for k, v in m.items() if k.startswith("rejected_") or k == "acc_accepted"}
            if role == "defended" and screen:  # an input screen's rejection rates (DeDe)
                row["screen"] = screen
        if defense == "none":  # the defended encoder is the undefended one
            for metric in ("acc", "asr", "asr_excl_target"):
                row[metric] = row[f"{metric}_undefended"]
        defended = stages.get("defended")
        defend_stage = defended.deps[0] if defended else None
        row["defense_seconds"] = _meta(env, defend_stage).get("seconds") if defend_stage else 0.0
        row["defense_records"] = _small(_meta(env, defend_stage).get("records", {})) if defend_stage else {}
        result = _meta(env, defend_stage).get("result", {}) if defend_stage else {}
        row["defense_data"] = result.get("defense_data")
        if result.get("pretrain_data"):
            row["pretrain_data"] = result["pretrain_data"]
        mine = {s.key for st in stages.values() for s in [st, *_ancestors(st)]} - charged
        charged |= mine
        row["seconds"] = round(sum(elapsed.get(key, 0.0) for key in mine), 2)  # 0 when all was cached
        results.append(row)
    return results, outcomes


def _ancestors(stage):
    for dep in stage.deps:
        yield dep
        yield from _ancestors(dep)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def format_cell_table(results: list[dict], profile: Profile, attack: str, defense: str, pretrain: str,
                      outcomes: list[Outcome]) -> str:
    headers = ["downstream", "target", "clean ACC", "clean ASR", "undef. ACC", "undef. ASR",
               f"{defense} ACC", f"{defense} ASR", "defense s"]
    rows = [[r["downstream"], r["target"], _fmt(r["acc_clean"]), _fmt(r["asr_clean"]),
             _fmt(r["acc_undefended"]), _fmt(r["asr_undefended"]), _fmt(r["acc"]), _fmt(r["asr"]),
             _fmt(r["defense_seconds"])] for r in results]
    ran = sum(o.status == "ran" for o in outcomes)
    cached = sum(o.status == "cached" for o in outcomes)
    title = (f"{attack} vs {defense}, pre-trained on {pretrain}, profile {profile.name}, seed {profile.seed} "
             f"({ran} stages ran, {cached} cached)")
    note = ("ACC: clean test accuracy (%). ASR: trigger-stamped test images classified as the target (%), "
            "all test images stamped (the papers' convention; the target-excluded ASR is in --json). "
            "clean = the unattacked encoder, for reference.")
    records = [f"  {r['downstream']}: " + "; ".join(f"{k} = {_fmt_record(v)}" for k, v in r["defense_records"].items())
               for r in results if r.get("defense_records")]
    extra = f"\n{defense} recorded:\n" + "\n".join(records) if records else ""
    screens = [f"  {r['downstream']}: " + "; ".join(f"{k} = {v:.1f}" for k, v in r["screen"].items())
               for r in results if r.get("screen")]
    if screens:
        extra += (f"\n{defense} screens its inputs (rejected inputs count as wrong in ACC, as not attacked in ASR; "
                  "rejected_*: % of each set refused):\n" + "\n".join(screens))
    used = [f"  {r['downstream']}: {_data_line(r)}" for r in results if r.get("pretrain_data")]
    if used:
        extra += f"\n{defense} used the clean set + the suspect's pre-training set:\n" + "\n".join(used)
    return f"{title}\n{tabulate(rows, headers=headers, tablefmt='github')}\n{note}{extra}"


def _data_line(row: dict) -> str:
    """The pre-training data a defense used and what it removed (poison counts: the harness's, never the defense's)."""
    p = row["pretrain_data"]
    text = f"{p['n_images']} images ({p['source']}; {p['n_poison']} poisons)"
    if "removed" in p:
        text += f", removed {p['removed']}: {p['removed_poison']} poisons, {p['removed'] - p['removed_poison']} clean"
    return text
