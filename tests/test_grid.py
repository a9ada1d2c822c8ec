"""The grid: resumable after SIGKILL, the same table from every executor."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import MICRO

GRID = ["--profile", "ci", "--attacks", "badencoder", "--defenses", "ft,fp", "--pretrain", "synth-cifar10",
        "--downstream", "synth-stl10,synth-svhn"]


def _cli(home: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFBENCH_HOME": str(home), "DEFBENCH_PROGRESS": "0"}
    sets = [x for s in MICRO for x in ("--set", s)]
    cmd = [sys.executable, "-m", "defbench.benchmark.cli", *args]
    if args[0] == "grid":
        cmd += sets
    elif args[0] == "table":
        cmd = [sys.executable, "-m", "defbench.benchmark.cli", *args, *sets]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kwargs)


def _table(home: Path) -> str:
    proc = _cli(home, "table", "table1", "--profile", "ci", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _finished(home: Path) -> dict[str, float]:
    return {str(p.parent): p.stat().st_mtime_ns for p in (home / "artifacts").glob("*/*/*/meta.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    home = tmp_path_factory.mktemp("uninterrupted")
    proc = _cli(home, "grid", *GRID)
    assert proc.returncode == 0, proc.stderr
    return home, _table(home)


def test_grid_summary_and_cached_rerun(reference):
    home, table = reference
    assert "synth-stl10" in table and "ft_acc" in table
    again = _cli(home, "grid", *GRID)
    assert again.returncode == 0 and " 0 ran" in again.stdout and "0 failed" in again.stdout, again.stdout
    # the rerun still says what the whole grid cost: the compute each cached stage recorded when it ran
    recorded = sum(json.loads(p.read_text())["seconds"] for kind in ("pretrain", "attack", "defend", "evaluate")
                   for p in (home / "artifacts" / kind).glob("*/*/meta.json"))
    assert recorded > 0 and f"took {recorded:.0f} s when they ran" in again.stdout, again.stdout


def test_sigkill_mid_stage_then_resume(reference, tmp_path):
    _, expected = reference
    home = tmp_path / "home"
    env = {**os.environ, "DEFBENCH_HOME": str(home), "DEFBENCH_PROGRESS": "0"}
    sets = [x for s in MICRO for x in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "defbench.benchmark.cli", "grid", *GRID, *sets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until at least one stage is finished and another is being written, then kill -9
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if _finished(home) and list((home / "artifacts").glob("*/*/.tmp-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the grid finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _finished(home)
    assert before and list((home / "artifacts").glob("*/*/.tmp-*")), "expected a half-written stage"

    resumed = _cli(home, "grid", *GRID)
    assert resumed.returncode == 0, resumed.stderr
    after = _finished(home)
    assert all(after[path] == mtime for path, mtime in before.items()), "a completed stage was recomputed"
    assert not list((home / "artifacts").glob("*/*/.tmp-*")), "the killed stage's temporary folder remains"
    assert _table(home) == expected


def test_submitit_local_executor_with_two_workers_matches(reference, tmp_path):
    _, expected = reference
    home = tmp_path / "home"
    proc = _cli(home, "grid", *GRID, "--executor", "submitit-local", "--workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _table(home) == expected
    assert list((home / "submitit").glob("*_result.pkl")) or list((home / "submitit").iterdir())


def test_further_attacks_run_in_the_grid_and_add_row_groups_to_table1(tmp_path):
    """CTRL (poisoned pre-training) and DRUPE (fine-tunes the clean encoder) go through the grid like the
    paper's two attacks, and Table I gets one row group (cells + Average) per attack."""
    home = tmp_path / "home"
    drupe = [x for s in ("epochs=1", "shadow_images=128", "batch_size=64") for x in ("--set", f"attack.drupe.{s}")]
    proc = _cli(home, "grid", "--profile", "ci", "--attacks", "ctrl,drupe", "--defenses", "ft",
                "--pretrain", "synth-cifar10", "--downstream", "synth-stl10", *drupe)
    assert proc.returncode == 0 and "0 failed" in proc.stdout, proc.stdout + proc.stderr
    table = _cli(home, "table", "table1", "--profile", "ci", "--format", "csv", *drupe)
    assert table.returncode == 0 and not table.stdout.endswith("\n\n"), table.stderr  # no blank CSV line
    frame = pd.read_csv(io.StringIO(table.stdout))
    assert sorted(set(frame.attack)) == ["ctrl", "drupe"], table.stdout
    for _, group in frame.groupby("attack"):
        assert list(group.pretrain) == ["synth-cifar10", "Average"], table.stdout
        assert group[["undefended_acc", "undefended_asr", "ft_acc", "ft_asr"]].notna().all().all(), table.stdout


