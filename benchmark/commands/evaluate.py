"""``defbench evaluate``: the benchmark's own probe and ACC/ASR on any encoder checkpoint.

The file becomes an ``import`` stage (keyed by its content) and is evaluated
by the grid's ``evaluate`` stage with the profile's evaluation settings: the
probe's seed comes from the weights and the task, so a file holding a grid
encoder gets that grid row's numbers. Triggers: ``patch[:SIZE]`` (the
attacks' white square), a BadEncoder-release ``.npz`` (``t``/``tm``), an
``.npz`` with ``pattern``/``mask``, or a PNG whose alpha is the mask. Without a
trigger only ACC is measured.
"""
from __future__ import annotations

import json
import math

import click

from ...attacks.triggers import load_trigger
from ...core import UserError
from ...encoders.tower_checkpoints import load_any_checkpoint as load_checkpoint
from ..datasets import load_dataset
from ..pipeline.external import Suspect, import_stage
from ..pipeline.plan import evaluate_stage, target_class
from ..pipeline.settings import DEFAULT_PROTOCOL, PROTOCOLS
from ..pipeline.scheduler import run_grid
from .common import (check_settings_reach, encoder_options, friendly_errors, open_env, profile_from_options,
                     profile_options)


def _number(value):
    return None if isinstance(value, float) and math.isnan(value) else value


@click.command()
@click.option("--encoder", "encoder_path", required=True, metavar="PATH",
              help="a defbench, BadEncoder/MIMIC-release or torchvision ResNet checkpoint, or a timm ViT, open_clip / "
                   "OpenAI CLIP or Hugging Face CLIP tower (.pt or .safetensors)")
@click.option("--downstream", required=True, metavar="DATA",
              help="the downstream task: a dataset name, npz:DIR or folder:DIR (train and test splits)")
@click.option("--trigger", default=None, metavar="FILE|NAME",
              help="patch[:SIZE], a BadEncoder-release .npz (t, tm), an .npz with pattern and mask, or a PNG with "
                   "alpha (the mask); without it, ACC only")
@click.option("--target", type=int, default=None, help="the target class (default: the task's paper target)")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=DEFAULT_PROTOCOL, show_default=True,
              help="how the task uses the encoder: the reference MLP probe, a linear probe, a weighted kNN vote, "
                   "fine-tuning the whole encoder, or CLIP zero-shot from class-name prompts")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@encoder_options
@profile_options
@friendly_errors
def evaluate(encoder_path, downstream, trigger, target, protocol, as_json, image_size, mean, std, profile, sets, seed,
             device, data_dir, verbose):
    """ACC (and ASR with --trigger) of any encoder checkpoint, with the benchmark's probe and settings."""
    prof = profile_from_options(profile, sets, seed)
    check_settings_reach(prof, {})  # no attack or defense runs here
    if target is not None and not trigger:
        raise UserError("--target needs --trigger (the ASR is measured with a trigger)")
    _, info = load_checkpoint(encoder_path, image_size=image_size, mean=mean, std=std)  # every check, first
    if protocol == "zeroshot" and not info.get("text_tower"):
        raise UserError(f"--protocol zeroshot needs a CLIP file that holds its text tower; {encoder_path} "
                        f"({info['layout']} layout) has none")
    size = info["image_size"]
    stamped = load_trigger(trigger, size) if trigger else None
    env = open_env(prof, device, data_dir, verbose)
    if stamped is not None and target is None:
        target = target_class("", downstream, -1)
    train = load_dataset(downstream, "train", env.data_dir, size)
    test = load_dataset(downstream, "test", env.data_dir, size)
    classes = max(train.num_classes, test.num_classes)
    if target is not None and not 0 <= target < classes:
        raise UserError(f"target class {target} is not a class of {downstream} (classes 0..{classes - 1})")
    suspect = Suspect("file", str(encoder_path), info["sha256"], size, tuple(info["mean"]), tuple(info["std"]),
                      info["layout"], stamped.describe() if stamped else None, target, trigger or "")
    stage = evaluate_stage(prof, import_stage(encoder_path, info), downstream, suspect.trigger, target,
                           image_size=size, protocol=protocol, role="external", attack="file", defense="none",
                           suspect=suspect.record())
    outcomes = run_grid([stage], env)
    failed = [o for o in outcomes if o.status in ("failed", "skipped")]
    if failed:
        raise UserError(f"{failed[0].stage.label} failed: {failed[0].error}")
    metrics = json.loads((env.store.path(stage.kind, stage.key) / "metrics.json").read_text())
    status = next(o.status for o in outcomes if o.stage.key == stage.key)
    result = {"encoder": str(encoder_path), "sha256": info["sha256"], "layout": info["layout"], "arch": info["arch"],
              "image_size": size, "mean": info["mean"], "std": info["std"], "sources": info["sources"],
              "downstream": downstream, "protocol": protocol, "trigger": trigger, "target": target,
              "profile": prof.name,
              "seed": prof.seed, "acc": metrics["acc"], "asr": _number(metrics["asr_all"]),
              "asr_excl_target": _number(metrics["asr_excl"]), "n_test": metrics["n_test"],
              "eval_key": stage.key, "cached": status == "cached"}
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    asr = (f"ASR {metrics['asr_all']:.2f} (target {target}, trigger {trigger}; target class excluded "
           f"{metrics['asr_excl']:.2f})" if stamped else "ASR not measured (no --trigger)")
    click.echo(f"{encoder_path}: {downstream} ({protocol}) ACC {metrics['acc']:.2f} {asr}; {metrics['n_test']} test "
               "images, "
               f"{info['layout']} layout, {info['arch']} at {size} px, profile {prof.name}"
               f"{' (cached)' if status == 'cached' else ''}")
