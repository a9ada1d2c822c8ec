"""fp32 against bf16 autocast on one ci cell: what the precision does to the defenses' own arithmetic.

The ``paper`` profile runs fp32 (the references' arithmetic); ``--set encoder.precision=bf16`` runs the backbone
under bf16 autocast. This script measures what that choice changes where a method compares a number against a
threshold or weights its loss by an estimate:

- the ci BadEncoder suspect (synth-cifar10 -> synth-stl10, seed 0) is built once through the pipeline in fp32
  and loaded twice with the same weights, once per precision (only ``encoder.precision`` differs), so the
  comparison is free of the drift two trainings in different roundings show;
- in each precision: the undefended encoder's ACC / ASR; DECREE at its ci settings (inversion and mitigation)
  with its success test (|mean off-diagonal cosine| > 0.99), PL1 and the best trigger's cosine; MIMIC at its ci
  settings with the MI estimates it records and its beta; MINE's estimate on the suspect and on a fresh student
  (the two places ``mimic.mi_source`` can name). Every encoder is probed in its own precision, as a bf16 grid
  would; the probe, the clean set and every seed are the same in both.

Prints markdown tables, a column per (precision, seed). Run (CPU; ``--device cuda`` measures the GPU path)::

    DEFBENCH_HOME=$(mktemp -d) OMP_NUM_THREADS=1 python tests/bench/precision_effect.py --seeds 0,1

``--seeds 0,1`` repeats the defenses, probes and MINE runs with a second seed on the same suspect: the yardstick
for the precision's effect (what a seed alone moves).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from defbench.attacks import trigger_from_description
from defbench.benchmark.pipeline.evaluate import evaluate_encoder
from defbench.benchmark.pipeline.inputs import clean_subset, dataset_split
from defbench.benchmark import paths
from defbench.benchmark.pipeline.plan import attack_stage, pretrain_stage
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.scheduler import run_grid
from defbench.benchmark.pipeline.settings import load_profile
from defbench.benchmark.pipeline.stages import Env, load_stage_encoder
from defbench.benchmark.pipeline.store import ArtifactStore
from defbench.defenses import DEFENSES, CleanData
from defbench.defenses.mimic import estimate_stage_mi
from defbench.encoders import RunContext, build_encoder

PRETRAIN, TASK = "synth-cifar10", "synth-stl10"


def in_precision(encoder, precision: str):
    """The same weights in an encoder whose backbone runs in ``precision``."""
    twin = build_encoder(dataclasses.replace(encoder.config, precision=precision)).to(next(encoder.parameters()).device)
    twin.load_state_dict(encoder.state_dict())
    return twin.eval()


def build_cell(profile, env):
    """The ci suspect (fp32, through the pipeline: cached under DEFBENCH_HOME), its trigger, target and data."""
    suspect = attack_stage(profile, "badencoder", PRETRAIN, TASK)
    outcomes = run_grid([pretrain_stage(profile, PRETRAIN), suspect], env, show_progress=False)
    failed = [o.error for o in outcomes if o.status not in ("ran", "cached")]
    if failed:
        raise SystemExit(f"building the ci suspect failed: {failed}")
    spec = {"dataset": PRETRAIN, "fraction": profile.clean.fraction, "max_images": profile.clean.max_images,
            "image_size": profile.encoder.image_size, "seed": profile.seed}
    clean, _ = clean_subset(env.data_dir, spec)
    size, cfg = profile.encoder.image_size, profile.evaluate
    task = (dataset_split(env.data_dir, TASK, "train", size, cfg.max_train, profile.seed),
            dataset_split(env.data_dir, TASK, "test", size, cfg.max_test, profile.seed))
    encoder = load_stage_encoder(env, suspect).to(env.device)
    return encoder, trigger_from_description(suspect.spec["trigger"]), suspect.spec["target"], clean, task


def run_defense(name: str, encoder, clean, profile, ctx, seed: int) -> tuple[object, dict, float]:
    cfg, _ = profile.component_config("defense", name)
    ctx.reseed(seed)
    started = time.perf_counter()
    defended = DEFENSES.get(name).fn(encoder.clone(), CleanData(clean), cfg, ctx)
    return defended.eval(), dict(ctx.records), time.perf_counter() - started


def measure(precision: str, suspect, trigger, target, clean, task, profile, device, seed: int) -> dict:
    """Every number of one precision's column."""
    ctx = RunContext(device=device, show_progress=False)
    encoder = in_precision(suspect, precision)
    probe = lambda enc: evaluate_encoder(enc, *task, trigger, target, profile.evaluate, ctx.reseed(seed))  # noqa: E731
    out = {"undefended": probe(encoder)}
    for name in ("decree", "mimic"):
        ctx.records = {}
        defended, records, seconds = run_defense(name, encoder, clean, profile, ctx, seed)
        out[name] = {**probe(defended), "records": records, "seconds": seconds}
    mimic_cfg, _ = profile.component_config("defense", "mimic")
    for network in ("teacher", "student"):
        ctx.reseed(seed)
        fresh = encoder.empty_like()  # drawn first in both cases, as mimic does
        target_net = encoder if network == "teacher" else fresh
        est = estimate_stage_mi(target_net, clean, mimic_cfg, ctx)
        out[f"mine_{network}"] = {k: (v["mi"], v["raw"]) for k, v in est.items()}
    return out


