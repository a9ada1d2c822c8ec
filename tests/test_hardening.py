"""Issue 20, beyond the table of bad inputs: a diverging run is a failed stage (never a perfect defense),
workers die with their parent, temporaries of killed processes are swept, artifacts are byte-reproducible,
a damaged artifact names the folder to delete, and a read-only or full DEFBENCH_HOME is one line."""
from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from defbench.benchmark.cli import main
from defbench.benchmark.pipeline.plan import cell_stages, planned_evaluation_key, pretrain_stage
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.scheduler import diverged_before, diverged_stages, run_grid
from defbench.benchmark.pipeline.settings import load_profile, parse_sets
from defbench.benchmark.pipeline.stages import Env, load_stage_encoder
from defbench.benchmark.pipeline.store import ArtifactStore, StoreError
from defbench.defenses import register_defense

from conftest import MICRO, PRETRAIN, TASK

SETS = [x for s in MICRO for x in ("--set", s)]
CELL = ["--profile", "ci", "--pretrain", PRETRAIN, "--downstream", TASK]


def _cli(home: Path, *args: str, preexec=None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFBENCH_HOME": str(home), "DEFBENCH_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "defbench.benchmark.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec)


def _fresh_home(tmp_path: Path, session_home: Path) -> Path:
    """An empty DEFBENCH_HOME whose dataset cache is the session's (generated sets are made once per session)."""
    home = tmp_path / "home"
    home.mkdir()
    (session_home / "cache").mkdir(exist_ok=True)
    (home / "cache").symlink_to(session_home / "cache", target_is_directory=True)
    return home


def _micro_env(home: Path) -> tuple:
    profile = load_profile("ci", parse_sets(MICRO))
    env = Env(store=ArtifactStore(home / "artifacts"), db=ResultsDB(home / "results.sqlite"),
              data_dir=home / "data", device=torch.device("cpu"))
    return profile, env


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ----------------------------------------------------------------- NaN is a failure, not a perfect defense

def test_a_diverging_defense_fails_its_stage_in_one_line_with_no_artifact_and_no_row(tmp_path, session_home):
    home = _fresh_home(tmp_path, session_home)
    proc = _cli(home, "run", *CELL, "--defense", "ft", *SETS, "--set", "defense.ft.lr=1e30")
    assert proc.returncode != 0, proc.stdout
    line = _one_error_line(proc.stderr)
    assert line.startswith("defbench: stage failed: ft on badencoder") and "NonFiniteError" in line, line
    assert not list((home / "artifacts" / "defend").glob("*/*/meta.json")), "the diverged encoder was stored"
    assert not list((home / "artifacts").glob("*/*/.tmp-*")), "a temporary folder was left"
    with sqlite3.connect(home / "results.sqlite") as con:
        roles = {r[0] for r in con.execute("SELECT role FROM evaluations")}
    assert roles == {"clean", "undefended"}, roles  # no row for the defended encoder: no 0 % ASR anywhere
    assert "—" in proc.stdout  # the table shows the defended cell as missing


@dataclasses.dataclass
class _BlowUpConfig:
    scale: float = 1e6


@register_defense("test-blow-up", config=_BlowUpConfig, summary="test: finite weights whose features overflow")
def _blow_up(encoder, clean, cfg, ctx):
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(cfg.scale)
    return encoder


_DIVERGE_CALLS: list[int] = []


@register_defense("test-diverge", config=_BlowUpConfig, summary="test: the weights turn NaN")
def _diverge(encoder, clean, cfg, ctx):
    _DIVERGE_CALLS.append(1)
    with torch.no_grad():
        next(encoder.parameters()).fill_(float("nan"))
    return encoder


def test_a_diverged_stage_is_recorded_and_a_rerun_reports_it_without_recomputing(tmp_path):
    profile, env = _micro_env(tmp_path / "home")
    stages = cell_stages(profile, "badencoder", "test-diverge", PRETRAIN, TASK)
    defend = stages["defended"].deps[0]
    first = {o.stage.key: o for o in run_grid(list(stages.values()), env, show_progress=False)}
    assert first[defend.key].status == "failed" and "NonFiniteError" in first[defend.key].error
    assert len(_DIVERGE_CALLS) == 1 and not env.store.exists("defend", defend.key)
    assert diverged_before(defend, env)["device"] == str(env.device)
    again = {o.stage.key: o for o in run_grid(list(stages.values()), env, show_progress=False)}
    error = again[defend.key].error
    assert again[defend.key].status == "failed" and "recorded" in error and "to retry, delete" in error, error
    assert len(_DIVERGE_CALLS) == 1  # reported from the record, not recomputed
    assert diverged_stages(list(stages.values()), env.store) == {stages["defended"].key}  # the report's NaN row
    table = CliRunner().invoke(main, ["table", "table1", "--profile", "ci", *SETS, "--defenses", "test-diverge"],
                               env={"DEFBENCH_HOME": str(tmp_path / "home")})
    assert table.exit_code == 0, table.output
    assert f"training diverged (NaN or inf; shown as —, not to be recomputed): test-diverge on badencoder / " \
           f"{PRETRAIN} -> {TASK}, seed {profile.seed}" in table.output, table.output
    record = env.store.divergence_path("defend", defend.key)
    record.write_text(record.read_text().replace(str(env.device), "cuda:7"))
    assert diverged_before(defend, env) is None  # on another device the stage runs again


def test_table_notes_plan_a_set_named_by_path_from_its_rows_and_skip_one_that_is_gone(tmp_path, monkeypatch):
    """A pre-training set named by a path has no task family: Table I's divergence notes plan its cells from
    its rows' tasks, and a path that no longer exists costs its notes, never the table."""
    import pandas as pd
    from defbench.benchmark.commands.table import diverged_notes, table_tasks
    gone = f"npz:{tmp_path / 'gone.npz'}"
    rows = pd.DataFrame({"pretrain": [gone, PRETRAIN], "downstream": [f"npz:{tmp_path / 'task.npz'}", TASK]})
    tasks = table_tasks([PRETRAIN], rows)
    assert tasks[gone] == [f"npz:{tmp_path / 'task.npz'}"] and TASK in tasks[PRETRAIN]
    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path / "home"))
    assert diverged_notes([load_profile("ci", parse_sets(MICRO))], ["badencoder"], ["ft"], tasks) == []


