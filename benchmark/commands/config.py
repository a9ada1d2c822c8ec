"""``defbench config``: every resolved setting of one cell, the stage it feeds, and the layer that set it."""
from __future__ import annotations

import json

import click

from ...attacks import ATTACKS
from ...defenses import DEFENSES
from ..pipeline.plan import cell_stages, downstream_tasks
from .common import friendly_errors, profile_from_options

# which settings feed which stage (the stage's key hashes them)
FEEDS = {"seed": "every stage", "data_dir": "(where real data is read)", "encoder": "pretrain", "pretrain": "pretrain",
         "attack": "attack", "clean": "defend", "defense": "defend", "evaluate": "evaluate",
         "grid": "(which cells `defbench grid` plans)", "studies": "(where `defbench report` runs)"}


@click.command()
@click.option("--profile", default="tiny", show_default=True, help="paper, tiny, ci, or a path to a .toml profile")
@click.option("--attack", default="badencoder", show_default=True)
@click.option("--defense", default="ft", show_default=True)
@click.option("--pretrain", default=None, help="pre-training set (default: the profile's first)")
@click.option("--downstream", default=None, help="downstream task (default: the pre-training set's first)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a setting (repeatable)")
@click.option("--seed", type=int, default=None, help="seed for every stage (default: the profile's)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@friendly_errors
def config(profile, attack, defense, pretrain, downstream, sets, seed, as_json):
    """Show every resolved setting of a cell: its value, the stage it feeds and which layer set it
    (paper default, a component's profile entry, a profile file, or --set)."""
    prof = profile_from_options(profile, sets, seed)
    ATTACKS.get(attack)
    kinds = {"attack": [attack]}
    if defense != "none":
        kinds["defense"] = [DEFENSES.get(defense).name]
    pretrain = pretrain or (prof.grid.pretrain[0] if prof.grid.pretrain else "")
    stages = {}
    if pretrain:
        task = downstream or downstream_tasks(pretrain)[0]
        cell = cell_stages(prof, attack, defense, pretrain, task)
        undefended = cell["undefended"]
        stages = {"pretrain": cell["clean"].deps[0].key, "attack": undefended.deps[0].key, "evaluate": undefended.key}
        if "defended" in cell:
            stages["defend"] = cell["defended"].deps[0].key
    rows = [{"key": k, "value": v, "source": src, "stage": FEEDS.get(k.split(".")[0], "")}
            for k, v, src in prof.explain(kinds)]
    if as_json:
        click.echo(json.dumps({"profile": prof.name, "chain": prof.chain, "stage_keys": stages, "settings": rows},
                              indent=1, default=str))
        return
    click.echo(f"profile {prof.name} (chain: {' <- '.join(prof.chain)}), seed {prof.seed}"
               + (f"; cell {attack} x {defense} on {pretrain} -> {task}" if pretrain else ""))
    for kind, key in stages.items():
        click.echo(f"  {kind} stage key {key}")
    width = max(len(f"{r['key']} = {_show(r['value'])}") for r in rows)
    section = None
    for r in rows:
        head = r["key"].split(".")[0]
        if head != section:
            section = head
            click.echo(f"[{head}] -> {r['stage']}")
        text = f"{r['key']} = {_show(r['value'])}"
        click.echo(f"  {text:<{width}}  # {r['source']}")


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