def _f(value, digits=2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def report(results: dict) -> None:
    """Markdown tables, one column per measured (precision, seed)."""
    cols = list(results)
    head = "| {} | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)

    def row(label, cells):
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n" + head.format("encoder: ACC / ASR (%)"))
    for name in ("undefended", "decree", "mimic"):
        row(name, [f"{_f(results[c][name]['acc'])} / {_f(results[c][name]['asr_all'])}" for c in cols])
    print("\n" + head.format("DECREE inversion"))
    for key, label in (("decree_found", "success test passed (found)"), ("decree_pl1", "PL1"),
                       ("decree_cosine", "best trigger's mean cosine"), ("decree_final_cosine", "last update's cosine"),
                       ("decree_steps", "updates"), ("decree_verdict", "verdict (PL1 < 0.1)")):
        row(label, [_f(results[c]["decree"]["records"].get(key), 4) for c in cols])
    print("\n" + head.format("MINE estimate, nats (clipped / raw)"))
    for network in ("teacher", "student"):
        for layer in results[cols[0]][f"mine_{network}"]:
            row(f"{network} {layer}", ["{:.4f} / {:.4f}".format(*results[c][f"mine_{network}"][layer]) for c in cols])
    print("\n" + head.format("MIMIC"))
    row("beta (layer1..layer4)", [", ".join(f"{v:.0f}" for v in results[c]["mimic"]["records"]["beta"].values())
                                  for c in cols])
    row("last epoch [L0, L1, L2]", [str([round(v, 4) for v in results[c]["mimic"]["records"]["loss_history"][-1]])
                                    for c in cols])
    for name in ("decree", "mimic"):
        row(f"{name} seconds", [f"{results[c][name]['seconds']:.0f}" for c in cols])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the defenses, probes and MINE "
                        "(the suspect is always seed 0's): a second seed shows what a seed alone moves")
    args = parser.parse_args()
    device = torch.device(args.device)
    profile = load_profile("ci")
    env = Env(ArtifactStore(paths.artifacts_dir()), ResultsDB(paths.results_db()), paths.data_dir(), device)
    suspect, trigger, target, clean, task = build_cell(profile, env)
    results = {f"{p}, seed {seed}": measure(p, suspect, trigger, target, clean, task, profile, device, seed)
               for seed in (int(v) for v in args.seeds.split(",")) for p in args.precisions.split(",")}
    print(f"ci profile, BadEncoder {PRETRAIN} -> {TASK} (suspect: seed 0), device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    report(results)


if __name__ == "__main__":
    main()
