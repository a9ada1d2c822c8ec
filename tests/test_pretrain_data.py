"""The opt-in "pre-training data" input of a defense (``needs_pretrain_data``), end to end through the pipeline.

- a defense without the flag is called with the clean set alone, and the suspect's pre-training set is never
  even built for it;
- a flagged defense gets exactly the images the suspect was pre-trained on: BASSL's poisoned set (captured from
  the attack's own ``train_simclr`` call), in another order, or the clean pre-training set behind BadEncoder;
- every built-in data-poisoning attack has a builder, and each builder rebuilds exactly the set its attack
  trains on;
- what a defense used shows in ``defbench list defenses``, in its result and in Table I's notes.
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

from conftest import MICRO, PRETRAIN, TASK
from defbench.attacks import ATTACKS, AttackInputs, PatchTrigger, register_attack, trigger_from_description
from defbench.attacks import bassl as bassl_module
from defbench.attacks import blto as blto_module
from defbench.attacks.learned import LEARNED_TRIGGER
from defbench.benchmark.cli import main
from defbench.benchmark.pipeline import pretrain_inputs
from defbench.benchmark.pipeline import stages as stages_module
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.scheduler import run_grid
from defbench.benchmark.pipeline.settings import load_profile, parse_sets
from defbench.benchmark.pipeline.stages import Env
from defbench.benchmark.pipeline.store import ArtifactStore
from defbench.core import RegistryError
from defbench.core.registry import Component
from defbench.defenses import DEFENSES, REMOVED_RECORD, PretrainData
from defbench.defenses.base import DefenseOptions
from defbench.encoders import RunContext, SimCLRConfig, build_encoder
from defbench.reports import tables

POISONS = 48
SETS = MICRO + [f"attack.bassl.max_poison={POISONS}"]


@dataclass
class ToyConfig:
    scale: float = 1.0


def _toy(name: str, flagged: bool, seen: dict) -> Component:
    """A defense that keeps what it was called with (and, flagged, 'removes' the first five images)."""
    def fn(encoder, clean, cfg, ctx, **extra):
        seen.update(clean=clean, extra=extra)
        if "pretrain" in extra:
            ctx.record(REMOVED_RECORD, [0, 1, 2, 3, 4])
        return encoder
    return Component(name, fn, ToyConfig, "a toy", {}, DefenseOptions(needs_pretrain_data=flagged), "defense")


@pytest.fixture
def env(tmp_path) -> Env:
    """A store of its own per test: the attacks run (and are captured) instead of coming from a cache."""
    home = tmp_path
    return Env(store=ArtifactStore(home / "artifacts"), db=ResultsDB(home / "results.sqlite"), data_dir=home / "data",
               device=torch.device("cpu"))


def _defend(env, monkeypatch, attack: str, name: str, flagged: bool) -> tuple:
    seen: dict = {}
    monkeypatch.setitem(DEFENSES._items, name, _toy(name, flagged, seen))
    profile = load_profile("ci", parse_sets(SETS))
    cell = cell_stages(profile, attack, name, PRETRAIN, TASK)
    outcomes = run_grid([cell["defended"]], env, show_progress=False)
    assert all(o.status in ("ran", "cached") for o in outcomes), [o.error for o in outcomes if o.error]
    return seen, cell["defended"].deps[0], cell


def _capture_training(monkeypatch, module) -> dict:
    """Let ``module``'s ``train_simclr`` run as usual, keeping the images it trained on (under "images")."""
    trained: dict = {}
    real = module.train_simclr

    def capture(encoder, images, cfg, ctx, desc=""):
        trained["images"] = images.clone()
        return real(encoder, images, cfg, ctx, desc=desc)
    monkeypatch.setattr(module, "train_simclr", capture)
    return trained


def _fingerprints(images: torch.Tensor) -> list[str]:
    """The images as a multiset (order does not count)."""
    return sorted(hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest() for image in images)