def test_an_evaluation_whose_features_are_not_finite_fails_with_no_artifact_and_no_row(tmp_path):
    profile, env = _micro_env(tmp_path / "home")
    stages = cell_stages(profile, "badencoder", "test-blow-up", PRETRAIN, TASK)
    outcomes = {o.stage.key: o for o in run_grid(list(stages.values()), env, show_progress=False)}
    defended = outcomes[stages["defended"].key]
    assert outcomes[stages["defended"].deps[0].key].status == "ran"  # the weights are finite...
    assert defended.status == "failed" and "NonFiniteError" in defended.error  # ... the features are not
    assert "evaluate defended test-blow-up" in defended.error and "NaN or inf" in defended.error
    assert not env.store.exists("evaluate", stages["defended"].key)
    assert set(env.db.evaluations().role) == {"clean", "undefended"}


# ----------------------------------------------------------------- workers end with their parent

def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (a container's PID 1 may never reap it)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_of_a_parallel_grid_ends_its_workers(tmp_path, session_home):
    home = _fresh_home(tmp_path, session_home)
    env = {**os.environ, "DEFBENCH_HOME": str(home), "DEFBENCH_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "defbench.benchmark.cli", "grid", "--profile", "ci",
                             "--attacks", "badencoder", "--defenses", "ft", "--pretrain", PRETRAIN, "--downstream",
                             TASK, "--workers", "2", *SETS], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:  # a worker is inside a stage
            if list((home / "artifacts").glob("*/*/.tmp-*")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the grid ended before a worker started"
        workers = _children(proc.pid)
        assert workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(_running(w) for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if _running(w)]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        for pid in _children(proc.pid) + (workers if "workers" in dir() else []):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------- temporaries of killed processes

def test_start_up_sweeps_the_temporaries_of_dead_processes_of_every_kind(tmp_path, monkeypatch):
    home = tmp_path / "home"
    dead, old = _dead_pid(), time.time() - 3600
    cache = home / "cache"
    leftovers = [cache / "synthetic" / f".synth-cifar10-v4-train.pt.{dead}.tmp",  # synthetic._cached
                 cache / "datasets" / f".gtsrb-train-32-0123456789abcdef.pt.{dead}.tmp"]  # real._save_atomic
    kept = [cache / "synthetic" / f".synth-svhn-v4-train.pt.{os.getpid()}.tmp",  # a live writer's
            cache / "synthetic" / f".synth-gtsrb-v4-test.pt.{dead}.tmp",  # just written: maybe another host's
            cache / "synthetic" / "synth-cifar10-v4-train.pt"]  # a finished cache file
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    for path in leftovers + kept[:1] + kept[2:]:
        os.utime(path, (old, old))
    folder = home / "artifacts" / "pretrain" / "ab" / f".tmp-ab12-{socket.gethostname()}-{dead}-abcdef"
    folder.mkdir(parents=True)
    inner = folder / f".encoder.pt.{dead}.tmp"  # checkpoints.save_encoder's, swept with its folder
    inner.write_bytes(b"half a checkpoint")
    os.utime(inner, (old, old))
    monkeypatch.setenv("DEFBENCH_HOME", str(home))

    listed = CliRunner().invoke(main, ["clean", "--stale", "--dry-run"])
    assert listed.exit_code == 0 and "would remove 1 temporary folders, 2 temporary files" in listed.output
    assert all(p.exists() for p in leftovers) and folder.exists()

    # any command that opens the store sweeps (this one then stops at its data check)
    result = CliRunner().invoke(main, ["run", "--profile", "ci", "--pretrain", "npz:/nonexistent", "--downstream",
                                       "npz:/nonexistent"])
    assert result.exit_code == 2 and "does not exist" in result.stderr, result.output
    assert not any(p.exists() for p in leftovers) and not folder.exists()
    assert all(p.exists() for p in kept)


# ----------------------------------------------------------------- reproducible bytes

def test_rerunning_a_stage_gives_byte_identical_encoder_and_feature_files(tmp_path):
    profile, env = _micro_env(tmp_path / "home")
    clean = cell_stages(profile, "badencoder", "none", PRETRAIN, TASK)["clean"]
    pretrain = clean.deps[0]

    def files() -> dict[str, bytes]:
        out = {"encoder.pt": (env.store.path("pretrain", pretrain.key) / "encoder.pt").read_bytes()}
        for path in sorted((env.store.root / "features").glob("*/*/features.pt")):
            out[path.parent.name] = path.read_bytes()
        return out

    assert all(o.status == "ran" for o in run_grid([clean], env, show_progress=False))
    first = files()
    assert len(first) == 4  # the encoder, and the features of train, test and triggered test
    for kind in ("pretrain", "evaluate", "features"):
        shutil.rmtree(env.store.root / kind)
    assert all(o.status == "ran" for o in run_grid([clean], env, show_progress=False))
    assert files() == first


# ----------------------------------------------------------------- damaged artifacts

def test_a_truncated_stored_encoder_names_the_folder_to_delete_and_clean_removes_it(tmp_path, monkeypatch):
    home = tmp_path / "home"
    profile, env = _micro_env(home)
    stage = pretrain_stage(profile, PRETRAIN)
    run_grid([stage], env, show_progress=False)
    folder = env.store.path("pretrain", stage.key)
    data = (folder / "encoder.pt").read_bytes()
    (folder / "encoder.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as err:
        load_stage_encoder(env, stage)
    message = str(err.value)
    assert "\n" not in message and f"delete the folder {folder}" in message and "defbench clean --stale" in message

    features = env.store.root / "features" / "ab" / "ab34"
    features.mkdir(parents=True)
    (features / "meta.json").write_text("{}")
    (features / "features.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(StoreError, match="features.pt"):
        env.store.load_tensor(features / "features.pt")

    monkeypatch.setenv("DEFBENCH_HOME", str(home))
    result = CliRunner().invoke(main, ["clean", "--stale"])
    assert result.exit_code == 0 and "2 damaged artifacts" in result.output, result.output
    assert not folder.exists() and not features.exists()
    assert all(o.status == "ran" for o in run_grid([stage], env, show_progress=False))  # recomputed
    load_stage_encoder(env, stage)


# ----------------------------------------------------------------- a read-only or full DEFBENCH_HOME

DRIVER = textwrap.dedent("""
    import json, os, sys
    from click.testing import CliRunner
    from defbench.benchmark.cli import main
    out = []
    for home, args in json.loads(sys.argv[1]):
        os.environ["DEFBENCH_HOME"] = home
        result = CliRunner().invoke(main, args)
        out.append({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                    "exception": repr(result.exception)})
    print(json.dumps(out))
""")


def _drop_write_override() -> None:
    """In the child: root loses CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so file modes bind it like anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def _limit_file_size() -> None:
    """In the child: no file may grow beyond 2 KiB (the disk is 'full'); writes fail with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))


def _drive(calls: list[tuple[Path, list[str]]], preexec) -> list[dict]:
    payload = json.dumps([(str(home), args) for home, args in calls])
    proc = subprocess.run([sys.executable, "-c", DRIVER, payload], capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec, env={**os.environ, "DEFBENCH_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _table_home(folder: Path) -> Path:
    """A home holding a results database in WAL mode with the rows of one ci cell, closed (no -wal/-shm)."""
    folder.mkdir(parents=True)
    db, profile = ResultsDB(folder / "results.sqlite"), load_profile("ci")
    for role, defense in (("clean", "none"), ("undefended", "none"), ("defended", "ft")):
        key = planned_evaluation_key(profile, "badencoder", defense if role == "defended" else "ft", role,
                                     PRETRAIN, TASK)
        db.add_evaluation({"row_key": role, "eval_key": key, "encoder_key": "e", "profile": "ci", "seed": 0,
                           "attack": "badencoder", "defense": defense, "role": role, "pretrain": PRETRAIN,
                           "downstream": TASK, "target": 9, "acc": 80.0, "asr_all": 10.0, "asr_excl": 9.0,
                           "n_test": 200, "overrides": {}})
    assert not (folder / "results.sqlite-shm").exists()
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl / file modes")
def test_a_read_only_home_is_one_line_and_table_still_reads_it(tmp_path):
    if os.geteuid() == 0:
        try:  # can this root drop its override of file modes? (it needs CAP_SETPCAP)
            subprocess.run(["true"], preexec_fn=_drop_write_override, check=True)
        except (subprocess.SubprocessError, OSError):
            pytest.skip("running as root without a way to drop CAP_DAC_OVERRIDE")
    readonly = _table_home(tmp_path / "readonly")
    (readonly / "cache").mkdir()
    db_readonly = _table_home(tmp_path / "db-readonly")
    out_dir = tmp_path / "no-write"
    out_dir.mkdir()
    for path in (readonly / "results.sqlite", db_readonly / "results.sqlite"):
        path.chmod(0o444)
    for folder in (readonly / "cache", readonly, out_dir):
        folder.chmod(0o555)
    try:
        results = _drive([
            (readonly, ["run", *CELL, *SETS]),
            (readonly, ["grid", *CELL[:2], *SETS]),
            (readonly, ["detect", "--profile", "ci", "--encoder", str(tmp_path / "none.pt")]),
            (db_readonly, ["run", *CELL, *SETS]),
            (db_readonly, ["table", "table1", "--profile", "ci", "-o", str(out_dir / "t.md")]),
            (db_readonly, ["report", "components", "--profile", "ci", "--no-run", "-o", str(out_dir / "r")]),
            (readonly, ["table", "table1", "--profile", "ci", "--format", "csv"]),
            (db_readonly, ["table", "table1", "--profile", "ci"]),
        ], _drop_write_override if os.geteuid() == 0 else None)
    finally:
        for folder in (readonly / "cache", readonly, out_dir):
            folder.chmod(0o755)
    expected = ["cannot use DEFBENCH_HOME", "cannot use DEFBENCH_HOME", "not found",
                "cannot open the results database", "cannot write", "cannot write the report"]
    for result, fragment in zip(results, expected):
        assert result["code"] == 2 and fragment in _one_error_line(result["stderr"]), result
        assert result["stdout"] == "", result
    for result in results[len(expected):]:  # reading needs no write access to the database or its folder
        assert result["code"] == 0 and result["stderr"] == "" and "80.0" in result["stdout"], result
    assert sorted(p.name for p in readonly.iterdir()) == ["cache", "results.sqlite"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_a_full_home_is_one_line_before_anything_runs(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    results = _drive([(full, ["run", *CELL, *SETS]), (full, ["grid", *CELL[:2], *SETS]),
                      (full, ["golden", "update", "--seeds", "0", "--file", str(tmp_path / "g.csv")])],
                     _limit_file_size)
    for result in results:
        line = _one_error_line(result["stderr"])
        assert result["code"] == 2 and "cannot use DEFBENCH_HOME" in line and "free space" in line, result
    assert list(full.iterdir()) == []


# ----------------------------------------------------------------- the console script itself

def test_the_real_entry_point_says_bad_input_in_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for home, args, fragment in [(tmp_path / "home", ["grid", "--workers", "0"], "--workers"),
                                 (tmp_path / "home", ["run", "--set", "defense.ft.epochs=1e11"], "10,000,000"),
                                 (a_file, ["run", *CELL], "it is a file")]:
        proc = _cli(home, *args)
        line = _one_error_line(proc.stderr)
        assert proc.returncode == 2 and line.startswith("defbench: error: ") and fragment in line, line
        assert proc.stdout == ""
    assert not (tmp_path / "home").exists()


# ----------------------------------------------------------------- a bug: one line, the traceback in a file

def test_an_unexpected_error_is_one_line_that_names_the_file_with_its_traceback(tmp_path, monkeypatch):
    config_command = importlib.import_module("defbench.benchmark.commands.config")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(config_command, "cell_stages", boom)
    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(main, ["config", "--profile", "ci"])
    line = _one_error_line(result.stderr)
    assert result.exit_code == 2 and line.startswith("defbench: error: unexpected RuntimeError in config: boom")
    assert line.endswith("(please report it)")
    log = Path(line.split("traceback in ")[1].split(" (please")[0])
    assert log.parent == tmp_path / "home" / "logs" and "Traceback" in log.read_text() and "boom" in log.read_text()
