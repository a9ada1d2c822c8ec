"""bf16 autocast (``encoder.precision = "bf16"``) changes no result beyond the regression subset's tolerances.

One ci cell (BadEncoder on synth-cifar10 -> synth-stl10: clean and undefended columns) runs in fp32 (the
shared session stages) and in bf16 on the CPU; each ACC/ASR of the bf16 cell must lie within the golden file's
tolerance of the fp32 value (``tests/golden/ci-small.csv``: max(floor, seed-to-seed spread)).
"""
from __future__ import annotations

import pytest

from conftest import PRETRAIN, TASK
from defbench.benchmark.analysis.golden import DEFAULT_FILE, read_golden
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.scheduler import run_grid
from defbench.benchmark.pipeline.settings import load_profile

ROLES = ("clean", "undefended")


def _cell(profile, env) -> dict[str, dict]:
    stages = cell_stages(profile, "badencoder", "none", PRETRAIN, TASK)
    outcomes = run_grid([stages[r] for r in ROLES], env, show_progress=False)
    assert all(o.status in ("ran", "cached") for o in outcomes), [o.error for o in outcomes]
    return {r: env.store.read_meta("evaluate", stages[r].key)["result"] for r in ROLES}, stages


@pytest.mark.slow
def test_bf16_cell_within_golden_tolerance_of_fp32(ci_profile, ci_env, ci_stages):
    assert ci_profile.encoder.precision == "fp32"
    bf16 = load_profile("ci", {"encoder.precision": "bf16"})
    assert bf16.encoder.precision == "bf16"
    fp32_results, fp32_stages = _cell(ci_profile, ci_env)
    bf16_results, bf16_stages = _cell(bf16, ci_env)
    assert all(fp32_stages[r].key != bf16_stages[r].key for r in ROLES)  # precision is part of the key
    golden = read_golden(DEFAULT_FILE).set_index(["attack", "pretrain", "downstream", "column"])
    for role in ROLES:
        tol = golden.loc[("badencoder", PRETRAIN, TASK, role)]
        for metric, key in (("acc", "acc"), ("asr", "asr_all")):
            a, b = fp32_results[role][key], bf16_results[role][key]
            print(f"bf16 vs fp32, {role} {metric}: fp32 {a:.2f}, bf16 {b:.2f}, tolerance {tol[f'tol_{metric}']:.2f}")
            assert abs(a - b) <= tol[f"tol_{metric}"], \
                f"{role} {metric}: fp32 {a:.2f}, bf16 {b:.2f}, tolerance {tol[f'tol_{metric}']:.2f}"