@pytest.mark.slow
def test_a_defense_without_the_flag_never_gets_the_pretraining_data(env, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the pre-training set was built for a defense that did not ask for it")
    monkeypatch.setattr(pretrain_inputs, "suspect_pretraining", never)
    seen, stage, _ = _defend(env, monkeypatch, "bassl", "toy-clean-only", flagged=False)
    assert seen["extra"] == {} and "pretrain_data" not in stage.spec
    result = env.store.read_meta("defend", stage.key)["result"]
    assert result["defense_data"] == "clean set" and "pretrain_data" not in result


@pytest.mark.slow
def test_a_flagged_defense_gets_exactly_the_poisoned_set_bassl_trained_on(env, monkeypatch):
    trained = _capture_training(monkeypatch, bassl_module)
    seen, stage, cell = _defend(env, monkeypatch, "bassl", "toy-with-pretrain", flagged=True)
    assert "images" in trained, "the BASSL attack stage was cached, not run: the capture saw nothing"
    given = seen["extra"]["pretrain"]
    assert isinstance(given, PretrainData) and set(seen["extra"]) == {"pretrain"}
    assert given.recipe == SimCLRConfig(**stage.spec["pretrain_data"]["recipe"])
    assert len(given) == 256 + POISONS == len(trained["images"])
    assert _fingerprints(given.images) == _fingerprints(trained["images"])  # the very set BASSL trained on ...
    assert not torch.equal(given.images, trained["images"])  # ... but not in BASSL's order (poisons appended last)
    meta = env.store.read_meta("defend", stage.key)
    attack_records = env.store.read_meta("attack", stage.deps[0].key)["records"]
    summary = meta["result"]["pretrain_data"]
    assert summary["n_poison"] == attack_records["n_poison"] == POISONS
    assert summary["source"] == pretrain_inputs.POISONED_SOURCE and summary["removed"] == 5
    assert meta["result"]["defense_data"] == "clean set + pre-training set"
    assert meta["records"][REMOVED_RECORD] == [0, 1, 2, 3, 4]
    # the results row says what the defense used, and Table I names it in its notes
    rows = env.db.evaluations()
    row = rows[rows.eval_key == cell["defended"].key].iloc[0]
    extra = json.loads(row.extra)
    assert extra["defense_data"] == "clean set + pre-training set" and extra["pretrain_n_poison"] == POISONS
    assert tables.defenses_using_pretrain_data(rows, ["toy-with-pretrain", "toy-clean-only"]) == ["toy-with-pretrain"]


@pytest.mark.slow
def test_a_flagged_defense_behind_blto_gets_the_set_stamped_with_the_learned_trigger(env, monkeypatch):
    trained = _capture_training(monkeypatch, blto_module)
    seen, stage, _ = _defend(env, monkeypatch, "blto", "toy-with-pretrain", flagged=True)
    assert "images" in trained, "the BLTO attack stage was cached, not run: the capture saw nothing"
    given = seen["extra"]["pretrain"]
    assert _fingerprints(given.images) == _fingerprints(trained["images"])  # rebuilt with the stored trigger
    summary = env.store.read_meta("defend", stage.key)["result"]["pretrain_data"]
    assert summary["source"] == pretrain_inputs.POISONED_SOURCE
    assert summary["n_poison"] == env.store.read_meta("attack", stage.deps[0].key)["records"]["n_poison"] > 0


@pytest.mark.slow
def test_a_flagged_defense_gets_the_clean_pretraining_set_behind_badencoder(env, monkeypatch):
    trained = _capture_training(monkeypatch, stages_module)
    seen, stage, _ = _defend(env, monkeypatch, "badencoder", "toy-with-pretrain", flagged=True)
    assert "images" in trained, "the clean pre-training stage was cached, not run: the capture saw nothing"
    given = seen["extra"]["pretrain"]
    assert _fingerprints(given.images) == _fingerprints(trained["images"])
    summary = env.store.read_meta("defend", stage.key)["result"]["pretrain_data"]
    assert summary["n_poison"] == 0 and summary["source"] == pretrain_inputs.CLEAN_SOURCE


DATA_POISONING = [c.name for c in ATTACKS.items()
                  if c.module.startswith("defbench.attacks.") and not c.options.needs_clean_encoder]


def test_a_data_poisoning_attack_must_say_how_its_set_is_rebuilt_when_it_registers():
    assert DATA_POISONING and all(callable(ATTACKS.get(a).options.pretraining_set) for a in DATA_POISONING)
    config = ATTACKS.get("bassl").config
    with pytest.raises(RegistryError, match="pretraining_set=builder"):
        register_attack("poisons-without-builder", config=config, summary="-", needs_clean_encoder=False)
    with pytest.raises(RegistryError, match="drop pretraining_set"):
        register_attack("encoder-with-builder", config=config, summary="-", pretraining_set=lambda *a: None)
    assert "poisons-without-builder" not in ATTACKS and "encoder-with-builder" not in ATTACKS


@pytest.mark.parametrize("attack", DATA_POISONING)
def test_a_builder_rebuilds_the_set_its_attack_trains_on(attack, monkeypatch):
    component = ATTACKS.get(attack)
    module = __import__(component.module, fromlist=["train_simclr"])
    trained = {}

    def capture(encoder, images, cfg, ctx, desc=""):
        trained["images"] = images.clone()
        return []
    owner = module if hasattr(module, "train_simclr") else bassl_module  # bassl-sslbkd trains via bassl's function
    monkeypatch.setattr(owner, "train_simclr", capture)
    gen = torch.Generator().manual_seed(5)
    inputs = AttackInputs(encoder_config=build_encoder(width=8, channels_last=False).config,
                          pretrain_images=torch.randint(0, 256, (200, 3, 32, 32), generator=gen, dtype=torch.uint8),
                          target_images=torch.randint(0, 256, (30, 3, 32, 32), generator=gen, dtype=torch.uint8),
                          trigger=component.config().make_trigger(32) if attack == "ctrl" else PatchTrigger(size=4),
                          pretrain_recipe=SimCLRConfig(epochs=1, batch_size=16))
    cfg = component.make_config("ci")
    ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(11)
    component.fn(inputs, cfg, ctx)
    if LEARNED_TRIGGER in ctx.records:  # the harness hands a builder the trigger the attack learned
        inputs = dataclasses.replace(inputs, trigger=trigger_from_description(ctx.records[LEARNED_TRIGGER]))
    images, poisoned = component.options.pretraining_set(inputs, cfg, torch.Generator().manual_seed(11))
    assert torch.equal(images, trained["images"])
    assert int(poisoned.sum()) == ctx.records["n_poison"] > 0


def test_list_defenses_says_which_use_pretraining_data():
    lines = CliRunner().invoke(main, ["list", "defenses"]).output.splitlines()
    by_name = {line.split()[0]: line for line in lines if line.strip()}
    assert "clean + pretrain" in by_name["patchsearch"]
    assert "clean + pretrain" not in by_name["ft"] and by_name["ft"].split()[1] == "clean"
