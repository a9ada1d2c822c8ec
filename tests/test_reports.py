"""The studies of `defbench report`: planning, rendering from the database, one study end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.stages import row_records
from defbench.benchmark.analysis.studies import STUDIES, plan_study
from defbench.reports import ablations
from defbench.reports import tables
from defbench.reports.tables import ReportError, json_field

from conftest import MICRO


def _defended_key(plan, arm):
    (stage,) = [s for s in plan.evaluations if s.labels["arm"] == arm and s.labels["role"] == "defended"]
    return stage.key


def test_studies_share_stages_with_each_other_and_label_every_row():
    components, lambdas = plan_study("components", "ci"), plan_study("lambdas", "ci")
    full = _defended_key(components, "MIMIC")
    assert _defended_key(lambdas, "λ1=1.0") == full and _defended_key(lambdas, "λ2=1.0") == full
    assert _defended_key(components, "w/o L0") != full
    for name in STUDIES:
        plan = plan_study(name, "ci")
        assert plan.stages, name
        arms = {a.name for a in plan.study.arms_for(plan.profile)}
        for stage in plan.stages:
            assert stage.labels["study"] == name and stage.labels["arm"] in arms


def test_arms_change_what_they_say():
    sizes = plan_study("trigger-size", "ci")
    undefended = [s for s in sizes.evaluations if s.labels["role"] == "undefended"]
    assert sorted(s.spec["trigger"]["size"] for s in undefended) == [3, 5, 10]
    ratios = plan_study("clean-ratio", "ci")
    fractions = {s.deps[0].spec["clean"]["fraction"] for s in ratios.evaluations if s.labels["role"] == "defended"}
    assert fractions == {0.01, 0.02, 0.03, 0.04, 0.05}
    defended = {s.labels["defense"] for s in ratios.evaluations if s.labels["role"] == "defended"}
    assert len(defended) == 8
    clean = plan_study("clean-encoders", "ci")
    assert all(s.deps[0].deps[0].kind == "pretrain" for s in clean.evaluations if s.labels["role"] == "clean-defended")
    adaptive = plan_study("adaptive", "ci")
    assert {s.labels["attack"] for s in adaptive.evaluations} == {"badencoder", "badencoder-adaptive"}


# ----------------------------------------------------------------- rendering from a database

def _fill(db: ResultsDB, plan, rng, skip: int | None = None, skip_measurement: int | None = None) -> dict:
    """Rows for everything the plan expects, with random numbers; returns {(arm, role, defense, task): row}."""
    written = {}
    for i, stage in enumerate(plan.evaluations):
        if i == skip:
            continue
        lab = stage.labels
        row = {"row_key": f"r{i}", "eval_key": stage.key, "encoder_key": stage.deps[0].key, "profile": lab["profile"],
               "overrides": lab["overrides"], "seed": lab["seed"], "attack": lab["attack"],
               "defense": lab["defense"], "role": lab["role"], "pretrain": lab["pretrain"],
               "downstream": stage.spec["downstream"], "target": 1, "acc": float(rng.uniform(10, 90)),
               "asr_all": float(rng.uniform(0, 100)), "asr_excl": float(rng.uniform(0, 100)), "n_test": 100,
               "encoder_seconds": float(rng.uniform(1, 100)), "extra": {"n_clean": round(20000 * (lab["x"] or 0.05)),
                                                        "loss_history": rng.uniform(-1, 9, (2, 3)).tolist()},
               **{k: lab.get(k) for k in ("study", "arm", "sweep", "x")}}
        db.add_evaluation(row)
        written[(lab["arm"], lab["role"], lab["defense"], stage.spec["downstream"])] = row
    for i, stage in enumerate(plan.measurements):
        if i == skip_measurement:
            continue
        lab = stage.labels
        mi = {inputs: {layer: float(rng.uniform(0, 2)) for layer in ("layer1", "layer2", "layer3", "layer4")}
              for inputs in ("clean", "triggered")}
        db.add_measurement({"row_key": f"m{i}", "stage_key": stage.key, "name": stage.name,
                            "result": {"mi": mi}, **{k: lab.get(k) for k in (
                                "study", "arm", "profile", "overrides", "seed", "attack", "defense", "pretrain",
                                "downstream", "role")}})
        written[(lab["arm"], "measure")] = mi
    return written


def _build(db, plan):
    name = plan.study.name
    return ablations.build(plan.study, db.evaluations(study=name), db.measurements(study=name),
                           plan.expected(plan.evaluations), plan.expected(plan.measurements), plan.profile.name,
                           plan.profile.seed)


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_renders_the_numbers_in_the_database(name, tmp_path):
    plan = plan_study(name, "ci")
    db = ResultsDB(tmp_path / "results.sqlite")
    written = _fill(db, plan, np.random.default_rng(0))
    report = _build(db, plan)
    paths = ablations.write(report, tmp_path / "out")
    assert paths["png"].stat().st_size > 10_000 and paths["svg"].read_text().startswith("<?xml")
    assert f"![{name}]({name}.png)" in paths["md"].read_text()
    numbers = report.table.select_dtypes("number").to_numpy()
    assert numbers.size and np.isfinite(numbers).all()
    task = plan.tasks[0]
    if name == "components":
        row = report.table.set_index("variant").loc["w/o L0"]
        assert row["ACC"] == pytest.approx(written[("w/o L0", "defended", "mimic", task)]["acc"])
        assert row["ASR"] == pytest.approx(written[("w/o L0", "defended", "mimic", task)]["asr_all"])
    elif name == "trigger-size":
        row = report.table.set_index("trigger").loc["3x3"]
        before, after = (written[("3x3", role, d, task)] for role, d in (("undefended", "none"), ("defended", "mimic")))
        assert row["ASR reduction"] == pytest.approx(before["asr_all"] - after["asr_all"])
    elif name == "clean-ratio":
        row = report.table.set_index("clean data").loc["2%"]
        assert row["nad ASR"] == pytest.approx(written[("2%", "defended", "nad", task)]["asr_all"])
    elif name == "mi-layers":
        row = report.table.set_index(["encoder", "inputs"]).loc[("backdoored", "triggered")]
        assert row["layer3"] == pytest.approx(written[("backdoored", "measure")]["triggered"]["layer3"])
    elif name == "mimic-regime":
        row = report.table.set_index("setting").iloc[1]  # the lr arm: its one task's last epoch, summed
        final = written[(row.name, "defended", "mimic", task)]["extra"]["loss_history"][-1]
        assert row["final objective"] == pytest.approx(sum(final))
    elif name == "cost":
        assert set(report.table.defense) == set(plan.profile.grid.defenses)
        assert "exponent k" in report.table


def test_a_long_loss_history_reaches_the_regime_table_through_its_last_entry(tmp_path):
    """A row keeps only the last entry of a curve over 64 entries (the 16x-epochs arm's loss history);
    the regime's final objective must still read it, not print NaN."""
    records = {"loss_history": [[0.0, 1.0, 2.0]] * 100 + [[-0.5, 4.0, 3.0]], "beta": [1.0, 2.0]}
    assert row_records(records) == {"loss_history_last": [-0.5, 4.0, 3.0], "beta": [1.0, 2.0]}
    plan = plan_study("mimic-regime", "ci")
    db = ResultsDB(tmp_path / "results.sqlite")
    written = _fill(db, plan, np.random.default_rng(0))
    longest = [arm for (arm, role, _, _) in written if arm.endswith(" epochs") and role == "defended"][-1]
    row = written[(longest, "defended", "mimic", plan.tasks[0])]
    row["extra"] = {**row_records({**row["extra"], "loss_history": records["loss_history"]})}
    db.add_evaluation(row)
    table = _build(db, plan).table.set_index("setting")
    assert table.loc[longest, "final objective"] == pytest.approx(6.5)


def test_a_hand_edited_json_column_costs_its_own_row_not_the_report():
    """A results row whose ``extra`` is not a JSON object (edited by hand, or truncated) is read as lacking
    the field: the pre-training-data note and the final objective skip it instead of raising."""
    assert json_field(None) == {} and json_field('{"a": 1}') == {"a": 1}
    assert json_field("{not json") is None and json_field("[1, 2]") is None
    rows = pd.DataFrame({"role": ["defended"] * 3, "defense": ["bad", "list", "good"],
                         "extra": ["{not json", "[1]", json.dumps({"defense_data": tables.PRETRAIN_DATA})]})
    assert tables.defenses_using_pretrain_data(rows, ["bad", "list", "good"]) == ["good"]
    history = pd.DataFrame({"extra": ["{not json", json.dumps({"loss_history": [[1.0, None, 2.0]]})]})
    assert ablations._final_objective(history) == pytest.approx(3.0)


def test_a_missing_result_is_an_error_that_says_how_to_compute_it(tmp_path):
    plan = plan_study("poison-ratio", "ci")
    db = ResultsDB(tmp_path / "results.sqlite")
    _fill(db, plan, np.random.default_rng(0), skip=3)
    with pytest.raises(ReportError, match=r"1 of \d+ results missing.*defbench report poison-ratio --profile ci"):
        _build(db, plan)
    with pytest.raises(ReportError, match=r"\d+ of \d+ results missing"):
        _build(ResultsDB(tmp_path / "empty.sqlite"), plan)


def test_an_arm_whose_training_diverged_renders_as_nan_with_a_note(tmp_path):
    plan = plan_study("components", "ci")
    index = next(i for i, s in enumerate(plan.evaluations) if s.labels["arm"] == "w/o L0"
                 and s.labels["role"] == "defended")
    db = ResultsDB(tmp_path / "results.sqlite")
    _fill(db, plan, np.random.default_rng(0), skip=index)
    name = plan.study.name
    report = ablations.build(plan.study, db.evaluations(study=name), db.measurements(study=name),
                             plan.expected(plan.evaluations), [], "ci", [plan.profile.seed],
                             diverged=frozenset({plan.evaluations[index].key}))
    table = report.table.set_index("variant")
    assert np.isnan(table.loc["w/o L0", "ASR"]) and np.isfinite(table.loc["w/o L1", "ASR"])
    assert any(n.startswith("w/o L0: training diverged") for n in report.notes), report.notes
    ablations.write(report, tmp_path / "out")  # the figure draws with the gap


def test_a_measurement_behind_a_diverged_encoder_renders_as_nan_with_a_note(tmp_path):
    plan = plan_study("mi-layers", "ci")
    db = ResultsDB(tmp_path / "results.sqlite")
    _fill(db, plan, np.random.default_rng(0), skip_measurement=0)
    lost = plan.measurements[0]
    name = plan.study.name
    report = ablations.build(plan.study, db.evaluations(study=name), db.measurements(study=name),
                             [], plan.expected(plan.measurements), "ci", [plan.profile.seed],
                             diverged=frozenset({lost.key}))
    assert any(n.startswith(f"{lost.labels['arm']}: training diverged") and "no measurement" in n
               for n in report.notes), report.notes
    assert report.table.select_dtypes("number").isna().any().any()
    ablations.write(report, tmp_path / "out")


def test_rows_of_an_older_code_version_are_stale_not_results(tmp_path):
    plan = plan_study("poison-ratio", "ci")
    db = ResultsDB(tmp_path / "results.sqlite")
    written = _fill(db, plan, np.random.default_rng(0), skip=3)
    stage = plan.evaluations[3]
    lab = stage.labels
    older = {**next(iter(written.values())), "row_key": "older", "eval_key": "an-older-key",
             **{k: lab.get(k) for k in ("arm", "role", "defense", "attack", "overrides", "study", "sweep", "x")},
             "downstream": stage.spec["downstream"]}
    db.add_evaluation(older)
    with pytest.raises(ReportError, match=r"1 of \d+ results missing.*1 of them only from an older code version"):
        _build(db, plan)


def test_fit_exponent_recovers_a_power_law():
    sizes = np.array([200, 600, 1000])
    assert ablations.fit_exponent(sizes, 3.0 * sizes ** 0.8) == pytest.approx(0.8)
    assert np.isnan(ablations.fit_exponent([100, 100], [1.0, 2.0]))


# ----------------------------------------------------------------- end to end through the CLI

def _report(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFBENCH_HOME": str(home), "DEFBENCH_PROGRESS": "0"}
    sets = [x for s in MICRO + ["defense.mimic.epochs=1", "defense.mimic.mi_epochs=2"] for x in ("--set", s)]
    cmd = [sys.executable, "-m", "defbench.benchmark.cli", "report", *args, "--profile", "ci", *sets]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_report_runs_its_grid_renders_and_then_answers_from_the_cache(tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    missing = _report(home, "poison-ratio", "--no-run", "-o", str(out))
    assert missing.returncode != 0 and "defbench report poison-ratio" in missing.stderr
    assert not (out / "poison-ratio.png").exists()

    first = _report(home, "poison-ratio", "-o", str(out))
    assert first.returncode == 0, first.stderr
    table = pd.read_csv(out / "poison-ratio.csv")
    db = ResultsDB(home / "results.sqlite")
    rows = db.evaluations(study="poison-ratio", role="defended")
    assert len(rows) == 6 and sorted(json.loads(o).get("clean.poison_ratio", 0) for o in rows.overrides) == \
        [0, 0.05, 0.1, 0.15, 0.2, 0.25]
    for _, row in rows.iterrows():
        assert table.set_index("poisoned share").loc[f"{row.x:.0%}", "ASR"] == pytest.approx(row.asr_all, abs=1e-3)

    again = _report(home, "poison-ratio", "-o", str(out))
    assert again.returncode == 0 and " 0 ran" in again.stdout, again.stdout


def test_report_help_names_every_registered_study():
    from click.testing import CliRunner

    from defbench.benchmark.cli import main

    help_text = "".join(CliRunner().invoke(main, ["report", "--help"]).output.split())  # click wraps at hyphens
    missing = [name for name in STUDIES.names() if name not in help_text]
    assert not missing, f"`defbench report --help` does not name {missing}"


def test_the_regime_keys_its_clean_x3_arm_as_the_set_a_user_types():
    """3 x tiny's 0.05 is 0.15000000000000002 in floating point; the arm must key the stage that
    `--set clean.fraction=0.15` runs, or a user reproducing one arm computes a second, different stage."""
    from defbench.benchmark.pipeline.plan import cell_stages
    from defbench.benchmark.pipeline.settings import load_profile, parse_sets

    plan = plan_study("mimic-regime", "tiny")
    arm = next(s for s in plan.evaluations if s.labels["arm"].startswith("clean x3")
               and s.labels["role"] == "defended")
    typed = load_profile("tiny", parse_sets(["clean.fraction=0.15"]))
    stages = cell_stages(typed, plan.attack, "mimic", plan.pretrain, arm.spec["downstream"])
    assert arm.key == stages["defended"].key
