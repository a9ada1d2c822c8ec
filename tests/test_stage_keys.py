"""Stage keys do not change for unchanged settings, however the planner and the stage record are written.

The pins were computed with the code before the typed config travelled on the stage (the spec was then built by
hand from ``dataclasses.asdict``). They hold each stage's key with every code version replaced by a constant (so
they pin what a key hashes: kind, name, spec, inputs and the seeding salt, not how a method's module is written)
and its seed identity (the key without code, which draws its random numbers): a refactor that changes either
re-keys stored results and re-draws the golden values. A change that adds a setting to a method does re-key its
stages: update its pin in that commit, saying so."""
import pickle
from unittest import mock

import pytest

from defbench.attacks import ATTACKS
from defbench.benchmark.pipeline import stages
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.settings import load_profile
from defbench.defenses import DEFENSES

CASES = {
    "ft, --set defense.epochs=5": ("ci", {"defense.epochs": 5}, "badencoder", "ft"),
    "patchsearch on bassl": ("ci", {}, "bassl", "patchsearch"),  # the suspect's pre-training data in its spec
    "dede, tiny": ("tiny", {}, "badencoder", "dede"),  # a screened encoder's evaluation
    "mimic, --set defense.mimic.lr=0.01": ("ci", {"defense.mimic.lr": 0.01}, "badencoder", "mimic"),
}
PINNED = {  # (key with code versions fixed, seed identity), computed before the refactor
    "ft, --set defense.epochs=5|evaluate": ("15adece941cdaa2259d20a56", "5e19097eaa1949ffc0c6ce2d"),
    "ft, --set defense.epochs=5|defend": ("8a1f8ff300541b306749e0e5", "1d14d13f9e9364da6c8b39de"),
    "ft, --set defense.epochs=5|attack": ("812e53654c29f33c371db5a9", "8226786103d24cd7b0873ebe"),
    "ft, --set defense.epochs=5|pretrain": ("10a33df27fda0718dcb750a5", "052d10dd3f066dc9d62b7950"),
    "patchsearch on bassl|evaluate": ("89f2e989b085cecdb3e0526f", "927aa7c4f3470386d8a10b19"),
    "patchsearch on bassl|defend": ("c8c4d85378e182892f82865e", "e3236f752c5ce055ac418dee"),
    "patchsearch on bassl|attack": ("5ec92bc5e1ffdf9f7b82ef78", "91719a65db33c7ad312ee400"),
    "patchsearch on bassl|pretrain": ("10a33df27fda0718dcb750a5", "052d10dd3f066dc9d62b7950"),
    "dede, tiny|evaluate": ("42e37470d5278f1967f1411f", "fb6f9e31046c44b51af36eab"),
    "dede, tiny|defend": ("dbeb2a7e347e76006e146b3c", "aea417bebc569bd270854598"),
    "dede, tiny|attack": ("2bc6bb48b4a7e21e04f59462", "74cb4d1413cbd6b1848c5811"),
    "dede, tiny|pretrain": ("1aad9207572f3b7f06c50f27", "690996350f3d1c36d4cee6d5"),
    "mimic, --set defense.mimic.lr=0.01|evaluate": ("5fdadf3e41cd024387da5aac", "616af42329b3937a69d9f077"),
    "mimic, --set defense.mimic.lr=0.01|defend": ("8d642b7f8a03e326e0921edd", "9917eea11c8dca6ee91e1225"),
    "mimic, --set defense.mimic.lr=0.01|attack": ("812e53654c29f33c371db5a9", "8226786103d24cd7b0873ebe"),
    "mimic, --set defense.mimic.lr=0.01|pretrain": ("10a33df27fda0718dcb750a5", "052d10dd3f066dc9d62b7950"),
}


def _cell(case: str) -> dict[str, stages.Stage]:
    profile, sets, attack, defense = CASES[case]
    return cell_stages(load_profile(profile, sets), attack, defense, "synth-cifar10", "synth-stl10")


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_and_seeds_of_unchanged_settings_are_pinned(case):
    with mock.patch.object(stages, "code_version", lambda *roots: "0" * 12):
        evaluate = _cell(case)["defended"]
        defend, clean = evaluate.deps[0], _cell(case)["clean"]
        found = {"evaluate": evaluate, "defend": defend, "attack": defend.deps[0], "pretrain": clean.deps[0]}
        for role, stage in found.items():
            assert (stage.key, stage.seed_identity) == PINNED[f"{case}|{role}"], f"{case}: the {role} stage re-keyed"


def test_the_typed_config_travels_on_the_stage_and_is_rebuilt_in_another_process():
    """Planned once and checked once: the runner gets the very object the planner built. A stage pickled for a
    worker travels as its spec and rebuilds an equal config there (same key)."""
    profile = load_profile("ci", {"defense.mimic.lr": 0.01, "evaluate.hidden": [64, 32]})
    for attack in ATTACKS.names():
        for defense in DEFENSES.names():
            cell = cell_stages(profile, attack, defense, "synth-cifar10", "synth-stl10")
            planned = [cell["defended"], *cell["defended"].deps] if "defended" in cell else [cell["undefended"]]
            planned += [cell["undefended"].deps[0], cell["clean"].deps[0]]
            for stage in planned:
                assert stage.settings is stage.config and stage.config is not None, stage.label
                copy = pickle.loads(pickle.dumps(stage))
                assert copy.config is None and copy.settings == stage.config and copy.key == stage.key, stage.label
    mimic = cell_stages(profile, "badencoder", "mimic", "synth-cifar10", "synth-stl10")["defended"]
    assert mimic.deps[0].settings.lr == 0.01 and mimic.settings.hidden == (64, 32)  # a tuple, as typed


def test_one_record_per_stage_kind():
    """Runner, code roots, whether it makes an encoder and its results row, for every kind, in one place."""
    assert set(stages.KINDS) == {"pretrain", "attack", "defend", "evaluate", "measure", "import"}
    assert {k for k, kind in stages.KINDS.items() if kind.makes_encoder} == {"pretrain", "attack", "defend", "import"}
    assert {k for k, kind in stages.KINDS.items() if kind.write_row} == {"evaluate", "measure"}
