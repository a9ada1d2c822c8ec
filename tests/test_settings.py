"""Settings cannot silently lie: typed values, specific-beats-generic, profile inheritance, code-keyed caches,
and `defbench config` saying where each value came from."""
import json
import subprocess
import sys

import pytest

from defbench.benchmark.pipeline import keys
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.settings import load_profile, parse_sets
from defbench.core import ConfigError
from defbench.defenses import DEFENSES, register_defense


def _load(*sets, profile="ci"):
    return load_profile(profile, parse_sets(list(sets)))


# ----------------------------------------------------------------- 1. typed values

@pytest.mark.parametrize("item, message", [
    ("defense.mimic.use_mi=flase", "defense.mimic.use_mi expects true or false, got 'flase'"),
    ("defense.epochs=5.5", "defense.epochs expects an integer, got 5.5"),
    ("defense.ft.lr=fast", "defense.ft.lr expects a number, got 'fast'"),
    ("defense.ft.lr=nan", "defense.ft.lr must be a finite number"),
    ("attack.badencoder.reference_pick=3", "expects a string, got 3"),
    ("defense.nad.betas=[1, \"x\", 3]", "defense.nad.betas[1] expects a number"),
])
def test_component_values_are_typed_when_the_profile_is_loaded(item, message):
    with pytest.raises(ConfigError) as err:
        profile = _load(item)  # loading checks the key and its value; building a config checks again
        for defense in ("ft", "mimic", "nad"):
            cell_stages(profile, "badencoder", defense, "synth-cifar10", "synth-stl10")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_value_is_checked_even_where_it_takes_no_effect():
    """A more specific key shadows defense.epochs for ft, and no mimic runs: both values are still typos."""
    for sets in (("defense.epochs=1.5", "defense.ft.epochs=1"), ("defense.mimic.lr=0",),
                 ("defense.momentum=2",), ("attack.drupe.epochs=-1",)):
        with pytest.raises(ConfigError):
            _load(*sets)
    # a generic key fits one of the fields it names: inv_lr is a number in one defense, a triple in another
    assert _load("defense.inv_lr=0.1") and _load("defense.inv_lr=[0.1, 0.1, 0.1]")


def test_numbers_are_coerced_to_the_field_type():
    cfg = _load("defense.ft.lr=1", "defense.ft.epochs=3.0").defense_config("ft")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.epochs == 3 and isinstance(cfg.epochs, int)


def test_a_bad_value_fails_before_any_stage_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "defbench.benchmark.cli", "run", "--profile", "ci",
                          "--set", "defense.epochs=5.5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "expects an integer, got 5.5" in out.stderr
    assert not any((tmp_path / "artifacts").glob("*/*/*/meta.json"))  # nothing was computed


# ----------------------------------------------------------------- 2. precedence

def test_the_specific_key_beats_the_generic_one_in_either_order():
    for sets in (("defense.mimic.epochs=40", "defense.epochs=5"), ("defense.epochs=5", "defense.mimic.epochs=40")):
        profile = _load(*sets)
        assert profile.defense_config("mimic").epochs == 40 and profile.defense_config("ft").epochs == 5


def test_two_spellings_of_one_setting_give_one_stage_key():
    generic = cell_stages(_load("defense.epochs=2"), "badencoder", "ft", "synth-cifar10", "synth-stl10")
    specific = cell_stages(_load("defense.ft.epochs=2"), "badencoder", "ft", "synth-cifar10", "synth-stl10")
    assert generic["defended"].key == specific["defended"].key


