"""Paired statistics and self-rendering result pages: the tests are scipy's, the verdicts follow the data, and
the committed results pages are exactly what the committed snapshot renders to."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from defbench.reports import publish, stats
from defbench.reports.tables import ReportError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results-tiny"


def _rows(values: dict[str, list[float]], tasks=("t1", "t2"), metric="asr_all", undefended_asr=90.0,
          pretrain="synth-cifar10") -> pd.DataFrame:
    """Rows of one row group: ``values[column]`` lists one value per (task, seed) block, tasks outermost."""
    seeds = len(next(iter(values.values()))) // len(tasks)
    out = []
    for column, series in values.items():
        for i, value in enumerate(series):
            task, seed = tasks[i // seeds], i % seeds
            role = "undefended" if column == "undefended" else "defended"
            row = {"profile": "tiny", "overrides": json.dumps({"seed": seed}), "seed": seed, "attack": "badencoder",
                   "pretrain": pretrain, "downstream": task, "role": role,
                   "defense": "none" if role == "undefended" else column, "acc": 60.0, "asr_all": value,
                   "asr_excl": value, "row_key": f"{column}-{i}-{pretrain}", "eval_key": "k", "encoder_key": "e",
                   "target": 0, "n_test": 100, "encoder_seconds": 1.0, "eval_seconds": 1.0, "device": "cpu",
                   "code_version": "v", "created_at": "2000-01-01T00:00:00"}
            row[metric] = value
            out.append(row)
    for task in tasks:  # the clean encoder's row of each block
        for seed in range(seeds):
            out.append({**out[0], "role": "clean", "defense": "none", "downstream": task, "seed": seed,
                        "asr_all": 5.0, "row_key": f"clean-{task}-{seed}-{pretrain}"})
    return pd.DataFrame(out)


def test_pairwise_uses_scipys_wilcoxon_and_holms_correction():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(50, 5, 12), rng.normal(40, 5, 12), rng.normal(50, 5, 12)
    values = pd.DataFrame({"a": a, "b": b, "c": c})
    pairs = stats.pairwise(values, lower_is_better=True).set_index(["a", "b"])
    assert pairs.loc[("a", "b"), "p"] == pytest.approx(scipy_stats.wilcoxon(a - b).pvalue)
    raw = pairs.p.to_numpy()
    order = np.argsort(raw)
    expected = np.maximum.accumulate(np.minimum(1, raw[order] * (len(raw) - np.arange(len(raw)))))
    assert pairs.p_holm.to_numpy()[order] == pytest.approx(expected)
    assert pairs.loc[("a", "b"), "mean_diff"] == pytest.approx((a - b).mean())
    low, high = pairs.loc[("a", "b"), ["ci_low", "ci_high"]]
    assert low < (a - b).mean() < high


def test_the_verdict_follows_the_direction_of_the_metric():
    values = pd.DataFrame({"x": np.arange(10.0) + 20, "y": np.arange(10.0) + 50})  # x lower on every block
    assert stats.pairwise(values, lower_is_better=True).verdict.iloc[0] == "x better"  # ASR: lower wins
    assert stats.pairwise(values, lower_is_better=False).verdict.iloc[0] == "y better"  # ACC: higher wins
    tied = pd.DataFrame({"x": [5.0] * 8, "y": [5.0] * 8})
    assert stats.pairwise(tied, lower_is_better=True).verdict.iloc[0] == "not separated"


def test_the_resolution_floor_is_the_best_holm_p_that_the_blocks_allow():
    """The floor is what the tests give on the most extreme data: one column below another on every block."""
    for n_blocks in (5, 10, 11, 15):
        columns = {f"c{i}": np.arange(n_blocks) * (i + 1) + 100.0 * i for i in range(10)}  # one-signed, untied
        best = stats.pairwise(pd.DataFrame(columns), lower_is_better=True).p_holm.min()
        assert stats.smallest_holm_p(n_blocks, 45) == pytest.approx(best)
    assert stats.blocks_to_separate(45) == 11  # 45 * 2 / 2**10 = 0.088, 45 * 2 / 2**11 = 0.044


def test_a_page_says_when_its_blocks_cannot_separate_any_pair():
    def lines(n_blocks):
        values = pd.DataFrame({"undefended": np.full(n_blocks, 99.0), "ft": np.arange(n_blocks) + 10.0,
                               "nad": np.arange(n_blocks) + 1.0}, index=pd.RangeIndex(n_blocks))
        ranks, (stat, p) = stats.average_ranks(values, True), stats.friedman(values)
        return publish.statements(stats.Comparison("asr", values, stats.pairwise(values, True), ranks, stat, p))
    few, many = lines(3), lines(8)
    assert any("cannot separate any two columns at 3 blocks" in s and "at least 7 blocks" in s for s in few)  # 3 pairs
    assert not any("cannot separate" in s or "no defense can be separated" in s for s in many)


def test_against_undefended_the_family_is_its_own_comparisons():
    """Ten columns over 10 blocks: the all-pairs family (45) cannot separate anything, the 9 comparisons with
    undefended can, and a defense below undefended on every block is separated there."""
    rng = np.random.default_rng(0)
    values = pd.DataFrame({"undefended": rng.uniform(95, 100, 10),
                           **{f"d{i}": rng.uniform(0, 90, 10) for i in range(9)}})
    pairs = stats.pairwise(values, lower_is_better=True)
    assert (pairs.verdict == "not separated").all()
    control = stats.versus_control(pairs, "undefended", lower_is_better=True)
    assert list(control.column) == [f"d{i}" for i in range(9)] and (control.verdict == "better").all()
    assert control.p_holm.tolist() == pytest.approx(stats.holm(control.p.tolist()))
    assert control.mean_diff.tolist() == pytest.approx([(values[c] - values.undefended).mean() for c in control.column])
    flipped = stats.versus_control(stats.pairwise(values[values.columns[::-1]], True), "undefended", True)
    by_column = control.set_index("column").mean_diff.to_dict()
    assert flipped.set_index("column").mean_diff.to_dict() == pytest.approx(by_column)


def test_friedman_and_average_ranks():
    ordered = pd.DataFrame({"a": np.arange(8.0), "b": np.arange(8.0) + 10, "c": np.arange(8.0) + 20})
    stat, p = stats.friedman(ordered)
    assert p == pytest.approx(scipy_stats.friedmanchisquare(ordered.a, ordered.b, ordered.c).pvalue) and p < 0.01
    assert list(stats.average_ranks(ordered, lower_is_better=True)) == [1.0, 2.0, 3.0]
    assert stats.friedman(pd.DataFrame({"a": [1.0] * 5, "b": [1.0] * 5, "c": [1.0] * 5})) == (0.0, 1.0)


def test_kendall_tau_between_rankings_with_an_interval():
    same = pd.DataFrame({"a": np.arange(6.0), "b": np.arange(6.0) + 10, "c": np.arange(6.0) + 20,
                         "d": np.arange(6.0) + 30})
    tau, low, high, k = stats.kendall_tau(same, same + 1, lower_is_better=True)
    assert (tau, low, high, k) == (1.0, 1.0, 1.0, 4)
    reverse = same[["d", "c", "b", "a"]].set_axis(["a", "b", "c", "d"], axis=1)
    assert stats.kendall_tau(same, reverse, lower_is_better=True)[0] == -1.0


def test_a_block_counts_only_where_the_attack_implanted():
    rows = _rows({"undefended": [90, 20, 95, 80], "ft": [10, 10, 10, 10], "mimic": [30, 30, 30, 30]})
    blocks = stats.implanted_blocks(rows)
    assert ("t1", 1) not in blocks and len(blocks) == 3
    comparison = stats.compare(rows, "asr", ["undefended", "ft", "mimic"], blocks)
    assert len(comparison.values) == 3


def _snapshot(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    n = 10  # 2 tasks x 5 seeds
    values = {"undefended": list(rng.uniform(80, 100, n)), "ft": list(rng.uniform(60, 90, n)),
              "mimic": list(rng.uniform(0, 20, n))}
    rows = pd.concat([_rows(values), _rows(values, pretrain="npz:/somewhere/real/cifar10")])
    path = tmp_path / "rows.csv"
    publish.write_snapshot(publish.merge_snapshot(None, publish.snapshot_rows(rows, "AVX2")), path)
    return path


def test_publish_renders_pages_with_statistics_and_figures(tmp_path):
    written = publish.publish(_snapshot(tmp_path), tmp_path)
    names = {p.name for p in written}
    assert names == {"README.md", "badencoder-synth-cifar10.md", "badencoder-npz-cifar10.md"}
    page = (tmp_path / "badencoder-synth-cifar10.md").read_text()
    assert "Friedman test over 10 blocks" in page
    assert "ASR lower than undefended (Wilcoxon, Holm over the 2 comparisons with undefended, p < 0.05): ft, mimic" \
        in page
    assert "Best average rank: mimic (1.00); separated from the runner-up ft" in page
    assert "ACC: the Friedman test does not separate" not in page and "does not separate the columns" in page
    assert "**" in page  # mimic's Average ASR: lower than ft's on all 10 blocks, separated by the paired test
    for stem in ("asr-cd", "acc-cd", "seeds"):
        assert (tmp_path / f"badencoder-synth-cifar10-{stem}.png").stat().st_size > 1000
        assert (tmp_path / f"badencoder-synth-cifar10-{stem}.svg").is_file()
    index = (tmp_path / "README.md").read_text()
    assert "| badencoder | npz:cifar10 | synth-cifar10 | 3 | 1.00 |" in index  # the same ranking: tau 1
    assert "/somewhere" not in index + page  # machine paths never reach a page


def test_a_seed_with_only_its_clean_row_so_far_is_listed_but_not_tabled(tmp_path):
    """A grid still running has evaluated a seed's clean encoder before its attack: publishing must still work
    and rank over the seeds that have attacked rows."""
    rows = _rows({"undefended": [90, 91, 92, 93], "ft": [10, 11, 12, 13]})
    clean_only = rows[rows.role == "clean"].head(1).assign(seed=7, row_key="clean-seed-7")
    only_clean_group = clean_only.assign(pretrain="synth-stl10", row_key="clean-stl10")
    path = tmp_path / "rows.csv"
    publish.write_snapshot(publish.snapshot_rows(pd.concat([rows, clean_only, only_clean_group]), "AVX2"), path)
    publish.publish(path, tmp_path)
    page = (tmp_path / "badencoder-synth-cifar10.md").read_text()
    assert "(tiny, 2 seeds)" in page and "over seeds 0, 1" in page
    assert "No attacked encoder in this group yet." in (tmp_path / "badencoder-synth-stl10.md").read_text()
    assert "| badencoder on synth-cifar10 | tiny | 0, 1 |" in (tmp_path / "README.md").read_text()


def test_rendering_twice_gives_the_same_pages(tmp_path):
    snapshot = _snapshot(tmp_path)
    first = {p.name: p.read_text() for p in publish.publish(snapshot, tmp_path / "a", figures=False)}
    second = {p.name: p.read_text() for p in publish.publish(snapshot, tmp_path / "b", figures=False)}
    assert first == second


def test_a_snapshot_that_is_missing_or_not_one_gets_a_one_line_error(tmp_path):
    with pytest.raises(ReportError, match="no results snapshot at .*--update"):
        publish.read_snapshot(tmp_path / "rows.csv")
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="is not a results snapshot: it lacks the column"):
        publish.read_snapshot(tmp_path / "rows.csv")


def test_merging_keeps_the_newest_row_of_a_cell():
    old = publish.snapshot_rows(_rows({"undefended": [90, 91], "ft": [10, 11]}, tasks=("t1",)), "AVX2")
    new = old.assign(asr_all=old.asr_all + 1, row_key=old.row_key + "-new", created_at="2001-01-01T00:00:00")
    merged = publish.merge_snapshot(old, new)
    assert len(merged) == len(old) and set(merged.row_key) == set(new.row_key)


def test_the_committed_results_pages_are_what_the_committed_snapshot_renders(tmp_path):
    """A results page edited by hand, or a snapshot changed without re-rendering, fails here: re-render
    with `defbench report publish --profile tiny -o docs/results-tiny`."""
    written = publish.publish(RESULTS / "rows.csv", tmp_path, figures=False)
    for page in written:
        committed = RESULTS / page.name
        assert committed.is_file(), f"{committed} is missing: re-render the results pages"
        assert committed.read_text() == page.read_text(), f"{committed} drifted from rows.csv: re-render it"
    stray = {p.name for p in RESULTS.glob("*.md")} - {p.name for p in written}
    assert not stray, f"pages in {RESULTS} that the snapshot does not render: {sorted(stray)}"
