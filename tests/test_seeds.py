"""Results with their spread: several seeds give mean ± sd, a best is marked only when it is separated, and
study figures and tables carry the spread."""
import numpy as np
import pandas as pd
import pytest

from defbench.benchmark.analysis.studies import plan_study
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.plan import expand_grid, grid_spec
from defbench.benchmark.pipeline.settings import load_profile
from defbench.reports import ablations, tables


def _rows(seed: int, values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Evaluation rows of one Table I cell: {column: (acc, asr)}, 'undefended' or a defense."""
    out = []
    for column, (acc, asr) in values.items():
        role = "undefended" if column == "undefended" else "defended"
        out.append({"attack": "badencoder", "pretrain": "synth-cifar10", "downstream": "synth-stl10", "role": role,
                    "defense": "none" if role == "undefended" else column, "acc": acc, "asr_all": asr,
                    "asr_excl": asr, "seed": seed})
    return pd.DataFrame(out)


def _render(per_seed: list[pd.DataFrame]) -> str:
    frames = [tables.table1(rows, ["ft", "mimic"])[0] for rows in per_seed]
    mean, sd = tables.combine_seeds(frames)
    return tables.render(mean, ["ft", "mimic"], "md", [], "t", sd, len(per_seed), per_seed=frames)


def test_a_best_separated_by_the_paired_test_is_bold():
    # six seeds: mimic's ASR is lower than ft's on every seed (Wilcoxon p = 0.031), ft's ACC higher on every seed
    per_seed = [_rows(s, {"undefended": (70, 99), "ft": (70 + s, 50 + s), "mimic": (60, 10 + s)}) for s in range(6)]
    text = _render(per_seed)
    assert "**12.50 ± 1.87**" in text and "**72.50 ± 1.87**" in text
    assert "two-sided Wilcoxon signed-rank test" in text


def test_three_seeds_never_bold_however_far_apart():
    # the smallest two-sided Wilcoxon p of three pairs is 0.25: no best can be claimed from three seeds
    per_seed = [_rows(s, {"undefended": (70, 99), "ft": (70 + s, 50 + s), "mimic": (60, 10 + s)}) for s in (0, 1, 2)]
    text = _render(per_seed)
    assert "71.00 ± 1.00" in text and "11.00 ± 1.00" in text
    assert "**" not in text.split("\n\n- ")[0]


def test_a_best_that_flips_between_seeds_is_not_bold():
    # mimic's ASR is lower on four seeds and higher on two: the paired test does not separate them
    asr = {"ft": [20, 30, 25, 22, 10, 12], "mimic": [15, 25, 20, 18, 40, 35]}
    per_seed = [_rows(s, {"undefended": (70, 99), "ft": (70, asr["ft"][s]), "mimic": (70, asr["mimic"][s])})
                for s in range(6)]
    assert "**" not in _render(per_seed).split("\n\n- ")[0]


def test_a_row_measured_at_fewer_seeds_shows_no_spread_and_the_table_says_so():
    def rows(seed: int, downstream: str, ft_asr: float) -> pd.DataFrame:
        frame = _rows(seed, {"undefended": (70, 99), "ft": (72, ft_asr), "mimic": (60, 10)})
        return frame.assign(downstream=downstream)
    per_seed = [pd.concat([rows(0, "synth-stl10", 50), rows(0, "synth-svhn", 40)]),
                rows(1, "synth-stl10", 54)]  # seed 1 has no synth-svhn rows yet
    text = _render(per_seed)
    svhn = next(line for line in text.splitlines() if "synth-svhn" in line)
    stl10 = next(line for line in text.splitlines() if "synth-stl10" in line)
    assert "52.00 ± 2.83" in stl10 and "40.00 " in svhn and "±" not in svhn and "**" not in svhn
    # the Average is over the rows' means (52 and 40); only seed 0 measured both rows: no spread for it
    average = next(line for line in text.splitlines() if "Average" in line)
    assert "46.00 " in average and "±" not in average and "**" not in average, average
    assert "A cell without ± rests on one seed" in text
    both = _render([pd.concat([rows(s, "synth-stl10", 50 + 2 * s), rows(s, "synth-svhn", 40)]) for s in (0, 1)])
    assert "rests on one seed" not in both
    # every seed complete: the sd of the Average is the spread of the per-seed averages (45 and 46)
    assert "45.50 ± 0.71" in next(line for line in both.splitlines() if "Average" in line)


def test_one_seed_marks_no_best_and_says_why():
    text = _render([_rows(0, {"undefended": (70, 99), "ft": (72, 50), "mimic": (60, 10)})])
    table = text.split("\n\n- ")[0]
    assert "**" not in table and "±" not in table and "with one seed there is no spread" in text


def test_csv_gives_every_number_with_two_decimals_and_a_missing_cell_empty():
    measured = _rows(0, {"undefended": (70.123456, 99.5), "ft": (72.0000005, 50.25)})
    no_ft = _rows(0, {"undefended": (60.0, 90.0)}).assign(attack="ctrl")  # an attack no defense was run on
    frame, _ = tables.table1(pd.concat([measured, no_ft]), ["ft"])
    lines = tables.render(frame, ["ft"], "csv", [], "t").splitlines()
    assert lines[1].split(",")[3:] == ["70.12", "99.50", "72.00", "50.25"], lines
    assert lines[3].split(",")[3:] == ["60.00", "90.00", "", ""], lines


def test_grid_plans_each_seed_as_its_own_stages():
    spec = grid_spec(load_profile("ci"), ["badencoder"], ["ft"], ["synth-cifar10"], ["synth-stl10"])
    keys = [set(s.key for s in expand_grid(load_profile("ci", {"seed": seed}), spec).values()) for seed in (0, 1)]
    assert keys[0] and not keys[0] & keys[1]


def test_a_study_over_seeds_draws_error_bars_and_lists_the_spread(tmp_path):
    db = ResultsDB(tmp_path / "results.sqlite")
    rng = np.random.default_rng(0)
    plans = [plan_study("components", "ci", {"seed": seed}) for seed in (0, 1, 2)]
    for seed, plan in zip((0, 1, 2), plans):
        for i, stage in enumerate(plan.evaluations):
            lab = stage.labels
            db.add_evaluation({"row_key": f"{seed}-{i}", "eval_key": stage.key, "encoder_key": "e",
                               "profile": lab["profile"], "overrides": lab["overrides"], "seed": lab["seed"],
                               "attack": lab["attack"], "defense": lab["defense"], "role": lab["role"],
                               "pretrain": lab["pretrain"], "downstream": stage.spec["downstream"], "target": 1,
                               "acc": float(rng.uniform(50, 80)), "asr_all": float(rng.uniform(0, 100)),
                               "asr_excl": 0.0, "n_test": 10, "encoder_seconds": 1.0,
                               **{k: lab.get(k) for k in ("study", "arm", "sweep", "x")}})
    expected = [row for plan in plans for row in plan.expected(plan.evaluations)]
    report = ablations.build(plans[0].study, db.evaluations(study="components"), db.measurements(study="components"),
                             expected, [], "ci", [0, 1, 2])
    assert {"ACC sd", "ASR sd"} <= set(report.table.columns)
    rows = db.evaluations(study="components")
    wo_l0 = rows[(rows.arm == "w/o L0") & (rows.role == "defended")].sort_values("seed")
    row = report.table.set_index("variant").loc["w/o L0"]
    assert row["ASR"] == pytest.approx(wo_l0.asr_all.mean()) and row["ASR sd"] == pytest.approx(wo_l0.asr_all.std())
    assert any(len(c.lines) for c in report.figure.axes[0].containers if hasattr(c, "lines"))  # error bars drawn
    fourth = plan_study("components", "ci", {"seed": 3})
    with pytest.raises(ablations.ReportError, match="--seeds 0,1,2,3"):  # the missing seed's rows: how to get them
        ablations.build(plans[0].study, rows, db.measurements(study="components"),
                        expected + fourth.expected(fourth.evaluations), [], "ci", [0, 1, 2, 3])


def test_table_command_over_seeds_reads_each_seeds_current_rows_and_names_the_unmeasured_one(tmp_path, monkeypatch):
    """`defbench table table1 --seeds 0,1,2` end to end: each seed's rows are found by that seed's stage keys (a
    row of another code version is left out and counted), cells show mean ± sd, and seed 2 (no rows) is named."""
    from click.testing import CliRunner

    from defbench.benchmark.cli import main
    from defbench.benchmark.pipeline.plan import planned_evaluation_key

    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path))
    db = ResultsDB(tmp_path / "results.sqlite")
    cell = ("badencoder", "synth-cifar10", "synth-stl10")
    values = {0: {"undefended": (70, 99), "ft": (72, 50)}, 1: {"undefended": (72, 97), "ft": (74, 54)}}
    for seed, columns in values.items():
        profile = load_profile("ci", {"seed": seed})
        for column, (acc, asr) in columns.items():
            role, defense = ("undefended", "none") if column == "undefended" else ("defended", column)
            key = planned_evaluation_key(profile, cell[0], defense, role, *cell[1:])
            for row_key, eval_key, shift in ((f"{seed}-{column}", key, 0), (f"{seed}-{column}-old", "older", 30)):
                db.add_evaluation({"row_key": row_key, "eval_key": eval_key, "encoder_key": "e", "profile": "ci",
                                   "overrides": "{}", "seed": seed, "attack": cell[0], "defense": defense,
                                   "role": role, "pretrain": cell[1], "downstream": cell[2], "target": 9,
                                   "acc": acc + shift, "asr_all": asr - shift, "asr_excl": asr, "n_test": 100,
                                   "encoder_seconds": 1.0})
    result = CliRunner().invoke(main, ["table", "table1", "--profile", "ci", "--seeds", "0,1,2", "--defenses", "ft"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "synth-stl10" in line)
    assert "71.00 ± 1.41" in row and "98.00 ± 1.41" in row and "73.00 ± 1.41" in row and "52.00 ± 2.83" in row, row
    assert "seed(s) 2: no rows in the database yet" in result.output
    assert "4 result(s) in the database come from an older code version" in result.output
