"""``defbench demo``: a first result in a few minutes: one small benchmark cell, every stage said as it runs.

The cell is the profile's ``[studies]`` cell (at ``ci``: BadEncoder on synth-cifar10 pre-training, the synth-stl10
task) with one defense: a clean encoder, a backdoored one, the defense, and ACC / ASR of all three. It runs the
same stages as ``defbench run --profile ci --downstream synth-stl10`` (same keys, same cache), so nothing is special
about it except its size and what it prints: before each stage, whether it is computed now (and about how long
that takes, from ``benchmark/data/demo_seconds.json``) or loaded; after the table, what was computed, what was
loaded, and the scale the numbers come from.

The clean encoder (the longest stage after the attack) ships with defbench: ``benchmark/data/demo_clean_encoder``
is the ``ci`` pre-training artifact exactly as the store keeps it, under its stage key. When today's code plans
that key, the demo puts it into the store and says it was shipped, not computed; when the key differs (the code
has moved on, or another profile or other settings were asked for), the demo computes the encoder like any other
stage. ``tests/test_demo.py`` fails when the shipped key is stale.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import click
from tqdm.auto import tqdm

from ...core import UserError
from ..pipeline.plan import cell_stages, pretrain_stage
from ..pipeline.scheduler import Outcome
from ..pipeline.settings import Profile
from ..pipeline.stages import Env, Stage
from .common import check_datasets, friendly_errors, open_env, profile_from_options
from .run import format_cell_table, run_cell

TIMINGS = "demo_seconds.json"  # benchmark/data/: each demo stage's measured seconds, by stage label
DATASETS = "datasets"  # the timing entry of loading (on a first run: generating) the embedded datasets
SHIPPED = "demo_clean_encoder"  # benchmark/data/: the ci clean encoder as the store keeps it (encoder.pt, meta.json)


def shipped_folder() -> Path:
    return Path(str(resources.files("defbench.benchmark").joinpath("data", SHIPPED)))


def shipped_key(folder: Path | None = None) -> str | None:
    """The stage key of the shipped clean encoder, or None when none ships."""
    meta = (folder or shipped_folder()) / "meta.json"
    return json.loads(meta.read_text())["key"] if meta.is_file() else None


def install_shipped(stage: Stage, env: Env, folder: Path | None = None) -> bool:
    """Put the shipped clean encoder into the store as ``stage``'s artifact, when it is that stage's (same key)
    and the store does not hold it yet. True when it did: the stage is then loaded, not computed."""
    folder = folder or shipped_folder()
    if shipped_key(folder) != stage.key or env.store.exists(stage.kind, stage.key):
        return False
    final = env.store.path(stage.kind, stage.key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{stage.key}-shipped-{os.getpid()}"
    shutil.copytree(folder, tmp)
    os.replace(tmp, final)  # whole or not at all, as the store writes its own artifacts
    return True


def from_shipped(stage: Stage, env: Env, folder: Path | None = None) -> bool:
    """Whether the store's artifact of ``stage`` is the shipped one (put there by this or an earlier demo)."""
    meta = (folder or shipped_folder()) / "meta.json"
    return (shipped_key(folder) == stage.key and env.store.exists(stage.kind, stage.key)
            and env.store.read_meta(stage.kind, stage.key) == json.loads(meta.read_text()))


