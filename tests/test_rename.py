"""A renamed method keeps its stored results: registered under its new name with ``formerly=("old",)``, its stages
keep the keys of its first name (so the rows stored under it stay current), the rows read under the new name, and
the old name still finds it. No training: the keys and the table's row selection are the whole mechanism."""
import functools
import importlib.util
import sys
from dataclasses import dataclass

import pytest

from defbench.benchmark.pipeline import keys
from defbench.benchmark.pipeline.plan import cell_stages, planned_evaluation_key
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.settings import load_profile
from defbench.core import ComponentRegistry, RegistryError
from defbench.defenses import DEFENSES
from defbench.reports.tables import select_rows

MODULE = "defbench_plugins.toy_rename"
V1 = '''
from dataclasses import dataclass

from defbench.defenses import register_defense


@dataclass
class ToyConfig:
    epochs: int = 1


@register_defense("toy-before", config=ToyConfig, summary="test: the encoder as it is")
def toy(encoder, clean, config, ctx):
    return encoder
'''
RENAMED = V1.replace('"toy-before",', '"toy-after", formerly=("toy-before",),')
RENAMED_WITHOUT_FORMERLY = V1.replace('"toy-before",', '"toy-after",')
CELL = ("badencoder", "synth-cifar10", "synth-stl10")


@pytest.fixture
def load_module(tmp_path, monkeypatch):
    """Import a version of the toy plugin (each from its own file, all as MODULE); every registration, rename
    and cached code version it leaves is undone after the test."""
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))
    monkeypatch.setattr(DEFENSES, "_renamed", dict(DEFENSES._renamed))
    versions = iter(range(100))

    def load(source: str, replaces: str | None = None):
        if replaces:  # the old registration is gone with the old file
            monkeypatch.delitem(DEFENSES._items, replaces)
        path = tmp_path / f"v{next(versions)}" / "toy_rename.py"
        path.parent.mkdir()
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(MODULE, path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, MODULE, module)
        spec.loader.exec_module(module)
        keys._module_info.cache_clear()  # a new source under the same module name
        return module

    yield load
    keys._module_info.cache_clear()


def test_a_renamed_defense_keeps_its_keys_and_its_stored_rows(tmp_path, load_module):
    profile = load_profile("ci")
    load_module(V1)
    before = cell_stages(profile, CELL[0], "toy-before", *CELL[1:])["defended"]
    db = ResultsDB(tmp_path / "results.sqlite")  # the row `defbench grid` stored before the rename
    db.add_evaluation({"row_key": "r1", "eval_key": before.key, "encoder_key": before.deps[0].key, "profile": "ci",
                       "overrides": {}, "seed": profile.seed, "attack": CELL[0], "defense": "toy-before",
                       "role": "defended", "pretrain": CELL[1], "downstream": CELL[2], "acc": 61.0, "asr_all": 3.0})

    load_module(RENAMED, replaces="toy-before")
    after = cell_stages(profile, CELL[0], "toy-after", *CELL[1:])["defended"]
    assert after.key == before.key and after.seed() == before.seed()  # same stages, same random draws
    assert after.deps[0].name == "toy-before" and after.labels["defense"] == "toy-after"  # keyed by the first name
    by_old_name = cell_stages(profile, CELL[0], "toy-before", *CELL[1:])["defended"]
    assert by_old_name.key == before.key and by_old_name.labels["defense"] == "toy-after"

    rows = db.evaluations(profile="ci")
    assert list(rows.defense) == ["toy-after"]  # read under the current name
    kept, stale = select_rows(rows, profile.seed, functools.partial(planned_evaluation_key, profile),
                              profile.overrides_for)
    assert len(kept) == 1 and stale == 0 and kept.acc.iloc[0] == 61.0
    # settings written for the old name reach the renamed method
    assert load_profile("ci", {"defense.toy-before.epochs": 3}).defense_config("toy-after").epochs == 3


def test_a_rename_without_formerly_orphans_the_rows(load_module):
    """The same edit without ``formerly=`` is a new method: new keys (the mechanism above is what keeps them)."""
    profile = load_profile("ci")
    load_module(V1)
    before = cell_stages(profile, CELL[0], "toy-before", *CELL[1:])["defended"].key
    load_module(RENAMED_WITHOUT_FORMERLY, replaces="toy-before")
    assert cell_stages(profile, CELL[0], "toy-after", *CELL[1:])["defended"].key != before


def test_a_rename_is_not_a_change_of_code():
    assert keys.normalised_source_hash(RENAMED) == keys.normalised_source_hash(V1)
    assert keys.normalised_source_hash(RENAMED_WITHOUT_FORMERLY) != keys.normalised_source_hash(V1)


def test_former_names_cannot_be_taken_twice():
    reg = ComponentRegistry("thing")

    @dataclass
    class Cfg:
        epochs: int = 1

    reg.component("b", config=Cfg, summary="x", formerly="a")(lambda *a: None)
    assert reg.get("a") is reg.get("b") and "a" in reg and reg.names() == ["b"] and reg.renamed() == {"a": "b"}
    assert reg.get("b").key_name == "a"
    with pytest.raises(RegistryError, match="former name of 'b'"):
        reg.component("a", config=Cfg, summary="x")(lambda *a: None)
    with pytest.raises(RegistryError, match="but so was 'b'"):
        reg.component("c", config=Cfg, summary="x", formerly=("a",))(lambda *a: None)
    with pytest.raises(RegistryError, match="'b' is still registered"):
        reg.component("d", config=Cfg, summary="x", formerly=("b",))(lambda *a: None)
