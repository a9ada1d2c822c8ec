"""`defbench check-data`: the data premises measured on files in the real npz format, and bad input refused."""
from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner

from defbench.benchmark.cli import main
from defbench.benchmark.datasets.premises import power_law_field


def _write(folder, images: np.ndarray) -> str:
    labels = np.arange(len(images)) % 4
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", x=images, y=labels)
    return f"npz:{folder}"


def _natural(n: int) -> np.ndarray:
    """Colour images with a 1/f amplitude spectrum, N x 32 x 32 x 3 uint8 (never near-white)."""
    field = power_law_field(n * 3, 32, 1.0, torch.Generator().manual_seed(0)).view(n, 3, 32, 32)
    field = (field - field.mean()) / field.std()
    return (110 + 35 * field).clamp(0, 200).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _check(name: str, *args):
    return CliRunner().invoke(main, ["check-data", name, "-n", "64", *args])


def test_natural_images_meet_the_premises(tmp_path):
    result = _check(_write(tmp_path, _natural(64)))
    assert result.exit_code == 0, result.output
    assert "FAILS" not in result.output and "amplitude-spectrum slope" in result.output


def test_a_white_box_in_every_image_fails_the_trigger_premises(tmp_path):
    images = _natural(64)
    images[:, 21:31, 21:31] = 255  # the trigger's own box, already white in clean data
    result = _check(_write(tmp_path, images))
    assert result.exit_code == 1, result.output
    failing = [line for line in result.output.splitlines() if line.endswith("FAILS")]
    assert any("trigger box" in line for line in failing) and any("clean" in line for line in failing), failing


def test_flat_noise_fails_the_spectrum_premise(tmp_path):
    noise = np.random.default_rng(0).integers(0, 200, (64, 32, 32, 3), dtype=np.uint8)  # white noise: slope ~ 0
    result = _check(_write(tmp_path, noise))
    assert result.exit_code == 1
    assert any(line.startswith("amplitude-spectrum slope") and line.endswith("FAILS")
               for line in result.output.splitlines()), result.output


def test_unknown_dataset_is_one_line():
    result = _check("synth-cifar100")
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1 and "synth-cifar100" in result.output


def _with_clean_rows(monkeypatch, records: list[dict]):
    """check_data's module with a results database that holds ``records`` (keys taken as the profile's own)."""
    import importlib

    import pandas as pd

    check_data = importlib.import_module("defbench.benchmark.commands.check_data")
    table = importlib.import_module("defbench.benchmark.commands.table")

    class FakeResults:
        def evaluations(self, **_):
            return pd.DataFrame(records)
    monkeypatch.setattr(table, "open_results", lambda profile: FakeResults())
    monkeypatch.setattr(check_data, "profile_rows", lambda rows, profile: rows)  # fake keys: tested below
    return check_data


def _clean_row(version: str, asr: float, attack: str = "badencoder", eval_key: str = "k", seed: int = 0,
               trigger: str = "patch") -> dict:
    import json
    return {"pretrain": "synth-cifar10", "seed": seed, "asr_all": asr, "attack": attack, "eval_key": eval_key,
            "config": json.dumps({"eval": {"data": version, "trigger": {"type": trigger}}})}


def test_clean_encoder_rows_are_read_only_for_the_data_version_measured(monkeypatch):
    check_data = _with_clean_rows(monkeypatch, [_clean_row("synthetic-v5", 40.0, "badencoder", "a"),
                                                _clean_row("synthetic-v5r1", 3.0, "bassl", "b"),
                                                _clean_row("synthetic-v5r1", 3.0, "badencoder", "b"),
                                                _clean_row("synthetic-v5r1", 30.0, "ctrl", "c", trigger="ctrl")])
    lines, holds = check_data.clean_encoder_rows("synth-svhn", "tiny", 10, "synthetic-v5r1")
    assert not holds  # ctrl's clean row fails, so the premise fails
    # one line per clean evaluation, naming every row group whose trigger it stamps
    assert len(lines) == 2, lines
    assert "[badencoder, bassl]" in lines[0] and "3.00 %" in lines[0] and lines[0].endswith("ok"), lines
    assert "[ctrl]" in lines[1] and lines[1].endswith("FAILS"), lines
    stale_only, holds = check_data.clean_encoder_rows("synth-svhn", "tiny", 10, "synthetic-v6")
    assert holds and len(stale_only) == 1 and "no clean rows" in stale_only[0] and "synthetic-v6" in stale_only[0]


def test_clean_encoder_premise_is_read_on_the_mean_when_there_are_several_seeds(monkeypatch):
    draws = [(0, 19.7), (1, 8.0), (2, 6.0)]  # one draw over the limit, their mean under it
    check_data = _with_clean_rows(monkeypatch, [_clean_row("synthetic-v5", asr, eval_key=f"k{seed}", seed=seed)
                                                for seed, asr in draws])
    lines, holds = check_data.clean_encoder_rows("synth-svhn", "tiny", 10, "synthetic-v5")
    assert holds and len(lines) == 4, lines
    assert lines[0].endswith("FAILS") and lines[1].endswith("ok"), lines
    assert "mean of 3 seeds" in lines[3] and "11.23 ± 7.40 %" in lines[3] and lines[3].endswith("ok"), lines


def test_seeds_are_matched_by_trigger_even_when_other_row_groups_share_one_seed(monkeypatch):
    """DRUPE's probe shares seed 0's clean evaluation with BadEncoder (same patch); seed 1 has BadEncoder only."""
    check_data = _with_clean_rows(monkeypatch, [_clean_row("synthetic-v5", 19.7, "badencoder", "k0"),
                                                _clean_row("synthetic-v5", 19.7, "drupe", "k0"),
                                                _clean_row("synthetic-v5", 4.9, "badencoder", "k1", seed=1)])
    lines, holds = check_data.clean_encoder_rows("synth-svhn", "tiny", 10, "synthetic-v5")
    assert holds and len(lines) == 3, lines
    assert "[badencoder, drupe]" in lines[2] and "mean of 2 seeds" in lines[2] and lines[2].endswith("ok"), lines


def test_only_the_profiles_own_clean_rows_speak_for_the_data():
    """A study arm's clean encoder (a wider one) has another key than the profile's: its row is left out."""
    import importlib

    import pandas as pd

    from defbench.benchmark.pipeline.plan import planned_evaluation_key
    from defbench.benchmark.pipeline.settings import load_profile

    check_data = importlib.import_module("defbench.benchmark.commands.check_data")
    cell = ("badencoder", "none", "clean", "synth-cifar10", "synth-svhn")
    own = planned_evaluation_key(load_profile("tiny", {"seed": 1}), *cell)
    wider = planned_evaluation_key(load_profile("tiny", {"seed": 1, "encoder.width": 32}), *cell)
    assert own and wider and own != wider
    rows = pd.DataFrame([dict(zip(["attack", "defense", "role", "pretrain", "downstream"], cell), seed=1,
                              eval_key=key, asr_all=asr) for key, asr in ((own, 9.0), (wider, 30.0))])
    kept = check_data.profile_rows(rows, "tiny")
    assert list(kept.eval_key) == [own]