def ship_clean_encoder_to(stage: Stage, env: Env, folder: Path) -> None:
    """(maintainers) Copy the store's clean encoder of ``stage`` to ``folder``, the file the demo ships."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(env.store.path(stage.kind, stage.key), folder)


def expected_seconds(profile: Profile, path: Path | None = None) -> dict[str, float]:
    """Stage label -> seconds a recorded demo run took, when the recording is of this profile without overrides."""
    source = path or resources.files("defbench.benchmark").joinpath("data", TIMINGS)
    if not source.is_file():  # nothing recorded yet: the demo says so for each stage
        return {}
    recorded = json.loads(source.read_text())
    if recorded.get("profile") != profile.name or profile.overrides:
        return {}
    return {label: float(s) for label, s in recorded.get("stages", {}).items()}


def duration(seconds: float) -> str:
    """``~40 s`` or ``~3 min``: how long, to the precision a user plans with."""
    return f"~{max(1, round(seconds / 5) * 5)} s" if seconds < 90 else f"~{round(seconds / 60)} min"


class StageReporter:
    """Says each stage on stderr as the scheduler reaches it: computed now (with its expected time) or loaded."""

    def __init__(self, env: Env, expected: dict[str, float], threads: int, shipped: set[str] = frozenset()):
        self.env, self.expected, self.threads, self.shipped = env, expected, threads, shipped
        self.started: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def __call__(self, stage: Stage, position: int, total: int, outcome: Outcome | None) -> None:
        if outcome is None:
            self.cached[stage.key] = self.env.store.exists(stage.kind, stage.key)
            self.started[stage.key] = time.perf_counter()
            say(f"[{position}/{total}] {stage.label}: {self._plan(stage)}")
        elif outcome.status == "ran":
            say(f"      done in {duration(time.perf_counter() - self.started[stage.key])[1:]}")

    def _plan(self, stage: Stage) -> str:
        if stage.key in self.shipped:
            return f"loaded: shipped with defbench (benchmark/data/{SHIPPED}, stage key {stage.key}), not computed here"
        if self.cached[stage.key]:
            return "loaded from the cache (computed by an earlier run)"
        seconds = self.expected.get(stage.label)
        if seconds is None:
            return "computing now (no expected time recorded for this stage)"
        return f"computing now, expected {duration(seconds)} on {self.threads} CPU threads"


def say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def plan_demo(prof: Profile, defense: str) -> tuple[str, str, str, dict[str, Stage]]:
    """(attack, pre-training set, task, the cell's evaluate stages by role): the profile's [studies] cell."""
    attack, pretrain = prof.studies.attack, prof.studies.pretrain or (prof.grid.pretrain or [""])[0]
    if not pretrain or not prof.studies.downstream:
        raise UserError(f"profile {prof.name!r} names no studies cell ([studies] pretrain and downstream); "
                        "run `defbench run` instead")
    task = prof.studies.downstream[0]
    return attack, pretrain, task, cell_stages(prof, attack, defense, pretrain, task)


def scale_line(prof: Profile) -> str:
    """What the numbers are worth: the profile's scale, read from its settings (never typed here)."""
    pre = prof.pretrain
    images = f"{pre.max_images:,} images" if pre.max_images else "the whole set"
    return (f"Scale: profile {prof.name} ({prof.description}): a width-{prof.encoder.width} "
            f"{prof.encoder.arch} pre-trained {pre.epochs} epochs on {images}, a probe of {prof.evaluate.epochs} "
            f"epochs. One seed is one draw; at this scale the numbers show the mechanics, not the paper's.")


def summary_lines(outcomes: list[Outcome], prof: Profile, attack: str, pretrain: str, task: str,
                  shipped: set[str] = frozenset()) -> list[str]:
    """What was computed now, what was loaded (and from where), the scale, and the command that runs the same."""
    ran = [o.stage.label for o in outcomes if o.status == "ran"]
    came = [o.stage.label for o in outcomes if o.status == "cached" and o.stage.key in shipped]
    loaded = [o.stage.label for o in outcomes if o.status == "cached" and o.stage.key not in shipped]
    return [f"Computed now: {', '.join(ran) or 'nothing'}.",
            f"Shipped with defbench, not computed here: {', '.join(came) or 'nothing'}.",
            f"Loaded from the cache of an earlier run: {', '.join(loaded) or 'nothing'}.",
            scale_line(prof),
            f"The same stages: `defbench run --profile {prof.name} --attack {attack} --pretrain {pretrain} "
            f"--downstream {task}`. The full cell (every task of the family, profile tiny): `defbench run`.",
            "Next steps: docs/getting-started.md."]


def record_timings(path: Path, prof: Profile, outcomes: list[Outcome], threads: int, data_seconds: float) -> None:
    """Record this run's stage times (a run that computed every stage, the datasets generated) as the demo's
    expected times."""
    if any(o.status != "ran" for o in outcomes):
        raise UserError("--write-timings needs a run that computes every stage: point DEFBENCH_HOME at an empty "
                        "folder and run again")
    stages = {DATASETS: round(data_seconds, 1), **{o.stage.label: round(o.seconds, 1) for o in outcomes}}
    path.write_text(json.dumps({"profile": prof.name, "cpu_threads": threads, "stages": stages}, indent=1) + "\n")


@click.command()
@click.option("--defense", default="ft", show_default=True, help="the defense of the cell")
@click.option("--profile", default="ci", show_default=True, help="a profile with a [studies] cell")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--write-timings", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="(maintainers) record this run's stage times as the expected times, e.g. "
                   "benchmark/data/demo_seconds.json; needs an empty DEFBENCH_HOME")
@click.option("--ship-clean-encoder", is_flag=True,
              help=f"(maintainers) copy this run's clean encoder to benchmark/data/{SHIPPED}, the one the demo ships")
@friendly_errors
def demo(defense, profile, device, write_timings, ship_clean_encoder):
    """A first result in minutes: one small cell (clean, backdoored and defended encoder; ACC / ASR of each)."""
    import torch
    prof = profile_from_options(profile, (), None)
    attack, pretrain, task, stages = plan_demo(prof, defense)
    env = open_env(prof, device, None)
    threads, expected = torch.get_num_threads(), expected_seconds(prof)
    say(f"defbench demo: {attack} vs {defense}, pre-trained on {pretrain}, task {task}, profile {prof.name}; "
        f"state in {env.store.root.parent}")
    say(f"[0] the datasets {pretrain} and {task}: loaded, or generated and cached on a first run"
        + (f" (expected {duration(expected[DATASETS])} then)" if DATASETS in expected else ""))
    started = time.perf_counter()
    check_datasets(prof, env, pretrain, [task], {task: stages["undefended"].spec["target"]},
                   clean_set=defense != "none")
    data_seconds = time.perf_counter() - started
    say(f"      done in {duration(data_seconds)[1:]}")
    clean = pretrain_stage(prof, pretrain)
    # a maintainer's recording run computes every stage; otherwise the shipped clean encoder is used when current
    shipped = set()
    if not (write_timings or ship_clean_encoder):
        install_shipped(clean, env)
        if from_shipped(clean, env):
            shipped.add(clean.key)
        elif shipped_key() not in (None, clean.key) and not env.store.exists(clean.kind, clean.key):
            say("The clean encoder shipped with defbench is not this cell's (its stage key differs: another profile, "
                "other settings or changed code): computing it.")
    results, outcomes = run_cell(prof, env, attack, defense, pretrain, {task: stages},
                                 on_stage=StageReporter(env, expected, threads, shipped))
    click.echo(format_cell_table(results, prof, attack, defense, pretrain, outcomes))
    click.echo("\n".join(summary_lines(outcomes, prof, attack, pretrain, task, shipped)))
    if write_timings:
        record_timings(write_timings, prof, outcomes, threads, data_seconds)
    if ship_clean_encoder:
        ship_clean_encoder_to(clean, env, shipped_folder())
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)
