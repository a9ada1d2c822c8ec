"""The GPU path, checked on a CPU with fake devices (GPU assignment, worker pinning, scheduling, data placement),
plus the ``cuda``-marked subset that ``make gpu-check`` runs on a GPU (skipped here without CUDA)."""
from __future__ import annotations

import heapq
import multiprocessing
import os
import queue
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch

from conftest import MICRO, PRETRAIN, TASK
from defbench.benchmark.pipeline import device as device_mod
from defbench.benchmark.pipeline import plan, scheduler
from defbench.benchmark.pipeline.device import WorkerDevice, assign_gpus, configure_backends, resident

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with 4 (fake) GPUs and no inherited CUDA_VISIBLE_DEVICES."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# ----------------------------------------------------------------- which GPU each worker gets

def test_each_worker_gets_its_own_gpu(fake_gpus):
    assigned = assign_gpus(torch.device("cuda"), 4)
    assert [a.visible for a in assigned] == ["0", "1", "2", "3"]
    assert {a.device for a in assigned} == {"cuda:0"}  # each sees only its GPU, as cuda:0


def test_fewer_workers_than_gpus_use_distinct_gpus(fake_gpus):
    assert [a.visible for a in assign_gpus(torch.device("cuda"), 2)] == ["0", "1"]


def test_more_workers_than_gpus_wrap_round_robin(fake_gpus, caplog):
    assigned = [a.visible for a in assign_gpus(torch.device("cuda"), 6)]
    assert assigned == ["0", "1", "2", "3", "0", "1"]  # worker i on GPU i mod 4
    counts = [assigned.count(g) for g in "0123"]
    assert max(counts) - min(counts) <= 1
    assert "share GPUs" in caplog.text


def test_inherited_visible_devices_are_respected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert [a.visible for a in assign_gpus(torch.device("cuda"), 2)] == ["5", "7"]
    assert [a.visible for a in assign_gpus(torch.device("cuda:1"), 3)] == ["7", "7", "7"]  # a named GPU: all on it


def test_cpu_workers_share_the_cpu(fake_gpus):
    assert assign_gpus(torch.device("cpu"), 3) == [WorkerDevice("cpu")] * 3
    with pytest.raises(ValueError):
        assign_gpus(torch.device("cpu"), 0)


