"""DECREE: the inverted trigger is smaller on a backdoored encoder; `defbench detect`; the mitigation."""
from __future__ import annotations

import json
import os

import torch
from click.testing import CliRunner

from defbench.benchmark.cli import main
from defbench.defenses import get_defense
from defbench.defenses import decree as decree_module
from defbench.encoders import Encoder, build_encoder, load_encoder, save_encoder


def test_stamp_and_offdiagonal_cosine():
    x = torch.rand(4, 3, 8, 8)
    mask, pattern = torch.zeros(8, 8), torch.rand(3, 8, 8)
    assert torch.equal(decree_module.stamp(x, mask, pattern), x)
    assert torch.allclose(decree_module.stamp(x, torch.ones(8, 8), pattern), pattern.expand_as(x))
    same = torch.ones(5, 7)
    assert abs(decree_module.offdiag_cosine(same).item() - 1) < 1e-6  # the diagonal is left out
    orthogonal = torch.eye(4)
    assert abs(decree_module.offdiag_cosine(orthogonal).item()) < 1e-6


def test_inversion_keeps_the_encoder_and_reports_pl1(ctx):
    torch.manual_seed(0)
    encoder = build_encoder(width=8).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    cfg = get_defense("decree").make_config("ci", {"inv_max_steps": 5, "inv_batch_size": 8})
    mask, pattern, info = decree_module.invert_trigger(encoder, images, cfg, ctx)
    assert mask.shape == (32, 32) and pattern.shape == (3, 32, 32)
    assert mask.min() >= 0 and mask.max() <= 1 and pattern.min() >= 0 and pattern.max() <= 1
    assert info["steps"] == 5 and 0 <= info["pl1"] <= 1
    if info["found"]:
        assert abs(info["pl1"] - mask.sum().item() / 1024) < 1e-4
    else:
        assert info["pl1"] == 1.0
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert all(p.requires_grad for p in encoder.parameters())


def test_inverted_trigger_is_smaller_on_the_backdoored_encoder(clean_encoder, backdoored, clean_data, ci_profile):
    from defbench.encoders import RunContext
    cfg = ci_profile.defense_config("decree")
    pl1 = {}
    for name, encoder in (("clean", clean_encoder), ("backdoored", backdoored[0])):
        ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)
        _, _, info = decree_module.invert_trigger(encoder, clean_data.images, cfg, ctx)
        assert info["found"], info
        pl1[name] = info["pl1"]
    # measured at ci scale (seeds 0-2): clean 0.096-0.110, backdoored 0.032-0.052
    assert pl1["backdoored"] < 0.8 * pl1["clean"], pl1


def _detect(*args):
    return CliRunner().invoke(main, ["detect", "--profile", "ci", *args])


def test_detect_cli_separates_clean_and_backdoored(clean_encoder, backdoored, tmp_path):
    save_encoder(clean_encoder, tmp_path / "clean.pt")
    save_encoder(backdoored[0], tmp_path / "backdoored.pt")
    results = {}
    for name in ("clean", "backdoored"):
        out = _detect("--encoder", str(tmp_path / f"{name}.pt"), "--device", "cpu", "--json")
        assert out.exit_code == 0, out.output
        results[name] = json.loads(out.output)
    assert results["backdoored"]["pl1"] < results["clean"]["pl1"], results
    assert results["backdoored"]["verdict"] == "backdoored", results
    assert results["clean"]["verdict"] == "clean", results
    text = _detect("--encoder", str(tmp_path / "backdoored.pt"), "--device", "cpu", "--images", "64",
                   "--set", "defense.decree.inv_max_steps=3")
    assert text.exit_code == 0, text.output
    assert "PL1" in text.output and "verdict:" in text.output
    quick = _detect("--encoder", str(tmp_path / "backdoored.pt"), "--device", "cpu", "--images", "64",
                    "--set", "defense.decree.inv_max_steps=20", "--restarts", "3", "--json")
    result = json.loads(quick.output)
    assert len(result["restarts"]) == 3 and len(set(result["restarts"])) > 1, result  # different starts
    assert round(result["pl1"], 4) == min(result["restarts"]), result


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_detect_refuses_hostile_pickle_and_missing_file_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "defbench-encoder/1", "config": {}, "state_dict": _Payload()}, tmp_path / "evil.pt")
    for path, expected in ((tmp_path / "evil.pt", "refused to load"), (tmp_path / "missing.pt", "not found")):
        result = _detect("--encoder", str(path))
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_decree_defense_records_and_round_trips(backdoored, clean_data, ctx, tmp_path):
    suspect = backdoored[0]
    reference = {k: v.clone() for k, v in suspect.state_dict().items()}
    component = get_defense("decree")
    cfg = component.make_config("ci", {"inv_max_steps": 20, "epochs": 1})
    defended = component.fn(suspect.clone(), clean_data, cfg, ctx)
    assert type(defended) is Encoder and not defended.training
    for key in ("decree_pl1", "decree_mask_l1", "decree_found", "decree_verdict", "decree_unlearn_loss"):
        assert key in ctx.records, key
    assert len(ctx.records["decree_unlearn_loss"]) == 1
    # the backbone moved, BatchNorm statistics and the head did not (BN frozen, head not trained)
    state = defended.state_dict()
    assert not torch.equal(state["backbone.layer4.1.conv2.weight"], reference["backbone.layer4.1.conv2.weight"])
    for key in ("backbone.bn1.running_mean", "backbone.layer1.0.bn1.weight", "head.0.weight"):
        assert torch.equal(state[key], reference[key]), key
    save_encoder(defended, tmp_path / "decree.pt")
    loaded = load_encoder(tmp_path / "decree.pt")
    for name, value in state.items():
        assert torch.equal(value, loaded.state_dict()[name]), name
