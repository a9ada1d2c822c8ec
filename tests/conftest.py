"""Shared fixtures: an isolated DEFBENCH_HOME and small encoders built through the real pipeline.

The session fixtures run the `ci` profile's stages once (about a minute on
2 CPU cores) and every test that needs a clean or backdoored encoder reuses
them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DEFBENCH_PROGRESS", "0")
os.environ.setdefault("DEFBENCH_OFFLINE", "1")

from defbench.benchmark.pipeline.plan import attack_stage, pretrain_stage  # noqa: E402
from defbench.benchmark.pipeline.settings import load_profile  # noqa: E402
from defbench.benchmark.pipeline.results import ResultsDB  # noqa: E402
from defbench.benchmark.pipeline.scheduler import run_grid  # noqa: E402
from defbench.benchmark.pipeline.inputs import clean_subset, dataset_split  # noqa: E402
from defbench.benchmark.pipeline.stages import Env, load_stage_encoder  # noqa: E402
from defbench.benchmark.pipeline.store import ArtifactStore  # noqa: E402
from defbench.attacks import trigger_from_description  # noqa: E402
from defbench.defenses import CleanData  # noqa: E402
from defbench.encoders import RunContext  # noqa: E402

# --set overrides for grids small enough to run several times in a test (ci profile): every stage takes seconds.
MICRO = ["encoder.width=8", "encoder.channels_last=false", "pretrain.epochs=1", "pretrain.max_images=256",
         "pretrain.batch_size=64", "attack.badencoder.epochs=1", "attack.badencoder.shadow_images=128",
         "attack.badencoder.batch_size=64", "defense.ft.epochs=1", "defense.ft.batch_size=64",
         "clean.max_images=128", "evaluate.epochs=2", "evaluate.max_train=300", "evaluate.max_test=200"]
# the ci cell the shared fixtures build: BadEncoder on the pre-training set's object task
PRETRAIN, TASK = "synth-cifar10", "synth-stl10"


# $DEFBENCH_TEST_HOME (set by .ci/run to the store the regression subset then uses): the session's store, so the
# subset finds the stages the fixtures computed (the ci clean and BadEncoder encoders and their evaluations)
# instead of computing them again; at the subset's thread count, so the numbers are the ones it would compute
# Under pytest-xdist (`make test` runs two workers) the workers share one session store too: its per-stage locks
# and the WAL results database let them compute each fixture stage once. Every worker runs at the subset's thread
# count as well: the tests' margins were measured at it, and a thread count changes the last bits of CPU sums.
SHARED_HOME = os.environ.get("DEFBENCH_TEST_HOME")
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if SHARED_HOME or XDIST:
    from defbench.benchmark.analysis.golden import THREADS
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    if SHARED_HOME or XDIST:
        home = Path(SHARED_HOME) if SHARED_HOME else tmp_path_factory.getbasetemp().parent / "defbench-home"
        home.mkdir(parents=True, exist_ok=True)
    else:
        home = tmp_path_factory.mktemp("defbench-home")
    os.environ["DEFBENCH_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def isolated_home(session_home, monkeypatch):
    """Every test sees the session's DEFBENCH_HOME unless it sets its own."""
    monkeypatch.setenv("DEFBENCH_HOME", str(session_home))


@pytest.fixture(scope="session")
def ci_profile():
    return load_profile("ci")


@pytest.fixture(scope="session")
def ci_env(session_home) -> Env:
    return Env(store=ArtifactStore(session_home / "artifacts"), db=ResultsDB(session_home / "results.sqlite"),
               data_dir=session_home / "data", device=torch.device("cpu"))


@pytest.fixture
def ctx() -> RunContext:
    return RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)


@pytest.fixture(scope="session")
def ci_stages(ci_profile, ci_env):
    clean = pretrain_stage(ci_profile, PRETRAIN)
    suspect = attack_stage(ci_profile, "badencoder", PRETRAIN, TASK)
    outcomes = run_grid([clean, suspect], ci_env, show_progress=False)
    assert all(o.status in ("ran", "cached") for o in outcomes), [o.error for o in outcomes]
    return clean, suspect


@pytest.fixture(scope="session")
def clean_encoder(ci_env, ci_stages):
    """A SimCLR encoder pre-trained on the ci profile (load a fresh copy per use: .clone())."""
    return load_stage_encoder(ci_env, ci_stages[0]).eval()


@pytest.fixture(scope="session")
def backdoored(ci_env, ci_stages):
    """(encoder, trigger, target class, downstream task) of a BadEncoder attack on the ci profile."""
    stage = ci_stages[1]
    trigger = trigger_from_description(stage.spec["trigger"])
    return load_stage_encoder(ci_env, stage).eval(), trigger, stage.spec["target"], TASK


@pytest.fixture(scope="session")
def clean_data(ci_profile, ci_env) -> CleanData:
    spec = {"dataset": PRETRAIN, "fraction": ci_profile.clean.fraction, "max_images": ci_profile.clean.max_images,
            "image_size": ci_profile.encoder.image_size, "seed": ci_profile.seed}
    images, _ = clean_subset(ci_env.data_dir, spec)
    return CleanData(images)


@pytest.fixture(scope="session")
def task_data(ci_profile, ci_env):
    """(train, test) ImageSets of the fixtures' downstream task, capped as the ci profile says."""
    size, cfg = ci_profile.encoder.image_size, ci_profile.evaluate
    return (dataset_split(ci_env.data_dir, TASK, "train", size, cfg.max_train, ci_profile.seed),
            dataset_split(ci_env.data_dir, TASK, "test", size, cfg.max_test, ci_profile.seed))


# ----------------------------------------------------------------- `make bench` summary (tests/bench)
# Every benchmark is reported as a ratio to its group's baseline measured in the same run
# (`plain forward+backward` for training steps, `plain forward` for inference), so the numbers
# compare across machines and commits although absolute times on a shared CPU are noisy.
# a whole ci defense run is expressed in plain training steps on the same batch size
_BENCH_BASELINES = {"train": "test_plain_forward_backward", "infer": "test_plain_forward",
                    "defense": "test_plain_forward_backward"}


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    stats = {b.name: b.stats.median for b in session.benchmarks if b.stats is not None}
    groups = {b.name: b.group for b in session.benchmarks}
    rows = []
    for name, median in sorted(stats.items(), key=lambda kv: (groups[kv[0]] or "", kv[1])):
        base = stats.get(_BENCH_BASELINES.get(groups[name] or "", ""), None)
        rows.append({"benchmark": name, "group": groups[name], "median_s": median,
                     "ratio": median / base if base else None})
    tr = terminalreporter
    tr.section("defbench benchmark summary (ratio = median / the group's plain-encoder baseline)")
    for row in rows:
        ratio = f"{row['ratio']:8.2f}x" if row["ratio"] else "        -"
        tr.write_line(f"{row['group'] or '':>6}  {row['benchmark']:<45} {row['median_s'] * 1000:10.1f} ms {ratio}")
    out = Path(os.environ.get("DEFBENCH_BENCH_SUMMARY", "reports/out/bench-summary.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    tr.write_line(f"summary written to {out}")