def test_worker_initialiser_pins_its_gpu(fake_gpus, monkeypatch):
    """The pool initialiser takes one assignment and sets the process's CUDA_VISIBLE_DEVICES before CUDA starts."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(scheduler, "_WORKER_DEVICE", None)
    devices = queue.Queue()
    for a in assign_gpus(torch.device("cuda"), 4):
        devices.put(a)
    seen = []
    for _ in range(4):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        scheduler._init_worker(devices, torch.get_num_threads())
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        assert scheduler._WORKER_DEVICE == torch.device("cuda:0")
    assert sorted(seen) == ["0", "1", "2", "3"]
    assert torch.backends.cudnn.benchmark is True  # set in every CUDA worker


def _worker_identity(barrier):
    barrier.wait(timeout=120)  # both tasks must be running at once: one per process
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), str(scheduler._WORKER_DEVICE)


@pytest.mark.slow
def test_spawned_workers_each_see_their_own_gpu(fake_gpus):
    """Real worker processes (spawned as `grid --workers` does) with fake GPUs: one CUDA_VISIBLE_DEVICES each."""
    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for a in assign_gpus(torch.device("cuda"), 2):
        devices.put(a)
    with ctx.Manager() as manager, ProcessPoolExecutor(2, mp_context=ctx, initializer=scheduler._init_worker,
                                                        initargs=(devices, 1, os.getpid())) as pool:
        barrier = manager.Barrier(2)
        seen = {pid: (visible, dev) for pid, visible, dev in pool.map(_worker_identity, [barrier] * 2)}
    assert len(seen) == 2 and sorted(v for v, _ in seen.values()) == ["0", "1"]
    assert {d for _, d in seen.values()} == {"cuda:0"}


def test_cudnn_benchmark_only_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_backends(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True


def test_resident_is_a_no_op_on_cpu():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    assert resident(images, torch.device("cpu")) is images


def test_resident_keeps_a_too_large_set_on_the_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 2000))
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)  # 768 bytes > 25% of 1000 free
    assert resident(images, torch.device("cuda")) is images
    assert device_mod.RESIDENT_SHARE == 0.25


# ----------------------------------------------------------------- the scheduler never idles a worker

@dataclass(eq=False)
class FakeStage:
    key: str
    seconds: float
    deps: tuple = ()
    kind: str = "defend"
    labels: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.key


def _fake_dag() -> list[FakeStage]:
    """2 pre-trainings -> 2 attacks each -> 4 defenses each -> an evaluation each (uneven durations)."""
    leaves = []
    for p in range(2):
        pre = FakeStage(f"pre{p}", 10 + p, kind="pretrain")
        for a in range(2):
            att = FakeStage(f"att{p}{a}", 3 + a, (pre,), kind="attack")
            for d in range(4):
                dfd = FakeStage(f"def{p}{a}{d}", 1 + d * (p + 1), (att,))
                leaves.append(FakeStage(f"ev{p}{a}{d}", 0.5, (dfd,), kind="evaluate"))
    return leaves


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_no_worker_idles_while_a_stage_is_ready(capacity):
    """A simulated pool: whenever fewer than ``capacity`` stages run, no stage with finished inputs may wait."""
    leaves = _fake_dag()
    sched = scheduler._Scheduler(leaves, show_progress=False)
    all_stages = list(sched.pending)
    clock, events, started, finished = [0.0], [], {}, {}

    def submit(stage):
        assert all(d.key in finished for d in stage.deps), "submitted before its inputs finished"
        started[stage.key] = clock[0]
        heapq.heappush(events, (clock[0] + stage.seconds, stage.key, stage))
        return stage.key

    def poll(handles):
        ready_waiting = [s for s in all_stages if s.key not in started
                         and all(d.key in finished for d in s.deps)]
        assert len(handles) == capacity or not ready_waiting, \
            f"t={clock[0]}: {len(handles)}/{capacity} busy while {[s.key for s in ready_waiting]} wait"
        t, key, stage = heapq.heappop(events)
        clock[0] = t
        finished[key] = t
        out = [(key, scheduler.Outcome(stage, "ran", stage.seconds))]
        while events and events[0][0] == t:  # everything finishing at the same instant
            _, k, s = heapq.heappop(events)
            finished[k] = t
            out.append((k, scheduler.Outcome(s, "ran", s.seconds)))
        return out

    scheduler._drive(sched, submit, poll, capacity)
    assert len(finished) == len(all_stages) == 2 + 4 + 16 + 16
    total = sum(s.seconds for s in all_stages)
    if capacity == 1:
        assert clock[0] == pytest.approx(total)
    else:  # the critical path and the work bound are both met within a list-scheduling factor
        critical = 11 + 4 + 1 + 3 * 2 + 0.5
        assert clock[0] <= total / capacity + critical


def test_failed_input_skips_its_users_without_stalling():
    leaves = _fake_dag()
    sched = scheduler._Scheduler(leaves, show_progress=False)

    def submit(stage):
        return stage

    def poll(handles):
        stage = handles[0]
        return [(stage, scheduler.Outcome(stage, "failed" if stage.key == "att00" else "ran"))]

    scheduler._drive(sched, submit, poll, 2)
    statuses = {o.stage.key: o.status for o in sched.close()}
    assert statuses["att00"] == "failed"
    assert all(statuses[f"def00{d}"] == "skipped" and statuses[f"ev00{d}"] == "skipped" for d in range(4))
    assert statuses["ev113"] == "ran"


# ----------------------------------------------------------------- make gpu-check's grid estimate

def _gpu_check():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_estimate_fit_is_linear_and_never_negative():
    """A cost a + k x is recovered exactly; the first H200 run's shape (the smaller point slower than the
    larger, warm-up left in it) falls back to proportional from the larger point instead of going negative."""
    check = _gpu_check()
    assert check.linear_cost(4, 2 + 4 * 0.5, 12, 2 + 12 * 0.5) == pytest.approx((2.0, 0.5, False))
    est, proportional = check.extrapolate(0.1, 10.0, 0.3, 9.0)  # s2 ran faster than s1
    assert est == pytest.approx(30.0) and proportional
    est, proportional = check.extrapolate(0.1, 1.0, 0.3, 9.0)  # a line through s = 0 below zero
    assert est == pytest.approx(30.0) and proportional
    est, proportional = check.extrapolate(0.1, 5.0, 0.3, 9.0)
    assert est == pytest.approx(23.0) and not proportional


# ----------------------------------------------------------------- on a GPU (make gpu-check runs these)

@pytest.mark.cuda
@CUDA
def test_cuda_resident_data_and_bf16_encoder():
    from defbench.benchmark.pipeline.settings import load_profile
    from defbench.encoders import build_encoder, to_float
    from defbench.encoders.augment import SimCLRAugment
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    on_gpu = resident(images, torch.device("cuda"))
    assert on_gpu.is_cuda and on_gpu.dtype == torch.uint8
    x = SimCLRAugment()(to_float(on_gpu[torch.arange(16)], torch.device("cuda")))
    assert x.is_cuda
    prof = load_profile("ci", {"encoder.precision": "bf16"})
    encoder = build_encoder(prof.encoder).cuda()
    feats = encoder.features(x)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    feats.sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in encoder.parameters())


@pytest.mark.cuda
@pytest.mark.slow
@CUDA
def test_cuda_micro_grid_every_defense(tmp_path, ci_env):
    """Every grid defense of the ci profile (micro budgets) runs end to end on the GPU in bf16 (the opt-in
    ``encoder.precision=bf16``; every profile runs fp32 otherwise) with its data resident on the device."""
    from defbench.benchmark.pipeline.results import ResultsDB
    from defbench.benchmark.pipeline.settings import load_profile, parse_sets
    from defbench.benchmark.pipeline.stages import Env
    from defbench.benchmark.pipeline.store import ArtifactStore
    prof = load_profile("ci", parse_sets([*MICRO, "encoder.precision='bf16'", "encoder.channels_last=true"]))
    env = Env(ArtifactStore(tmp_path / "artifacts"), ResultsDB(tmp_path / "results.sqlite"), ci_env.data_dir,
              torch.device("cuda"))
    spec = plan.grid_spec(prof, attacks=["badencoder"], pretrain=[PRETRAIN], downstream=[TASK])
    cells = plan.expand_grid(prof, spec)
    outcomes = scheduler.run_grid(list(cells.values()), env, show_progress=False)
    assert all(o.status == "ran" for o in outcomes), [(o.stage.label, o.error) for o in outcomes if o.error]


@pytest.mark.cuda
@pytest.mark.slow
@CUDA
def test_cuda_workers_pinned_one_per_gpu(tmp_path, ci_env):
    """grid --workers N on N GPUs: every stage ran, each worker on its own GPU (recorded device is cuda:0 in a
    process that sees one GPU)."""
    from defbench.benchmark.pipeline.results import ResultsDB
    from defbench.benchmark.pipeline.settings import load_profile, parse_sets
    from defbench.benchmark.pipeline.stages import Env
    from defbench.benchmark.pipeline.store import ArtifactStore
    prof = load_profile("ci", parse_sets(MICRO))
    env = Env(ArtifactStore(tmp_path / "artifacts"), ResultsDB(tmp_path / "results.sqlite"), ci_env.data_dir,
              torch.device("cuda"))
    spec = plan.grid_spec(prof, attacks=["badencoder"], defenses=["ft"], pretrain=[PRETRAIN],
                               downstream=[TASK, "synth-svhn"])
    cells = plan.expand_grid(prof, spec)
    outcomes = scheduler.run_grid(list(cells.values()), env, workers=max(2, torch.cuda.device_count()),
                                  show_progress=False)
    assert all(o.status == "ran" for o in outcomes), [(o.stage.label, o.error) for o in outcomes if o.error]