def test_table_leaves_out_results_of_an_older_code_version(reference, tmp_path):
    """A row whose stage key is not the one today's code gives (an older version of a defense) never
    stands in for a cell, even when it is the newest row for that cell."""
    import shutil
    import sqlite3
    home, expected = reference
    copy = tmp_path / "home"
    copy.mkdir()
    shutil.copy(home / "results.sqlite", copy / "results.sqlite")
    with sqlite3.connect(copy / "results.sqlite") as con:
        con.execute("CREATE TEMP TABLE old AS SELECT * FROM evaluations WHERE role = 'defended' AND defense = 'fp' "
                    "AND downstream = 'synth-stl10'")
        assert con.execute("SELECT count(*) FROM old").fetchone()[0] == 1
        con.execute("UPDATE old SET row_key = 'stale', eval_key = 'from-an-older-fp', acc = 12.345, "
                    "created_at = '2999-01-01T00:00:00'")
        con.execute("INSERT INTO evaluations SELECT * FROM old")
        # a study arm's row (other --set overrides) is another table's, neither a result here nor stale
        con.execute("UPDATE old SET row_key = 'arm', eval_key = 'a-study-arm', "
                    "overrides = '{\"defense.fp.prune_ratio\": 0.1}'")
        con.execute("INSERT INTO evaluations SELECT * FROM old")
    table = _table(copy)
    assert table == expected and "12.35" not in table
    md = _cli(copy, "table", "table1", "--profile", "ci", "--format", "md")
    assert "1 result(s) in the database come from an older code version" in md.stdout, md.stdout + md.stderr


def test_one_worker_finishes_cells_in_turn_and_skips_only_what_a_failure_feeds(caplog):
    """The scheduler alone (no stage runs): a cell's evaluation comes right after its encoder, not after
    every defense of the grid, so a stopped grid leaves whole cells; a failed stage skips its users only."""
    from defbench.benchmark.pipeline.plan import GridSpec, expand_grid
    from defbench.benchmark.pipeline.scheduler import _Scheduler
    from defbench.benchmark.pipeline.settings import load_profile
    from defbench.benchmark.pipeline.scheduler import Outcome
    prof = load_profile("ci")
    cells = expand_grid(prof, GridSpec(["badencoder"], ["ft", "fp"], ["synth-cifar10"], ["synth-stl10"]))
    sched = _Scheduler(list(cells.values()), show_progress=False)
    order = []
    caplog.set_level("INFO", logger="defbench")  # what `defbench grid -v` prints, one line per stage
    while (stage := sched.next_ready()) is not None:
        order.append(stage)
        failed = stage.kind == "defend" and stage.name == "ft"
        sched.finish(Outcome(stage, "failed" if failed else "ran"))
    kinds = [(s.kind, s.name) for s in order]
    assert kinds.index(("evaluate", "synth-stl10")) < kinds.index(("defend", "fp"))
    fp_eval = cells[("badencoder", "fp", "synth-cifar10", "synth-stl10")]
    ft_eval = cells[("badencoder", "ft", "synth-cifar10", "synth-stl10")]
    assert order.index(fp_eval) == order.index(fp_eval.deps[0]) + 1  # evaluated right after it was defended
    status = {o.stage.key: o.status for o in sched.close()}
    assert status[ft_eval.key] == "skipped" and status[fp_eval.key] == "ran"
    assert len(status) == sched.total and not sched.pending
    logged = [r.getMessage() for r in caplog.records]  # one line per stage, the failure's with its error
    assert len(logged) == sched.total and logged[-1].endswith(f"[{sched.total}/{sched.total}]")
    assert sum(line.startswith("defbench: stage failed: ft on badencoder") for line in logged) == 1, logged
    assert any(line.startswith("skipped evaluate defended ft") for line in logged), logged
