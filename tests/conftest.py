"""Shared fixtures: an isolated DEFBENCH_HOME and small encoders built through the real pipeline.

The session fixtures run the `ci` profile's stages once (about a minute on
2 CPU cores) and every test that needs a clean or backdoored encoder reuses
them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DEFBENCH_PROGRESS", "0")
os.environ.setdefault("DEFBENCH_OFFLINE", "1")

from defbench.benchmark import paths  # noqa: E402
from defbench.benchmark.plan import attack_stage, pretrain_stage  # noqa: E402
from defbench.benchmark.profiles import load_profile  # noqa: E402
from defbench.benchmark.results import ResultsDB  # noqa: E402
from defbench.benchmark.runner import execute  # noqa: E402
from defbench.benchmark.stages import Env, clean_subset, dataset_split, load_stage_encoder  # noqa: E402
from defbench.benchmark.store import ArtifactStore  # noqa: E402
from defbench.attacks import trigger_from_description  # noqa: E402
from defbench.defenses import CleanData  # noqa: E402
from defbench.encoders import RunContext  # noqa: E402

# the ci cell the shared fixtures build: BadEncoder on the pre-training set's object task
PRETRAIN, TASK = "synth-cifar10", "synth-stl10"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
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
    outcomes = execute([clean, suspect], ci_env, show_progress=False)
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
    images, _ = clean_subset(ci_env, spec)
    return CleanData(images)


@pytest.fixture(scope="session")
def task_data(ci_profile, ci_env):
    """(train, test) ImageSets of the fixtures' downstream task, capped as the ci profile says."""
    size, cfg = ci_profile.encoder.image_size, ci_profile.evaluate
    return (dataset_split(ci_env, TASK, "train", size, cfg.max_train, ci_profile.seed),
            dataset_split(ci_env, TASK, "test", size, cfg.max_test, ci_profile.seed))
