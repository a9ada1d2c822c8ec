"""``defbench zoo``: public backdoored and clean encoders: list them, fetch one, verify that it is live."""
from __future__ import annotations

import json
import math

import click

from ...attacks.triggers import load_trigger
from ...encoders.tower_checkpoints import load_any_checkpoint
from ..pipeline import zoo as z
from ..pipeline.external import import_stage
from ..pipeline.plan import evaluate_stage
from ..pipeline.scheduler import run_grid
from .common import friendly_errors, open_env, profile_from_options, profile_options


@click.group("zoo")
def zoo():
    """Public backdoored and clean encoders (the manifest shipped with defbench, or $DEFBENCH_ZOO)."""


@zoo.command("list")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@friendly_errors
def list_(as_json):
    """Every checkpoint of the manifest: what it is, its backdoor, where it comes from."""
    entries = z.load_manifest(z.manifest_path())
    if as_json:
        click.echo(json.dumps({n: {**e.__dict__, "verified": e.verified} for n, e in entries.items()}, indent=1))
        return
    for e in entries.values():
        backdoor = f"target {e.target} on {e.task}, trigger {e.trigger}" if e.kind == "backdoored" else f"on {e.task}"
        click.echo(f"{e.name}: {e.kind} {e.arch} ({e.layout} layout, {e.image_size} px), {backdoor}; "
                   f"sha256 {'stated' if e.verified else 'unverified'}; {e.licence}; {e.source}")


@zoo.command("fetch")
@click.argument("name")
@friendly_errors
def fetch(name):
    """Download NAME (and its trigger) and check the stated sha256."""
    result = z.fetch(z.get(name))
    state = "matches the manifest" if result["verified"] else "unverified (the manifest states none)"
    click.echo(f"{result['path']}: sha256 {result['sha256']} {state}")


@zoo.command("verify")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@profile_options
@friendly_errors
def verify(name, as_json, profile, sets, seed, device, data_dir, verbose):
    """Measure NAME's clean ACC and ASR on its stated task; live only when both pass the manifest's thresholds."""
    entry = z.get(name)
    path = z.local_file(entry)
    prof = profile_from_options(profile, sets, seed)
    _, info = load_any_checkpoint(path, image_size=entry.image_size, mean=entry.mean, std=entry.std)
    trigger = load_trigger(entry.trigger_path(), info["image_size"]) if entry.trigger else None
    target = entry.target if trigger is not None else None
    env = open_env(prof, device, data_dir, verbose)
    stage = evaluate_stage(prof, import_stage(path, info), entry.task, trigger.describe() if trigger else None, target,
                           image_size=info["image_size"], role="zoo", attack=entry.name, defense="none")
    failed = [o for o in run_grid([stage], env) if o.status in ("failed", "skipped")]
    if failed:
        raise z.ZooError(f"verifying {name}: {failed[0].error}")
    metrics = json.loads((env.store.path(stage.kind, stage.key) / "metrics.json").read_text())
    asr = None if math.isnan(metrics["asr_all"]) else metrics["asr_all"]
    live, why = z.verdict(entry, metrics["acc"], asr)
    result = {"name": name, "path": str(path), "sha256": info["sha256"], "task": entry.task, "target": target,
              "acc": metrics["acc"], "asr": asr, "live": live, "verdict": why, "profile": prof.name}
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        shown = f", ASR {asr:.2f} (target {target})" if asr is not None else ""
        click.echo(f"{name}: {entry.task} ACC {metrics['acc']:.2f}{shown}; {why} (profile {prof.name})")