def test_a_later_layer_beats_an_earlier_specific_key(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "ci"\n[defense.ft]\nepochs = 7\n')
    assert load_profile(str(path)).defense_config("ft").epochs == 7
    assert load_profile(str(path), {"defense.epochs": 2}).defense_config("ft").epochs == 2  # --set wins


# ----------------------------------------------------------------- 3. profiles of your own

def test_a_profile_file_inherits_a_builtin_profile_and_its_component_entries(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "tiny"\ndescription = "tiny, wider"\n[encoder]\nwidth = 32\n')
    mine, tiny = load_profile(str(path)), load_profile("tiny")
    assert mine.name == "mine" and mine.chain == ["mine", "tiny"] and mine.encoder.width == 32
    assert mine.defense_config("mimic").lr == tiny.defense_config("mimic").lr != load_profile("paper").defense_config(
        "mimic").lr
    assert mine.pretrain == tiny.pretrain and mine.grid == tiny.grid
    second = tmp_path / "second.toml"  # a base may itself be a file, named relative to this one
    second.write_text('base = "mine.toml"\n[clean]\nfraction = 0.1\n')
    assert load_profile(str(second)).encoder.width == 32 and load_profile(str(second)).clean.fraction == 0.1


def test_a_file_named_like_a_builtin_profile_is_not_that_profile(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text('[encoder]\nwidth = 16\n')
    assert load_profile(str(path)).defense_config("mimic").lr == load_profile("paper").defense_config("mimic").lr


def test_a_defense_table_with_plain_values_sets_every_defense(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "ci"\n[defense]\nepochs = 5\n')
    profile = load_profile(str(path))
    assert profile.defense_config("ft").epochs == 5 and profile.defense_config("mimic").epochs == 5


@pytest.mark.parametrize("text, message", [
    ('base = "tinny"\n', "unknown profile 'tinny'; did you mean tiny"),
    ('base = 3\n', "base must be a profile name or a .toml path"),
    ('base = "loop.toml"\n', "cycle"),
    ('[encoder.inner]\nwidth = 3\n', "only [attack.NAME] and [defense.NAME] have sub-tables"),
    ('[defense]\nepochz = 5\n', "did you mean defense.epochs"),
])
def test_bad_profile_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "loop.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_profiles_entry_naming_no_profile_is_rejected():
    from dataclasses import dataclass

    @dataclass
    class ToyConfig:
        epochs: int = 3

    register_defense("toy-typo-profile", config=ToyConfig, summary="test", profiles={"tinyy": {"epochs": 1}})(
        lambda encoder, clean, cfg, ctx: encoder)
    try:
        with pytest.raises(ConfigError, match=r"unknown profiles \['tinyy'\]"):
            load_profile("tiny").defense_config("toy-typo-profile")
    finally:
        DEFENSES._items.pop("toy-typo-profile")


# ----------------------------------------------------------------- 4. code versions

def test_a_stage_hashes_every_project_module_it_uses_transitively():
    drupe = keys.module_closure("defbench.attacks.drupe")
    assert {"defbench.attacks.badencoder", "defbench.attacks.triggers", "defbench.encoders.augment"} <= set(drupe)
    moth = keys.module_closure("defbench.defenses.moth")
    assert "defbench.defenses.decree" in moth  # moth uses decree's helpers
    assert not any(name.startswith("defbench.benchmark") for name in moth)  # the harness never re-keys


def test_registration_plumbing_is_key_neutral():
    """The registries and registration functions count with the hash they had when declared neutral, so a
    registration option re-keys nothing; every other module counts with its source's hash."""
    closure = keys.module_closure("defbench.defenses.ft", "defbench.attacks.badencoder")
    assert {m: closure[m] for m in keys.NEUTRAL} == keys.NEUTRAL
    assert closure["defbench.defenses.ft"] == keys._module_info("defbench.defenses.ft")[0]


def test_docstrings_and_comments_do_not_change_a_code_version():
    code = 'def f(x):\n    return x + 1\n'
    documented = '"""A module."""\n# a comment\ndef f(x):\n    """Add one."""\n    return x + 1  # why\n'
    changed = 'def f(x):\n    return x + 2\n'
    assert keys.normalised_source_hash(code) == keys.normalised_source_hash(documented)
    assert keys.normalised_source_hash(code) != keys.normalised_source_hash(changed)


# ----------------------------------------------------------------- 5. defbench config

def test_config_says_which_layer_set_each_value(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "ci"\n[defense.mimic]\nlr = 0.002\n')
    out = subprocess.run([sys.executable, "-m", "defbench.benchmark.cli", "config", "--profile", str(path),
                          "--defense", "mimic", "--set", "defense.mimic.epochs=7", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = {r["key"]: r for r in json.loads(out.stdout)["settings"]}
    assert rows["defense.mimic.epochs"]["value"] == 7 and rows["defense.mimic.epochs"]["source"] == "--set"
    assert rows["defense.mimic.lr"]["source"].startswith("profile file") and rows["defense.mimic.lr"]["value"] == 0.002
    assert "'ci' entry" in rows["defense.mimic.mi_epochs"]["source"]
    assert rows["defense.mimic.alpha0"]["source"] == "paper default"
    assert rows["encoder.width"]["source"].startswith("profile ci") and rows["encoder.width"]["stage"] == "pretrain"


# ----------------------------------------------------------------- 6. where a --set takes effect

def test_a_generic_key_the_chosen_defense_lacks_is_an_error_naming_it_and_its_fields(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from defbench.benchmark.cli import main
    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["run", "--profile", "ci", "--defense", "dede", "--set", "defense.epochs=5"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--set defense.epochs: defense dede has no setting 'epochs'" in result.stderr
    assert all(f in result.stderr for f in ("steps", "mask_ratio", "threshold_rule"))  # its fields, by name
    assert not (tmp_path / "artifacts").exists()  # refused before anything was computed
    for argv, message in ((["--defense", "none"], "nothing here runs a defense"),
                          (["--set", "defense.ft.epochs=2"], "more specific key (defense.ft.epochs)")):
        result = CliRunner().invoke(main, ["run", "--profile", "ci", "--set", "defense.epochs=5", *argv])
        assert result.exit_code == 2 and message in result.stderr, result.output


def test_a_generic_key_in_a_grid_says_where_it_took_effect_and_only_those_rows_record_it():
    from defbench.benchmark.pipeline.plan import components_used
    from defbench.benchmark.pipeline.plan import expand_grid, grid_spec

    def cells(profile):
        spec = grid_spec(profile, ["badencoder"], ["ft", "dede"], ["synth-cifar10"], ["synth-stl10"])
        return {key[1]: stage for key, stage in expand_grid(profile, spec).items()}

    profile, plain = _load("defense.epochs=2", "encoder.width=8"), cells(_load("encoder.width=8"))
    planned = cells(profile)
    assert profile.check_reach(components_used(list(planned.values()))) == [
        "--set defense.epochs=2 takes effect for defense ft; not for dede (no such setting, or a "
        "defense.NAME.epochs key sets it)"]
    recorded = {column: stage.labels["overrides"] for column, stage in planned.items()}
    assert recorded == {"ft": {"defense.epochs": 2, "encoder.width": 8}, "dede": {"encoder.width": 8},
                        "undefended": {"encoder.width": 8}, "clean": {"encoder.width": 8}}
    # where it took no effect the stage is the one computed without it (same key, same row)
    assert all(planned[c].key == plain[c].key for c in ("dede", "undefended", "clean"))
    assert planned["ft"].key != plain["ft"].key
    # a specific key of a defense that does not run is accepted (one --set list for many cells) and recorded nowhere
    other = cells(_load("defense.mimic.lr=0.01"))
    assert not any(stage.labels["overrides"] for stage in other.values())


def test_the_table_counts_stale_rows_by_the_overrides_each_row_records():
    import pandas as pd

    from defbench.reports.tables import current_rows
    profile = _load("defense.epochs=5")
    rows = pd.DataFrame([
        {"attack": "badencoder", "defense": "dede", "role": "defended", "pretrain": "p", "downstream": "t",
         "eval_key": "old-dede", "overrides": "{}"},  # an older dede row of this table: stale
        {"attack": "badencoder", "defense": "ft", "role": "defended", "pretrain": "p", "downstream": "t",
         "eval_key": "old-ft", "overrides": '{"defense.epochs": 5}'},  # an older ft row of this table: stale
        {"attack": "badencoder", "defense": "ft", "role": "defended", "pretrain": "p", "downstream": "t",
         "eval_key": "arm", "overrides": '{"defense.ft.lr": 0.1}'},  # another table's row (a study arm)
    ])
    kept, stale = current_rows(rows, lambda *cell: "current", profile.overrides_for)
    assert kept.empty and stale == 2
