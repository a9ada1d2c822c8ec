"""Same config, same seed, same device: bit-identical results (CPU)."""
import json

import torch

from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.settings import load_profile, parse_sets
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.scheduler import run_grid
from defbench.benchmark.pipeline.stages import Env
from defbench.benchmark.pipeline.store import ArtifactStore

from conftest import MICRO


def _run_cell(home):
    env = Env(ArtifactStore(home / "artifacts"), ResultsDB(home / "r.sqlite"), home / "data", torch.device("cpu"))
    profile = load_profile("ci", parse_sets(MICRO))
    stages = cell_stages(profile, "badencoder", "ft", "synth-cifar10", "synth-svhn")
    outcomes = run_grid(list(stages.values()), env, show_progress=False)
    assert all(o.status == "ran" for o in outcomes), [(o.stage.label, o.error) for o in outcomes]
    metrics = {role: json.loads((env.store.path("evaluate", s.key) / "metrics.json").read_text())
               for role, s in stages.items()}
    defended = stages["defended"].deps[0]
    weights = torch.load(env.store.path("defend", defended.key) / "encoder.pt", weights_only=True)["state_dict"]
    # bit-identity holds per thread count (sums are split across threads), so the artifact records it
    assert json.loads((env.store.path("defend", defended.key) / "meta.json").read_text())["threads"] == \
        torch.get_num_threads()
    return metrics, weights


def test_one_full_cell_is_bit_identical_across_runs(tmp_path):
    first_metrics, first_weights = _run_cell(tmp_path / "a")
    second_metrics, second_weights = _run_cell(tmp_path / "b")
    assert first_metrics == second_metrics
    assert first_weights.keys() == second_weights.keys()
    for name in first_weights:
        assert torch.equal(first_weights[name], second_weights[name]), name
