"""One benchmark cell end to end (``defbench run``): plan, execute, collect, print."""
from __future__ import annotations

import json

from tabulate import tabulate

from .plan import cell_stages, downstream_tasks
from .profiles import Profile
from .runner import Outcome, execute
from .stages import Env


def _metrics(env: Env, stage) -> dict | None:
    path = env.store.path(stage.kind, stage.key) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


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
             downstream: list[str]) -> tuple[list[dict], list[Outcome]]:
    tasks = downstream_tasks(pretrain, downstream)
    per_task = {task: cell_stages(profile, attack, defense, pretrain, task) for task in tasks}
    outcomes = execute([s for stages in per_task.values() for s in stages.values()], env)
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
        if defense == "none":  # the defended encoder is the undefended one
            for metric in ("acc", "asr", "asr_excl_target"):
                row[metric] = row[f"{metric}_undefended"]
        defended = stages.get("defended")
        defend_stage = defended.deps[0] if defended else None
        row["defense_seconds"] = _meta(env, defend_stage).get("seconds") if defend_stage else 0.0
        row["defense_records"] = _small(_meta(env, defend_stage).get("records", {})) if defend_stage else {}
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
    return f"{title}\n{tabulate(rows, headers=headers, tablefmt='github')}\n{note}{extra}"
