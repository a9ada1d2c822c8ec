"""``defbench defend``: run a registered defense on any encoder checkpoint; write it back in the file's layout.

The file is read safely (``weights_only`` / safetensors) and becomes an
``import`` stage keyed by its content; the defense is the grid's ``defend``
stage on the clean images named by ``--clean`` (the profile's share of their
pre-training split, or ``--clean-size`` images), so the same file and
settings are never recomputed. The defended encoder is written in the layout,
container and key names of the input (a BadEncoder-layout file stays loadable
by the BadEncoder code), with a JSON sidecar ``OUT.json`` saying what ran.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import click

from ...core import UserError
from ...defenses import DEFENSES, on_transformers
from ...encoders.checkpoints import CheckpointError
from ...encoders.tower_checkpoints import load_any_checkpoint as load_checkpoint, save_like_any as save_like
from ...encoders.screening import is_screened, save_screen
from ..datasets import load_dataset
from ..pipeline.external import import_stage
from ..pipeline.plan import defend_stage
from ..pipeline.scheduler import run_grid
from ..pipeline.stages import load_stage_encoder
from .common import (check_settings_reach, check_writable_folder, encoder_options, format_value, friendly_errors,
                     open_env, profile_from_options, profile_options, where)


def defbench_version() -> str:
    try:
        return metadata.version("defbench")
    except metadata.PackageNotFoundError:
        return "unknown"


@click.command()
@click.option("--encoder", "encoder_path", required=True, metavar="PATH",
              help="the suspect: a defbench, BadEncoder/MIMIC-release or torchvision ResNet checkpoint, or a timm ViT, "
                   "open_clip / OpenAI CLIP or Hugging Face CLIP tower (.pt or .safetensors)")
@click.option("--defense", required=True, help="a registered defense (defbench list defenses)")
@click.option("--clean", "clean_data", required=True, metavar="DATA",
              help="the defender's clean images: a dataset name (its pre-training split), npz:DIR or folder:DIR")
@click.option("--clean-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="use N random clean images (default: the profile's clean.fraction of the split, capped at "
                   "clean.max_images)")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False), metavar="OUT",
              help="where the defended encoder goes (same layout as the input); the sidecar is OUT.json")
@click.option("--json", "as_json", is_flag=True, help="print the sidecar (one JSON object)")
@encoder_options
@profile_options
@friendly_errors
def defend(encoder_path, defense, clean_data, clean_size, out_path, as_json, image_size, mean, std, profile, sets,
           seed, device, data_dir, verbose):
    """Defend any encoder checkpoint with a registered defense and write it back in its own layout."""
    prof = profile_from_options(profile, sets, seed)
    component = DEFENSES.get(defense)
    check_settings_reach(prof, {"defense": {component.name}})
    source, out = Path(encoder_path), Path(out_path)
    sidecar = out.with_name(out.name + ".json")
    if out.resolve() == source.resolve():
        raise UserError(f"-o {out} is the input file; write the defended encoder somewhere else")
    suspect, info = load_checkpoint(source, image_size=image_size, mean=mean, std=std)  # every check, first
    on_transformers.check_runs_on(component.name, suspect)  # a defense that cannot run on a ViT says so up front
    check_writable_folder(out.resolve().parent, "the defended encoder")
    env = open_env(prof, device, data_dir, verbose)
    load_dataset(clean_data, "pretrain", env.data_dir, info["image_size"])  # a missing dataset fails here
    stage = defend_stage(prof, component.name, import_stage(source, info), clean_data,
                         image_size=info["image_size"], clean_size=clean_size)
    outcomes = run_grid([stage], env, show_progress=None)
    failed = [o for o in outcomes if o.status in ("failed", "skipped")]
    if failed:
        raise UserError(f"{failed[0].stage.label} failed: {failed[0].error}")
    status = next(o.status for o in outcomes if o.stage.key == stage.key)
    meta = env.store.read_meta(stage.kind, stage.key)
    defended = load_stage_encoder(env, stage)
    with where(f"cannot write {out}", "choose a path in a writable folder"):
        written = save_like(defended, source, out, sha256=info["sha256"])
        try:  # what we wrote must read back with the loader it came from
            load_checkpoint(out, image_size=info["image_size"], mean=info["mean"], std=info["std"])
        except CheckpointError as err:
            out.unlink(missing_ok=True)
            raise UserError(f"the defended encoder did not read back from {out} ({err}); nothing was kept") from None
        if is_screened(defended):  # an input screen (DeDe): OUT holds the encoder, OUT.screen.pt the screen
            screen = out.with_name(out.name + ".screen.pt")
            save_screen(defended, screen)
            written["screen"] = str(screen)
        record = {
            "defense": component.name, "settings": dataclasses.asdict(stage.settings),
            "profile": prof.name, "overrides": prof.overrides, "defbench_version": defbench_version(),
            "code_version": stage.code, "stage_key": stage.key, "seed": stage.seed(), "profile_seed": prof.seed,
            "input": info, "output": written,
            "clean": {**stage.spec["clean"], "n_images": meta["result"].get("n_clean"),
                      "sha256": meta["result"].get("clean_sha256")},
            **({"pretrain_data": {**stage.spec["pretrain_data"], **meta["result"]["pretrain_data"]}}
               if meta["result"].get("pretrain_data") else {}),
            "wall_seconds": meta.get("seconds"), "cached": status == "cached", "device": meta.get("device"),
            "threads": meta.get("threads"), "torch": meta.get("torch"), "python": platform.python_version(),
            "records": meta.get("records", {}),
        }
        tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, sidecar)
    if as_json:
        click.echo(json.dumps(record, indent=1, default=str))
        return
    for key, value in record["records"].items():
        click.echo(f"{component.name} {key}: {format_value(value)}")
    how = "cached" if status == "cached" else "ran"
    click.echo(f"wrote {out} ({written['layout']} layout, {info['arch']}, {info['image_size']} px) and {sidecar}: "
               f"{component.name} on {record['clean']['n_images']} clean images of {clean_data}, profile {prof.name} "
               f"({how}, {record['wall_seconds'] or 0:.1f} s)")
