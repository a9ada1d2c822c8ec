"""The regression subset's bookkeeping: tolerances from seed spread, the diff, the golden file."""
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from defbench.benchmark.analysis import golden as g
from defbench.benchmark.cli import main


def _run(values):
    """A subset result: rows (attack, column) -> (acc, asr) on one task."""
    return pd.DataFrame([{"attack": a, "pretrain": "synth-cifar10", "downstream": "synth-stl10", "column": c,
                          "acc": acc, "asr": asr} for (a, c), (acc, asr) in values.items()])


SEED0 = {("badencoder", "undefended"): (60.0, 80.0), ("badencoder", "mimic"): (58.0, 10.0)}
SEED1 = {("badencoder", "undefended"): (61.5, 70.0), ("badencoder", "mimic"): (58.2, 12.0)}


def test_tolerance_is_the_seed_spread_with_a_floor():
    frame = g.golden_frame([_run(SEED0), _run(SEED1)]).set_index("column")
    assert frame.loc["undefended", "acc"] == 60.0  # values from the first seed
    assert frame.loc["undefended", "tol_acc"] == pytest.approx(1.5)
    assert frame.loc["undefended", "tol_asr"] == pytest.approx(10.0)
    assert frame.loc["mimic", "tol_acc"] == 1.0 and frame.loc["mimic", "tol_asr"] == 2.0  # floors


def test_a_broken_defense_shows_up_in_the_diff(tmp_path):
    path = tmp_path / "golden.csv"
    g.write_golden(g.golden_frame([_run(SEED0), _run(SEED1)]), path, [0, 1], "cpu")
    assert g.golden_seed(path) == 0
    expected = g.read_golden(path)
    # "mimic" now returns the suspect unchanged: it scores like the undefended encoder
    broken = _run({**SEED0, ("badencoder", "mimic"): (60.0, 80.0)})
    diff = g.compare(broken, expected)
    moved = diff[diff.status != "ok"]
    assert set(zip(moved.column, moved.metric)) == {("mimic", "ACC"), ("mimic", "ASR")}
    text = g.format_diff(diff)
    assert "mimic" in text and "80.0" in text and "2 of 4 values moved" in text
    assert "undefended" not in text.split("regression subset")[0]  # only what moved is listed
    ok = g.compare(_run(SEED1), expected)  # another seed's numbers stay inside the spread
    assert (ok.status == "ok").all(), ok
    assert "all 4 values within tolerance" in g.format_diff(ok)


def test_the_file_records_its_cpu_kind_and_a_check_elsewhere_says_so(tmp_path, monkeypatch):
    path = tmp_path / "golden.csv"
    monkeypatch.setattr(g, "cpu_kind", lambda: "AVX512")
    g.write_golden(g.golden_frame([_run(SEED0)]), path, [0], "cpu")
    assert g.golden_cpu(path) == "AVX512" and len(g.read_golden(path)) == 2  # a comment line, not a row
    assert g.cpu_hint(g.golden_cpu(path)) == ""  # same kind: values that moved are the code's doing
    monkeypatch.setattr(g, "cpu_kind", lambda: "AVX2")
    hint = g.cpu_hint(g.golden_cpu(path))
    assert "AVX512" in hint and "AVX2" in hint and "golden update --seeds 0" in hint
    path.write_text(path.read_text().replace("# cpu: AVX512\n", ""))  # a file from before the line existed
    assert g.golden_cpu(path) is None and "unrecorded" in g.cpu_hint(None)


def test_missing_and_new_cells_are_reported():
    expected = g.golden_frame([_run(SEED0)])
    current = _run({("badencoder", "undefended"): SEED0[("badencoder", "undefended")],
                    ("bassl", "undefended"): (50.0, 50.0)})
    status = g.compare(current, expected).groupby("column").status.first()
    assert status["mimic"] == "missing"
    assert set(g.compare(current, expected).query("attack == 'bassl'").status) == {"new"}


def test_golden_file_problems_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("attack,acc\nx,1\n")
    for path, expected in ((tmp_path / "none.csv", "golden update"), (bad, "lacks columns")):
        result = CliRunner().invoke(main, ["golden", "check", "--file", str(path)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.output


def test_committed_golden_files_cover_the_whole_subset_and_are_named_by_their_cpu_kind():
    files = sorted((Path(__file__).parent / "golden").glob("ci-small.*.csv"))
    assert {p.name for p in files} >= {"ci-small.AVX2-AuthenticAMD.csv", "ci-small.AVX512-GenuineIntel.csv"}
    for path in files:
        assert g.golden_cpu(path) == path.name.split(".")[1], path  # the # cpu: line names the file's kind
        frame = g.read_golden(path)
        assert set(frame.downstream) == set(g.TASKS) and set(frame.pretrain) == {g.PRETRAIN}
        assert set(frame.attack) == {"badencoder", "bassl"}
        assert set(frame.column) == {"clean", "undefended", "ft", "fp", "nad", "anp", "moth", "decree", "medic",
                                     "mimic"}
        assert (frame.tol_acc >= 1.0).all() and (frame.tol_asr >= 2.0).all()


def test_check_reads_this_cpu_kinds_file_and_a_kind_without_one_is_told_how_to_write_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "tests" / "golden"
    monkeypatch.setattr(g, "cpu_kind", lambda: "AVX2")
    g.write_golden(g.golden_frame([_run(SEED0)]), g.default_file(), [0], "cpu")
    assert g.default_file() == Path("tests/golden/ci-small.AVX2.csv") and g.other_cpu_files(g.default_file()) == []
    monkeypatch.setattr(g, "cpu_kind", lambda: "AVX512")
    assert g.other_cpu_files(g.default_file()) == [folder.relative_to(tmp_path) / "ci-small.AVX2.csv"]
    result = CliRunner().invoke(main, ["golden", "check"])  # fails before any compute: no file for AVX512
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "AVX512" in result.output and "kinds with one: AVX2" in result.output
    assert "golden update --seeds 0" in result.output


class _PoolStarted(Exception):
    pass


def test_every_golden_worker_runs_at_the_subsets_thread_count(monkeypatch):
    """`golden check --workers N` must give the one-worker values: each pool worker is started with the subset's
    THREADS intra-op threads, not the cores shared out among the workers (which changes the rounding)."""
    from defbench.benchmark.commands.common import make_profile_env
    from defbench.benchmark.pipeline import scheduler

    started = {}

    def fake_pool(workers, mp_context, initializer, initargs):
        started.update(workers=workers, threads=initargs[1])
        raise _PoolStarted

    monkeypatch.setattr(scheduler, "ProcessPoolExecutor", fake_pool)
    profile, env = make_profile_env("ci", (), 0, "cpu", None, False)
    with pytest.raises(_PoolStarted):
        g.run_subset(profile, env, workers=3)
    assert started == {"workers": 3, "threads": g.THREADS}
