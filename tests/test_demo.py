"""`defbench demo`: the clean encoder it ships is the one today's code would compute (same stage key), it enters
a store only under that key, the expected times name the demo's own stages, and the closing lines say what was
computed, what was shipped and what was loaded.

Fast: plans stages and copies a few megabytes; trains nothing (the demo itself is minutes: `make demo`).
"""
import importlib
import json

import pytest
import torch

from defbench.benchmark.pipeline.plan import pretrain_stage
from defbench.benchmark.pipeline.scheduler import Outcome, expand
from defbench.benchmark.pipeline.settings import load_profile
from defbench.benchmark.pipeline.stages import Stage
from defbench.benchmark.pipeline.store import ArtifactStore
from defbench.core import UserError

demo = importlib.import_module("defbench.benchmark.commands.demo")  # the module (the package exports the command)

REGENERATE = ("regenerate it: DEFBENCH_HOME=$(mktemp -d) defbench demo --ship-clean-encoder "
              "--write-timings benchmark/data/demo_seconds.json")


class _Env:  # what install_shipped / from_shipped use of an Env: its store
    def __init__(self, root):
        self.store = ArtifactStore(root)


def _clean_stage():
    prof = load_profile("ci")
    _, pretrain, _, _ = demo.plan_demo(prof, "ft")
    return pretrain_stage(prof, pretrain)


def test_the_shipped_clean_encoder_is_the_one_the_code_plans():
    stage = _clean_stage()
    assert demo.shipped_key() == stage.key, f"benchmark/data/{demo.SHIPPED} is stale; {REGENERATE}"
    state = torch.load(demo.shipped_folder() / "encoder.pt", map_location="cpu", weights_only=True)
    assert state, "the shipped encoder file holds nothing"


def test_the_shipped_encoder_enters_a_store_under_its_key_only(tmp_path):
    stage, env = _clean_stage(), _Env(tmp_path / "artifacts")
    assert not demo.from_shipped(stage, env)
    assert demo.install_shipped(stage, env)
    assert env.store.exists(stage.kind, stage.key) and demo.from_shipped(stage, env)
    assert not demo.install_shipped(stage, env)  # already there: nothing copied again
    assert demo.from_shipped(stage, env)  # and a later demo still says where it came from

    other = Stage("pretrain", stage.name, {**stage.spec, "seed": 1}, labels=stage.labels)
    assert other.key != stage.key
    assert not demo.install_shipped(other, env) and not env.store.exists(other.kind, other.key)


def test_an_encoder_computed_here_is_not_called_shipped(tmp_path):
    stage, env = _clean_stage(), _Env(tmp_path / "artifacts")
    with env.store.writing(stage.kind, stage.key, {"spec": stage.spec}) as folder:
        (folder / "encoder.pt").write_bytes(b"")
    assert not demo.from_shipped(stage, env)
    assert not demo.install_shipped(stage, env)  # the store's own artifact is kept


def test_the_expected_times_name_the_demo_stages():
    prof = load_profile("ci")
    expected = demo.expected_seconds(prof)
    _, pretrain, _, stages = demo.plan_demo(prof, "ft")
    labels = {demo.DATASETS} | {s.label for s in expand(list(stages.values()))}
    assert set(expected) == labels, f"demo_seconds.json names {sorted(expected)}, the demo runs {sorted(labels)}"
    assert demo.expected_seconds(load_profile("tiny")) == {}  # recorded at ci: no times claimed for another scale


def test_the_closing_lines_say_what_was_computed_shipped_and_loaded():
    stage, prof = _clean_stage(), load_profile("ci")
    attack, pretrain, task, cell = demo.plan_demo(prof, "ft")
    ran, cached = cell["clean"], cell["undefended"]
    outcomes = [Outcome(stage, "cached"), Outcome(ran, "ran", seconds=3.0), Outcome(cached, "cached")]
    lines = demo.summary_lines(outcomes, prof, attack, pretrain, task, shipped={stage.key})
    assert lines[0] == f"Computed now: {ran.label}."
    assert lines[1] == f"Shipped with defbench, not computed here: {stage.label}."
    assert lines[2] == f"Loaded from the cache of an earlier run: {cached.label}."
    assert demo.summary_lines(outcomes, prof, attack, pretrain, task)[1].endswith(": nothing.")


def test_a_timing_record_needs_a_run_that_computed_everything(tmp_path):
    prof, stage = load_profile("ci"), _clean_stage()
    path = tmp_path / "t.json"
    demo.record_timings(path, prof, [Outcome(stage, "ran", seconds=2.04)], threads=2, data_seconds=1.0)
    assert json.loads(path.read_text()) == {"profile": "ci", "cpu_threads": 2,
                                            "stages": {demo.DATASETS: 1.0, stage.label: 2.0}}
    with pytest.raises(UserError, match="empty folder"):
        demo.record_timings(path, prof, [Outcome(stage, "cached")], threads=2, data_seconds=1.0)



def test_each_stage_is_announced_with_where_it_comes_from(tmp_path, monkeypatch, capsys):
    """run_grid tells the reporter before and after each stage; a shipped stage is said to be shipped, a stage
    to compute names its recorded time."""
    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path))
    from defbench.benchmark.commands.common import open_env
    from defbench.benchmark.pipeline.scheduler import run_grid
    prof, stage = load_profile("ci"), _clean_stage()
    env = open_env(prof, "cpu", None)
    assert demo.install_shipped(stage, env)
    calls = []
    reporter = demo.StageReporter(env, {stage.label: 100.0}, threads=2, shipped={stage.key})
    outcomes = run_grid([stage], env, show_progress=False,
                        on_stage=lambda *args: (calls.append(args[1:3] + (args[3] is None,)), reporter(*args)))
    assert [o.status for o in outcomes] == ["cached"] and calls == [(1, 1, True), (1, 1, False)]
    said = capsys.readouterr().err
    assert f"[1/1] {stage.label}: loaded: shipped with defbench" in said and "computing" not in said

    for expected, plan in (({stage.label: 100.0}, "computing now, expected ~2 min on 2 CPU threads"),
                           ({}, "computing now (no expected time recorded for this stage)")):
        computing = demo.StageReporter(env, expected, threads=2)
        computing.cached[stage.key] = False  # as the reporter finds a stage the store lacks
        assert computing._plan(stage) == plan
