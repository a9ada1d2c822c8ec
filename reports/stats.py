"""Paired statistics over a row group: do defense A and defense B differ, beyond the noise of seeds and tasks?

Every defense of a row group (one attack, one pre-training set) defends the same suspect encoders, so the
comparison is paired: a *block* is one (downstream task, seed), and each defense has one value per block.
For each pair of columns this module gives the mean difference with a bootstrap 95 % interval, a Wilcoxon
signed-rank p-value and its Holm correction over all pairs (and, against the undefended encoder, over the
comparisons with it alone); over all columns, the average ranks per block with
a Friedman test, a critical-difference diagram and a strip plot of the seeds. The tests are scipy.stats',
the multiple-testing correction statsmodels', the diagram scikit-posthocs' (Demšar, JMLR 2006; Benavoli et
al., JMLR 2016 for pairwise Wilcoxon-Holm instead of the mean-ranks Nemenyi test).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: a page rendered twice from one snapshot must not drift
IMPLANT_ASR = 50.0  # an attack implanted on a block when its undefended ASR is at least this (%)
LOWER_IS_BETTER = {"asr": True, "acc": False}


@dataclass
class Comparison:
    """Everything the paired analysis says about one metric of one row group."""
    metric: str
    values: pd.DataFrame  # index (downstream, seed) blocks, one column per defense
    pairs: pd.DataFrame  # one row per pair: a, b, n, mean_diff, ci_low, ci_high, p, p_holm, verdict
    ranks: pd.Series  # average rank per column (1 = best)
    friedman_stat: float
    friedman_p: float


def block_values(rows: pd.DataFrame, metric: str, columns: list[str]) -> pd.DataFrame:
    """One value per (downstream, seed) block and column: ``undefended`` from the undefended rows, a defense
    from its defended rows. Blocks missing any column are dropped (a paired test needs every value)."""
    column = {"asr": "asr_all", "acc": "acc"}[metric]
    labelled = rows.assign(column=np.where(rows.role == "undefended", "undefended", rows.defense))
    labelled = labelled[labelled.role.isin(["undefended", "defended"]) & labelled.column.isin(columns)]
    table = labelled.pivot_table(index=["downstream", "seed"], columns="column", values=column, aggfunc="last")
    return table.reindex(columns=columns).dropna()


def implanted_blocks(rows: pd.DataFrame, threshold: float = IMPLANT_ASR) -> pd.Index:
    """The (downstream, seed) blocks where the attack implanted: undefended ASR >= ``threshold`` %."""
    undefended = rows[rows.role == "undefended"].set_index(["downstream", "seed"]).asr_all
    return undefended[undefended >= threshold].index


def bootstrap_interval(differences: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean paired difference (seeded: reproducible pages)."""
    if len(differences) < 2 or np.all(differences == differences[0]):
        return float(differences.mean()), float(differences.mean())
    from scipy import stats  # here: scipy.stats takes most of a second to import
    result = stats.bootstrap((differences,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                             method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is zero (nothing to test)."""
    if np.all(differences == 0):
        return 1.0
    from scipy import stats
    return float(stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down correction (statsmodels) over a family of p-values."""
    if not p_values:
        return []
    from statsmodels.stats.multitest import multipletests
    return list(multipletests(p_values, alpha=ALPHA, method="holm")[1])


def smallest_holm_p(n_blocks: int, n_pairs: int) -> float:
    """The smallest Holm-corrected p any pair can reach over ``n_blocks``: the exact two-sided Wilcoxon
    signed-rank p is at least 2 / 2**n (every difference of one sign; a zero difference only lowers n; scipy's
    test is exact without ties and a full sign-flip permutation test with ties up to 13 blocks), and
    Holm multiplies the smallest p of the family by its size. At or above ALPHA no pair can be separated."""
    return min(1.0, n_pairs * 2.0 / 2.0 ** n_blocks)


def blocks_to_separate(n_pairs: int) -> int:
    """The fewest blocks at which the best pair of a family of ``n_pairs`` can be separated at ALPHA."""
    n_blocks = 1
    while smallest_holm_p(n_blocks, n_pairs) >= ALPHA:
        n_blocks += 1
    return n_blocks


def pairwise(values: pd.DataFrame, lower_is_better: bool) -> pd.DataFrame:
    """Every pair of columns: mean difference a - b over the blocks, its 95 % interval, Wilcoxon p, Holm p and
    a verdict ("a better", "b better" or "not separated" at the corrected level)."""
    records = []
    for a, b in itertools.combinations(values.columns, 2):
        d = (values[a] - values[b]).to_numpy(dtype=float)
        low, high = bootstrap_interval(d)
        records.append({"a": a, "b": b, "n": len(d), "mean_diff": float(d.mean()), "ci_low": low, "ci_high": high,
                        "p": wilcoxon_p(d)})
    pairs = pd.DataFrame.from_records(records, columns=["a", "b", "n", "mean_diff", "ci_low", "ci_high", "p"])
    pairs["p_holm"] = holm(pairs.p.tolist())

    def verdict(row) -> str:
        if row.p_holm >= ALPHA:
            return "not separated"
        a_lower = row.mean_diff < 0
        return f"{row.a} better" if a_lower == lower_is_better else f"{row.b} better"
    pairs["verdict"] = pairs.apply(verdict, axis=1) if len(pairs) else []
    return pairs


def versus_control(pairs: pd.DataFrame, control: str, lower_is_better: bool) -> pd.DataFrame:
    """Every column against ``control`` alone (the undefended encoder): the pairs that involve it, Holm-corrected
    over those k - 1 comparisons rather than all pairs (comparisons with a control, Demšar 2006, §3.2.2).
    One row per other column: column, n, mean_diff (column - control), p, p_holm, verdict."""
    mine = pairs[(pairs.a == control) | (pairs.b == control)]
    flip = np.where(mine.a == control, -1.0, 1.0)  # orient every difference as column - control
    out = pd.DataFrame({"column": np.where(mine.a == control, mine.b, mine.a), "n": mine.n.to_numpy(),
                        "mean_diff": mine.mean_diff.to_numpy() * flip, "p": mine.p.to_numpy()})
    out["p_holm"] = holm(out.p.tolist())
    better = (out.mean_diff < 0) == lower_is_better
    out["verdict"] = np.where(out.p_holm >= ALPHA, "not separated", np.where(better, "better", "worse"))
    return out.reset_index(drop=True)


def average_ranks(values: pd.DataFrame, lower_is_better: bool) -> pd.Series:
    """Each column's rank within each block (1 = best, ties share the mean rank), averaged over blocks."""
    ranked = values.rank(axis=1, ascending=lower_is_better, method="average")
    return ranked.mean().sort_values()


def friedman(values: pd.DataFrame) -> tuple[float, float]:
    """Friedman's test that all columns rank alike (scipy); NaN when there are fewer than 3 columns or 2 blocks."""
    if values.shape[1] < 3 or values.shape[0] < 2:
        return float("nan"), float("nan")
    if (values.nunique(axis=1) == 1).all():  # every block a tie: no evidence of any difference
        return 0.0, 1.0
    from scipy import stats
    result = stats.friedmanchisquare(*[values[c].to_numpy(dtype=float) for c in values.columns])
    return float(result.statistic), float(result.pvalue)


def compare(rows: pd.DataFrame, metric: str, columns: list[str], blocks: pd.Index | None = None) -> Comparison:
    """The paired analysis of ``metric`` ("asr" or "acc") over ``columns`` (undefended + defenses), on the
    blocks where every column has a row (and, given ``blocks``, only those)."""
    values = block_values(rows, metric, columns)
    if blocks is not None:
        values = values[values.index.isin(blocks)]
    lower = LOWER_IS_BETTER[metric]
    stat, p = friedman(values)
    return Comparison(metric, values, pairwise(values, lower), average_ranks(values, lower), stat, p)


def significance_matrix(comparison: Comparison) -> pd.DataFrame:
    """Holm-corrected pairwise p-values as a symmetric matrix (diagonal 1), the form the CD diagram reads."""
    names = list(comparison.values.columns)
    matrix = pd.DataFrame(1.0, index=names, columns=names)
    for row in comparison.pairs.itertuples():
        matrix.loc[row.a, row.b] = matrix.loc[row.b, row.a] = row.p_holm
    return matrix


def kendall_tau(first: pd.DataFrame, second: pd.DataFrame, lower_is_better: bool,
                resamples: int = 2000) -> tuple[float, float, float, int]:
    """Kendall's tau between two row groups' average-rank orders of their common columns, with a 95 %
    percentile interval from resampling each group's blocks (seeded). Returns (tau, low, high, columns)."""
    common = [c for c in first.columns if c in second.columns]
    if len(common) < 3 or len(first) < 1 or len(second) < 1:
        return float("nan"), float("nan"), float("nan"), len(common)
    # each block's ranks once; a resample only averages rows of them
    ranks_a = first[common].rank(axis=1, ascending=lower_is_better, method="average").to_numpy()
    ranks_b = second[common].rank(axis=1, ascending=lower_is_better, method="average").to_numpy()

    def tau(rows_a: np.ndarray, rows_b: np.ndarray) -> float:
        from scipy import stats
        return float(stats.kendalltau(rows_a.mean(axis=0), rows_b.mean(axis=0)).statistic)
    point = tau(ranks_a, ranks_b)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = [tau(ranks_a[rng.integers(0, len(ranks_a), len(ranks_a))],
                 ranks_b[rng.integers(0, len(ranks_b), len(ranks_b))]) for _ in range(resamples)]
    draws = [d for d in draws if not np.isnan(d)]
    if not draws:
        return point, float("nan"), float("nan"), len(common)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high), len(common)


def paired_best(per_block: pd.DataFrame, lower_is_better: bool) -> str | None:
    """The best column of ``per_block`` (blocks x columns) only when a two-sided Wilcoxon signed-rank test
    against the runner-up gives p < ALPHA; else None (with fewer than 6 blocks it never can: the smallest
    two-sided p of 5 pairs is 0.0625)."""
    per_block = per_block.dropna(axis=1, how="all").dropna()
    if per_block.shape[1] < 2 or len(per_block) < 2:
        return None
    means = per_block.mean().sort_values(ascending=lower_is_better)
    best, runner = means.index[0], means.index[1]
    return best if wilcoxon_p((per_block[best] - per_block[runner]).to_numpy(dtype=float)) < ALPHA else None
