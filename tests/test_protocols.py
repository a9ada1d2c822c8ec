"""Downstream protocols: the MLP probe keeps its keys, the others are keyed apart, and each measures what it says."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from conftest import MICRO, PRETRAIN, TASK
from defbench.benchmark.cli import main
from defbench.benchmark.pipeline.keys import code_version
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.protocols import knn_predict
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.settings import load_profile
from defbench.benchmark.pipeline.stages import INPUTS, PROTOCOLS
from defbench.defenses import DEFENSES
from defbench.encoders import build_encoder, save_encoder

# The key of the clean encoder's MLP evaluation in the ci cell (BadEncoder, synth-cifar10 -> synth-stl10) without
# its code versions, as the code before protocols planned it: protocols must not move it.
CI_CLEAN_EVALUATION = "4c4c20836ff5849bc710e1f3"


def test_mlp_evaluations_keep_their_keys_and_other_protocols_are_keyed_apart():
    prof = load_profile("ci")
    stages = cell_stages(prof, "badencoder", "mimic", PRETRAIN, TASK)
    clean = stages["clean"]
    assert "protocol" not in clean.spec and clean.seed_identity == CI_CLEAN_EVALUATION
    # the code versions of a ResNet cell are those of the modules they always ran, nothing of towers or protocols
    assert clean.code == code_version("defbench.benchmark.pipeline.evaluate", INPUTS)
    defend = stages["defended"].deps[0]
    assert defend.code == code_version(DEFENSES.get("mimic").module, INPUTS)
    knn = cell_stages(prof, "badencoder", "mimic", PRETRAIN, TASK, protocol="knn")["clean"]
    assert knn.spec["protocol"] == {"name": "knn", "knn_k": 200, "knn_temperature": 0.5}
    assert knn.key != clean.key and knn.deps[0].key == clean.deps[0].key  # the same encoder, evaluated otherwise
    assert knn.code == code_version("defbench.benchmark.pipeline.evaluate", INPUTS, PROTOCOLS)


def test_knn_is_the_weighted_vote_of_the_badencoder_monitor():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0]]), dim=1)
    assert knn_predict(train, labels, test, 2, k=200, temperature=0.5).tolist() == [0, 1]  # k capped at 4
    # k = 3 and a cold temperature: the two class-1 neighbours outvote the single nearer class-0 one only when warm
    query = torch.nn.functional.normalize(torch.tensor([[0.75, 1.0]]), dim=1)
    sims = (query @ train.t())[0]
    top = sims.topk(3)
    votes = torch.zeros(2).index_add_(0, labels[top.indices], (top.values / 0.5).exp())
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.5).item() == int(votes.argmax())


def test_each_protocol_evaluates_a_resnet_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    save_encoder(build_encoder(width=8, channels_last=False), path)
    sets = ["--profile", "ci", "--device", "cpu", "--set", "evaluate.epochs=2", "--set", "evaluate.max_train=200",
            "--set", "evaluate.max_test=100", "--set", "protocols.finetune_epochs=1"]
    seen = {}
    for protocol in ("mlp", "linear", "knn", "finetune"):
        result = CliRunner().invoke(main, ["evaluate", "--encoder", str(path), "--downstream", TASK, "--trigger",
                                           "patch:10", "--protocol", protocol, "--json", *sets])
        assert result.exit_code == 0, result.output
        seen[protocol] = json.loads(result.output)
    assert len({row["eval_key"] for row in seen.values()}) == 4
    assert all(0 <= row["acc"] <= 100 and 0 <= row["asr"] <= 100 for row in seen.values())
    result = CliRunner().invoke(main, ["evaluate", "--encoder", str(path), "--downstream", TASK, "--protocol",
                                       "zeroshot", *sets])
    assert result.exit_code != 0 and "text tower" in result.output


def test_report_protocols_renders_every_defense_under_every_protocol(tmp_path):
    sets = [x for s in [*MICRO, 'grid.defenses=["ft"]', "protocols.finetune_epochs=1"] for x in ("--set", s)]
    result = CliRunner().invoke(main, ["report", "protocols", "--profile", "ci", "-o", str(tmp_path), *sets])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "protocols.md").read_text()
    for protocol in ("mlp", "linear", "knn", "finetune"):
        assert f"{protocol} ASR" in page
    assert "undefended" in page and "ft" in page and "ASR range" in page
    assert (tmp_path / "protocols.png").is_file()
    from defbench.core import paths
    rows = ResultsDB(paths.results_db(), readonly=True).evaluations(study="protocols")
    assert set(rows.protocol) == {"mlp", "linear", "knn", "finetune"}
