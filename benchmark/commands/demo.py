"""``defbench demo``: a first result in a few minutes: one small benchmark cell, every stage said as it runs.

The cell is the profile's ``[studies]`` cell (at ``ci``: BadEncoder on synth-cifar10 pre-training, the synth-stl10
task) with one defense: a clean encoder pre-trained, a backdoored one, the defense, and ACC / ASR of all three.
It runs the same stages as ``defbench run --profile ci --downstream synth-stl10`` (same keys, same cache), so
nothing is special about it except its size and what it prints: before each stage, whether it is computed now
(and about how long that takes, from ``benchmark/data/demo_seconds.json``) or loaded from the cache; after the
table, what was computed and what was loaded, and the scale the numbers come from.
"""
from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path

import click
from tqdm.auto import tqdm

from ...core import UserError
from ..pipeline.plan import cell_stages
from ..pipeline.scheduler import Outcome
from ..pipeline.settings import Profile
from ..pipeline.stages import Env, Stage
from .common import check_datasets, friendly_errors, open_env, profile_from_options
from .run import format_cell_table, run_cell

TIMINGS = "demo_seconds.json"  # benchmark/data/: each demo stage's measured seconds, by stage label


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

    def __init__(self, env: Env, expected: dict[str, float], threads: int):
        self.env, self.expected, self.threads = env, expected, threads
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


def summary_lines(outcomes: list[Outcome], prof: Profile, attack: str, pretrain: str, task: str) -> list[str]:
    ran = [o.stage.label for o in outcomes if o.status == "ran"]
    loaded = [o.stage.label for o in outcomes if o.status == "cached"]
    return [f"Computed now: {', '.join(ran) or 'nothing'}.",
            f"Loaded from the cache ({len(loaded)}): {', '.join(loaded) or 'nothing'}.",
            scale_line(prof),
            f"The same stages: `defbench run --profile {prof.name} --attack {attack} --pretrain {pretrain} "
            f"--downstream {task}`. The full cell (every task of the family, profile tiny): `defbench run`.",
            "Next steps: docs/getting-started.md."]


def record_timings(path: Path, prof: Profile, outcomes: list[Outcome], threads: int) -> None:
    """Record this run's stage times (a run that computed every stage) as the demo's expected times."""
    if any(o.status != "ran" for o in outcomes):
        raise UserError("--write-timings needs a run that computes every stage: point DEFBENCH_HOME at an empty "
                        "folder and run again")
    stages = {o.stage.label: round(o.seconds, 1) for o in outcomes}
    path.write_text(json.dumps({"profile": prof.name, "cpu_threads": threads, "stages": stages}, indent=1) + "\n")


@click.command()
@click.option("--defense", default="ft", show_default=True, help="the defense of the cell")
@click.option("--profile", default="ci", show_default=True, help="a profile with a [studies] cell")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--write-timings", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="(maintainers) record this run's stage times as the expected times, e.g. "
                   "benchmark/data/demo_seconds.json; needs an empty DEFBENCH_HOME")
@friendly_errors
def demo(defense, profile, device, write_timings):
    """A first result in minutes: one small cell (clean, backdoored and defended encoder; ACC / ASR of each)."""
    import torch
    prof = profile_from_options(profile, (), None)
    attack, pretrain, task, stages = plan_demo(prof, defense)
    env = open_env(prof, device, None)
    check_datasets(prof, env, pretrain, [task], {task: stages["undefended"].spec["target"]},
                   clean_set=defense != "none")
    threads = torch.get_num_threads()
    say(f"defbench demo: {attack} vs {defense}, pre-trained on {pretrain}, task {task}, profile {prof.name}; "
        f"state in {env.store.root.parent}")
    results, outcomes = run_cell(prof, env, attack, defense, pretrain, {task: stages},
                                 on_stage=StageReporter(env, expected_seconds(prof), threads))
    click.echo(format_cell_table(results, prof, attack, defense, pretrain, outcomes))
    click.echo("\n".join(summary_lines(outcomes, prof, attack, pretrain, task)))
    if write_timings:
        record_timings(write_timings, prof, outcomes, threads)
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)
