import pytest

from defbench.benchmark.pipeline.settings import ConfigError, builtin_profiles, load_profile, parse_sets


def test_builtin_profiles_load_and_differ_in_scale():
    assert {"paper", "tiny", "ci"} <= set(builtin_profiles())
    paper, tiny, ci = (load_profile(n) for n in ("paper", "tiny", "ci"))
    assert paper.encoder.width == 64 and paper.pretrain.epochs == 1000 and paper.evaluate.epochs == 1000
    assert paper.clean.fraction == 0.04 and paper.grid.pretrain == ["cifar10", "stl10"]
    assert ci.pretrain.epochs < tiny.pretrain.epochs < paper.pretrain.epochs
    assert tiny.grid.pretrain[0].startswith("synth-")


def test_paper_probes_as_the_mimic_code_does():
    """wssun/MIMIC training_downstream_classifier.py (--nn_epochs 1000, --lr 1e-4, --batch_size 64, hidden 512 and
    256) with evaluation/nn_classifier.py (Dropout 0.5 after the first layer, Adam): the Table I being reproduced."""
    probe = load_profile("paper").evaluate
    assert (probe.epochs, probe.lr, probe.batch_size, tuple(probe.hidden), probe.dropout) == \
        (1000, 1e-4, 64, (512, 256), 0.5)
    assert (probe.max_train, probe.max_test) == (0, 0)  # the whole downstream sets


def test_component_defaults_layer_paper_then_profile_then_overrides():
    paper = load_profile("paper").attack_config("badencoder")
    assert (paper.epochs, paper.lr, paper.lambda1) == (200, 1e-3, 1.0)
    tiny = load_profile("tiny").attack_config("badencoder")
    assert tiny.epochs < paper.epochs
    over = load_profile("tiny", parse_sets(["attack.epochs=2", "attack.badencoder.lr=0.5"]))
    assert over.attack_config("badencoder").epochs == 2 and over.attack_config("badencoder").lr == 0.5


def test_set_parses_toml_values():
    sets = parse_sets(["pretrain.epochs=3", "pretrain.lr=1e-2", "encoder.channels_last=false",
                       "grid.attacks=[\"bassl\"]"])
    p = load_profile("ci", sets)
    assert p.pretrain.epochs == 3 and p.pretrain.lr == 0.01 and p.encoder.channels_last is False
    assert p.grid.attacks == ["bassl"] and p.overrides["pretrain.epochs"] == 3


@pytest.mark.parametrize("item, hint", [
    ("pretrain.epoch=3", "pretrain.epochs"),
    ("defense.epochz=3", "defense.epochs"),
    ("atack.epochs=3", "attack.epochs"),
])
def test_typos_name_the_nearest_valid_key(item, hint):
    with pytest.raises(ConfigError) as err:
        load_profile("ci", parse_sets([item]))
    assert hint in str(err.value) and "\n" not in str(err.value)


def test_wrong_types_and_unknown_profiles_are_clear():
    with pytest.raises(ConfigError, match="expects an integer"):
        load_profile("ci", parse_sets(["pretrain.epochs=many"]))
    with pytest.raises(ConfigError, match="unknown profile 'tinny'; did you mean tiny"):
        load_profile("tinny")
    with pytest.raises(ConfigError, match="key=value"):
        parse_sets(["pretrain.epochs"])


def test_a_profile_file_can_be_given_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "mine"\n[encoder]\nwidth = 32\n[defense.ft]\nepochs = 7\n')
    p = load_profile(str(path))
    assert p.name == "mine" and p.encoder.width == 32 and p.defense_config("ft").epochs == 7
    path.write_text("[encoder]\nwidht = 32\n")
    with pytest.raises(ConfigError, match="encoder.width"):
        load_profile(str(path))
