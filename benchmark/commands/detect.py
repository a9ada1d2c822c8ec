"""``defbench detect``: is this encoder backdoored? A registered detector (default DECREE) on clean images.

``defbench detect --calibrate --profile P --seeds 0,1,2`` instead derives the detector's threshold from the
profile's *clean* encoders of those seeds (pre-trained through the pipeline, cached): no attacked encoder,
trigger or ASR is involved.
"""
from __future__ import annotations

import json
import math

import click

from ...core import UserError
from ...defenses import DETECTORS
from ...encoders import RunContext, pick_device
from ...encoders.tower_checkpoints import load_any_checkpoint as load_checkpoint
from ...core import paths
from ..analysis.detect import DEFAULT_DATA, calibrate, detection_images, run_detection
from ..pipeline.plan import pretrain_stage
from ..pipeline.scheduler import run_grid
from ..pipeline.settings import load_profile
from ..pipeline.stages import load_stage_encoder
from .common import (check_datasets, check_home, check_seed, check_settings_reach, encoder_options, friendly_errors,
                     names, open_env, profile_from_options, where)


@click.command()
@click.option("--encoder", "encoder_path", default=None, metavar="PATH",
              help="encoder checkpoint: defbench, BadEncoder/MIMIC-release, torchvision ResNet, timm ViT, open_clip / "
                   "OpenAI CLIP or Hugging Face CLIP tower (.pt or .safetensors)")
@click.option("--detector", default="decree", show_default=True, help="a registered detector (defbench list detectors)")
@click.option("--profile", default="tiny", show_default=True,
              help="whose detector settings (budget, threshold): paper, tiny, ci or a .toml path")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override a setting, e.g. --set defense.decree.inv_max_steps=500 (repeatable)")
@click.option("--data", default=DEFAULT_DATA, show_default=True,
              help="clean images to invert on: a dataset name (pre-training split), npz:PATH or folder:PATH")
@click.option("--images", "n_images", type=int, default=0,
              help="how many random images to use (default: the profile's clean-set size)")
@click.option("--data-dir", default=None, help="real datasets live here (default: $DEFBENCH_DATA)")
@click.option("--threshold", type=float, default=None,
              help="the decision threshold (default: the profile's calibrated value)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the image subset and the detector")
@click.option("--restarts", type=click.IntRange(min=1, max=1000), default=3, show_default=True,
              help="runs from different random starts; the most backdoor-like score counts")
@click.option("--calibrate", "calibrate_seeds", default="", metavar="SEEDS",
              help="instead of screening a file: calibrate the threshold on the profile's clean encoders of these "
                   "seeds (e.g. 0,1,2)")
@click.option("--quantile", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="with --calibrate: the share of clean encoders' scores below the threshold")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@encoder_options
@friendly_errors
def detect(encoder_path, detector, profile, sets, data, n_images, data_dir, threshold, seed, restarts,
           calibrate_seeds, quantile, device, as_json, image_size, mean, std):
    """Run a detector on an encoder and say whether it looks backdoored (or --calibrate its threshold)."""
    if n_images < 0 or n_images == 1:
        raise UserError(f"--images must be at least 2 (or 0 for the profile's clean-set size), got {n_images}")
    check_seed(seed)
    if threshold is not None and not math.isfinite(threshold):
        raise UserError(f"--threshold must be a finite number, got {threshold}")
    if not 0 <= quantile <= 1:  # click's FloatRange lets nan through
        raise UserError(f"--quantile must be between 0 and 1, got {quantile}")
    found = DETECTORS.get(detector)
    prof = profile_from_options(profile, sets, None)
    check_settings_reach(prof, {"defense": {found.defense}})
    cfg = prof.defense_config(found.defense)
    if calibrate_seeds:
        return _calibrate(prof, found, cfg, names(calibrate_seeds, "--calibrate"), data, n_images, data_dir, seed,
                          restarts, quantile, device, as_json)
    if not encoder_path:
        raise UserError("give --encoder PATH (or --calibrate SEEDS to calibrate the threshold)")
    encoder, info = load_checkpoint(encoder_path, image_size=image_size, mean=mean, std=std)
    ctx = RunContext(device=pick_device(device)).reseed(seed)
    encoder = encoder.to(ctx.device).eval()
    check_home(write=False)  # generated datasets are cached there (a read-only home with them cached is fine)
    with where(f"cannot use DEFBENCH_HOME={paths.home()}", "point DEFBENCH_HOME at a writable folder"):
        images = detection_images(data, n_images, encoder.config.image_size, paths.data_dir(data_dir), seed,
                                  prof.clean.fraction, prof.clean.max_images)
    result = run_detection(detector, encoder, images, cfg, ctx, threshold, restarts)
    result.update(encoder=str(encoder_path), profile=prof.name, data=data,
                  checkpoint={k: info[k] for k in ("sha256", "layout", "arch", "image_size", "mean", "std", "sources")})
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(f"{encoder_path}: {detector} {result['score_name']} {result['score']:.4f} (most backdoor-like of "
               f"{len(result['restarts'])} starts: {result['restarts']}; {len(images)} {data} images; "
               f"{info['layout']} layout, {info['arch']} at {info['image_size']} px; {result['seconds']:.1f} s)")
    below = result["score"] < result["threshold"]
    click.echo(f"verdict: {result['verdict']} ({result['score_name']} {'<' if below else '>='} threshold "
               f"{result['threshold']:g})")


def _calibrate(prof, found, cfg, seeds, data, n_images, data_dir, seed, restarts, quantile, device, as_json):
    try:
        seed_list = [check_seed(int(s), "--calibrate") for s in seeds]
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"--calibrate expects comma-separated integer seeds, got {','.join(seeds)!r}") from None
    pretrain = prof.grid.pretrain[0] if prof.grid.pretrain else data
    stages = [pretrain_stage(load_profile(prof.origin, {**prof.overrides, "seed": s}), pretrain) for s in seed_list]
    env = open_env(prof, device, data_dir)
    check_datasets(prof, env, pretrain, [], clean_set=False)
    detection_images(data, n_images, prof.encoder.image_size, env.data_dir, seed, prof.clean.fraction,
                     prof.clean.max_images)  # the images to invert on: checked before any encoder is trained
    outcomes = run_grid(stages, env)
    if any(o.status != "ran" and o.status != "cached" for o in outcomes):
        raise UserError("pre-training a clean encoder failed: " + "; ".join(o.error for o in outcomes if o.error))
    scores = []
    for s, stage in zip(seed_list, stages):
        encoder = load_stage_encoder(env, stage).to(env.device).eval()
        ctx = RunContext(device=env.device).reseed(seed)
        images = detection_images(data, n_images, encoder.config.image_size, env.data_dir, seed,
                                  prof.clean.fraction, prof.clean.max_images)
        result = run_detection(found.name, encoder, images, cfg, ctx, None, restarts)
        scores.append(result["score"])
        if not as_json:
            click.echo(f"clean encoder, {pretrain}, seed {s}: score {result['score']:.4f} {result['restarts']}")
    value = calibrate(scores, quantile, found.backdoored_if_below)
    out = {"detector": found.name, "profile": prof.name, "pretrain": pretrain, "seeds": seed_list, "scores": scores,
           "quantile": quantile, "threshold": value, "setting": f"defense.{found.defense}.{found.threshold_field}"}
    if as_json:
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(f"threshold {value:.4f} = the {quantile:g} quantile of {len(scores)} clean encoders' scores; "
                   f"set it with {out['setting']}")
