"""The one way stages run: expand a list of stages into its DAG and execute it, cached and resumable.

``defbench run``, ``grid``, ``report`` and the golden subset all call
:func:`run_grid` with the stages they planned (``plan.py``); their inputs
(pre-training, attacks, defenses) follow from the stage DAG, each distinct key
once. Executors:

- ``local`` with ``workers=1``: in this process;
- ``local`` with ``workers=N``: a pool of N processes, each pinned to one
  device: on CUDA each worker gets its own ``CUDA_VISIBLE_DEVICES`` (worker i
  on GPU i mod G, :func:`.device.assign_gpus`), else the CPU with the cores shared;
- ``submitit``: each ready stage becomes a submitit job (SLURM when ``sbatch``
  exists, otherwise submitit's local executor); ``submitit-local`` forces
  the local executor (what the tests use).

In every case a stage is submitted only when its inputs exist, an existing
artifact is never recomputed, and all workers write to the one SQLite file.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...encoders.runtime import log, progress_enabled
from .device import WorkerDevice, assign_gpus, pin_worker
from .stages import Env, NonFiniteError, Stage, makes_encoder, record_row, run_stage


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
    """Run a stage unless its artifact exists (checked again under the stage's lock), then record its row.

    A failure is an Outcome, not an exception: independent stages go on, and the summary says it. A training
    that diverges (NaN or inf) is recorded, and on the same device reported again without recomputing."""
    started = time.perf_counter()
    status = "cached"
    try:
        if not env.store.exists(stage.kind, stage.key):
            with env.store.lock(stage.kind, stage.key):
                if not env.store.exists(stage.kind, stage.key):
                    record = diverged_before(stage, env)
                    if record:
                        raise NonFiniteError(f"{record.get('error', stage.label)} (recorded "
                                             f"{record.get('recorded_at', '?')}: the same settings diverge again on "
                                             f"{env.device}; to retry, delete "
                                             f"{env.store.divergence_path(stage.kind, stage.key)})")
                    try:
                        run_stage(stage, env)
                    except NonFiniteError as err:  # an evaluation of finite weights that overflows is not recorded
                        if makes_encoder(stage):
                            env.store.record_divergence(stage.kind, stage.key, {
                                "label": stage.label, "error": str(err), "device": str(env.device)})
                        raise
                    status = "ran"
        record_row(stage, env)
    except Exception as err:
        return Outcome(stage, "failed", error=f"{type(err).__name__}: {err}")
    return Outcome(stage, status, time.perf_counter() - started)


def diverged_before(stage: Stage, env: Env) -> dict | None:
    """The record of this stage diverging on this device before (same key: same settings, seed and code)."""
    record = env.store.divergence(stage.kind, stage.key)
    return record if record and record.get("device") == str(env.device) else None


def diverged_stages(stages: list[Stage], store) -> frozenset[str]:
    """Keys of ``stages`` whose own training or an input's (at any depth) diverged, on whatever device."""
    seen: dict[str, bool] = {}

    def diverged(stage: Stage) -> bool:
        if stage.key not in seen:
            seen[stage.key] = bool(makes_encoder(stage) and store.divergence(stage.kind, stage.key)) \
                or any(diverged(dep) for dep in stage.deps)
        return seen[stage.key]
    return frozenset(stage.key for stage in stages if diverged(stage))


def record_rows(stages: list[Stage], env: Env) -> None:
    """Rows for the stages that ``expand`` dropped because another stage has their key: the key ran once
    (and ``run_one`` wrote that stage's row), but each labelling -- a grid column, a study arm -- is a row."""
    ran = {id(stage) for stage in expand(stages)}
    for stage in stages:
        if id(stage) not in ran and stage.kind in ("evaluate", "measure") and env.store.exists(stage.kind, stage.key):
            record_row(stage, env)


# ------------------------------------------------------------------ workers

_WORKER_DEVICE: torch.device | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Make this process end when process ``parent`` does (a killed ``defbench grid`` must not leave workers
    holding gigabytes at PPID 1): on Linux the kernel sends SIGTERM at the parent's death
    (``prctl(PR_SET_PDEATHSIG)``); everywhere, a daemon thread exits once the parent is gone (the process is
    re-parented, so ``getppid`` changes)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the thread below still watches
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(devices, threads: int, parent: int | None = None) -> None:
    global _WORKER_DEVICE
    if parent is not None:
        exit_with_parent(parent)
    assigned = devices.get()
    _WORKER_DEVICE = pin_worker(assigned if isinstance(assigned, WorkerDevice) else WorkerDevice(str(assigned)))
    torch.set_num_threads(threads)
    os.environ["DEFBENCH_PROGRESS"] = "0"  # one bar per process would garble the terminal


def _run_in_worker(stage: Stage, env: Env) -> Outcome:
    env = Env(env.store, env.db, env.data_dir, _WORKER_DEVICE or env.device)
    return run_one(stage, env)


def run_stage_job(stage: Stage, env: Env) -> Outcome:
    """Entry point of a submitit job: one stage, on whatever device the job got."""
    from ...encoders import pick_device
    env = Env(env.store, env.db, env.data_dir, pick_device("auto") if env.device.type == "cuda" else env.device)
    return run_one(stage, env)


def worker_devices(env: Env, workers: int) -> list[WorkerDevice]:
    return assign_gpus(env.device, workers)


# ------------------------------------------------------------------ scheduling

class _Scheduler:
    """Submits every stage whose inputs are done; collects outcomes; tracks failures."""

    def __init__(self, stages: list[Stage], show_progress: bool):
        self.pending = list(expand(stages))
        self.total = len(self.pending)
        self.done: dict[str, Outcome] = {}
        self.bar = tqdm(total=self.total, desc="grid", unit="stage", disable=not show_progress,
                        dynamic_ncols=True)

    def _inputs(self, stage: Stage) -> str:
        """"failed" (an input failed or was skipped), "done" (every input finished) or "waiting"."""
        deps = [self.done.get(d.key) for d in stage.deps]
        if any(o is not None and o.status in ("failed", "skipped") for o in deps):
            return "failed"
        return "done" if all(o is not None for o in deps) else "waiting"

    def ready(self) -> list[Stage]:
        """Every pending stage whose inputs are done (for the parallel executors); skips the doomed ones."""
        out, still = [], []
        for stage in self.pending:
            state = self._inputs(stage)
            if state == "failed":
                self.finish(Outcome(stage, "skipped", error="an input stage failed"))
            else:
                (out if state == "done" else still).append(stage)
        self.pending = still
        return out

    def next_ready(self) -> Stage | None:
        """The first pending stage (in ``expand`` order) whose inputs are done, or None: run one at a time,
        a cell is evaluated as soon as its encoder exists, so a stopped grid leaves finished cells."""
        i = 0
        while i < len(self.pending):  # users come after their inputs, so a skip never reaches back
            state = self._inputs(self.pending[i])
            if state == "failed":
                self.finish(Outcome(self.pending.pop(i), "skipped", error="an input stage failed"))
            elif state == "done":
                return self.pending.pop(i)
            else:
                i += 1
        return None

    def finish(self, outcome: Outcome) -> None:
        self.done[outcome.stage.key] = outcome
        self.bar.update(1)
        self.bar.set_postfix_str(f"{outcome.status} {outcome.stage.label}"[:70])
        if outcome.status == "failed":
            log.error("defbench: stage failed: %s: %s", outcome.stage.label, outcome.error)
        else:
            log.info("%-7s %s (%.0f s) [%d/%d]", outcome.status, outcome.stage.label, outcome.seconds,
                     len(self.done), self.total)

    def close(self) -> list[Outcome]:
        self.bar.close()
        return list(self.done.values())


def run_grid(stages: list[Stage], env: Env, executor: str = "local", workers: int = 1,
             show_progress: bool | None = None, submitit_folder: Path | None = None,
             slurm: dict | None = None, on_stage: Callable[[Stage, int, int, Outcome | None], None] | None = None,
             threads: int | None = None) -> list[Outcome]:
    """Run ``stages`` and their inputs. ``on_stage`` (in-process executor only) is told about each stage twice:
    before it runs (outcome None) and after (its outcome), with its position and the total, so a caller can say
    which stage runs and how long it should take (``defbench demo``). ``threads``: each local worker's intra-op
    threads on a CPU (default: the cores shared out among the workers)."""
    show = progress_enabled() if show_progress is None else show_progress
    sched = _Scheduler(stages, show)
    if executor == "local" and workers <= 1:
        while (stage := sched.next_ready()) is not None:
            sched.bar.set_description(f"grid: {stage.label}"[:60])
            position = len(sched.done) + 1
            if on_stage:
                on_stage(stage, position, sched.total, None)
            outcome = run_one(stage, env)
            sched.finish(outcome)
            if on_stage:
                on_stage(stage, position, sched.total, outcome)
    elif executor == "local":
        _run_pool(sched, env, workers, threads)
    elif executor in ("submitit", "submitit-local"):
        _run_submitit(sched, env, workers, executor == "submitit-local",
                      submitit_folder or env.store.root.parent / "submitit", slurm or {})
    else:
        raise ValueError(f"unknown executor {executor!r}; use local, submitit or submitit-local")
    record_rows(stages, env)
    return sched.close()


def _drive(sched: _Scheduler, submit, poll, capacity: int) -> None:
    """The one scheduling loop: keep ``capacity`` stages running, submit as inputs finish."""
    running: dict[object, Stage] = {}
    queue: list[Stage] = []
    while sched.pending or queue or running:
        queue += sched.ready()
        while queue and len(running) < capacity:
            stage = queue.pop(0)
            running[submit(stage)] = stage
        if not running:
            continue
        for handle, outcome in poll(list(running)):
            stage = running.pop(handle)
            if outcome.stage is None:  # the worker died before it could say which stage
                outcome = Outcome(stage, outcome.status, error=outcome.error)
            sched.finish(outcome)


def _run_pool(sched: _Scheduler, env: Env, workers: int, threads: int | None = None) -> None:
    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for device in worker_devices(env, workers):
        devices.put(device)
    if env.device.type != "cpu":
        threads = 2
    elif threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(devices, threads, os.getpid())) as pool:
        def poll(handles: list[Future]):
            finished, _ = wait(handles, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    yield future, future.result()
                except Exception as err:  # the worker process died
                    yield future, Outcome(None, "failed", error=f"worker died: {err}")  # type: ignore[arg-type]
        _drive(sched, lambda stage: pool.submit(_run_in_worker, stage, env), poll, workers)


def _run_submitit(sched: _Scheduler, env: Env, workers: int, force_local: bool, folder: Path,
                  slurm: dict) -> None:
    import submitit
    folder.mkdir(parents=True, exist_ok=True)
    if force_local:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=slurm.get("timeout_min", 24 * 60))
    else:
        executor = submitit.AutoExecutor(folder=str(folder))
        params = {"timeout_min": slurm.get("timeout_min", 24 * 60)}
        if executor.cluster == "slurm":
            params.update({k: v for k, v in (("slurm_partition", slurm.get("partition")),
                                             ("gpus_per_node", slurm.get("gpus")),
                                             ("cpus_per_task", slurm.get("cpus"))) if v})
        executor.update_parameters(**params)

    def poll(handles):
        while True:
            finished = [job for job in handles if job.done()]
            if finished:
                break
            time.sleep(0.5)
        for job in finished:
            try:
                yield job, job.result()
            except Exception as err:
                yield job, Outcome(None, "failed", error=f"job {job.job_id} failed: {str(err)[-300:]}")  # type: ignore[arg-type]
    _drive(sched, lambda stage: executor.submit(run_stage_job, stage, env), poll, workers)
