"""Running a set of stages in dependency order, skipping what is already stored."""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..encoders.runtime import log, progress_enabled
from .stages import Env, Stage, record_evaluation, run_stage


@dataclass
class Outcome:
    stage: Stage
    status: str  # ran | cached | failed | skipped
    seconds: float = 0.0
    error: str = ""


def expand(stages: list[Stage]) -> list[Stage]:
    """All stages and their inputs, each key once, inputs before their users."""
    order: list[Stage] = []
    seen: set[str] = set()

    def visit(stage: Stage) -> None:
        if stage.key in seen:
            return
        for dep in stage.deps:
            visit(dep)
        seen.add(stage.key)
        order.append(stage)

    for stage in stages:
        visit(stage)
    return order


def run_one(stage: Stage, env: Env) -> Outcome:
    """Run a stage unless its artifact exists (checked again under the stage's lock)."""
    started = time.perf_counter()
    if not env.store.exists(stage.kind, stage.key):
        with env.store.lock(stage.kind, stage.key):
            if not env.store.exists(stage.kind, stage.key):
                run_stage(stage, env)
                status = "ran"
            else:
                status = "cached"
    else:
        status = "cached"
    record_row(stage, env)
    return Outcome(stage, status, time.perf_counter() - started)


def record_row(stage: Stage, env: Env) -> None:
    """The results row of a finished evaluate/measure stage (idempotent: restores a lost row)."""
    if stage.kind == "evaluate":
        record_evaluation(stage, env)
    elif stage.kind == "measure":
        from .measures import record_measurement
        record_measurement(stage, env)


def record_rows(stages: list[Stage], env: Env) -> None:
    """Rows for the stages that ``expand`` dropped because another stage has their key: the key ran once
    (and ``run_one`` wrote that stage's row), but each labelling -- a grid column, a study arm -- is a row."""
    ran = {id(stage) for stage in expand(stages)}
    for stage in stages:
        if id(stage) not in ran and stage.kind in ("evaluate", "measure") and env.store.exists(stage.kind, stage.key):
            record_row(stage, env)


def execute(stages: list[Stage], env: Env, show_progress: bool | None = None) -> list[Outcome]:
    """Sequential execution; a failing stage fails only the stages that need it."""
    order = expand(stages)
    failed: set[str] = set()
    outcomes = []
    show = progress_enabled() if show_progress is None else show_progress
    bar = tqdm(order, desc="stages", disable=not show, dynamic_ncols=True)
    for stage in bar:
        bar.set_postfix_str(stage.label[:60])
        if any(dep.key in failed for dep in stage.deps):
            failed.add(stage.key)
            outcomes.append(Outcome(stage, "skipped", error="an input stage failed"))
            continue
        try:
            outcomes.append(run_one(stage, env))
        except KeyboardInterrupt:
            raise
        except Exception as err:
            failed.add(stage.key)
            log.error("stage %s failed: %s", stage.label, err)
            log.debug("%s", traceback.format_exc())
            outcomes.append(Outcome(stage, "failed", error=f"{type(err).__name__}: {err}"))
        log.info("%-7s %s", outcomes[-1].status, stage.label)
    record_rows(stages, env)
    return outcomes
