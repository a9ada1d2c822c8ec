from dataclasses import dataclass

import pytest

from defbench.attacks import ATTACKS
from defbench.defenses import DEFENSES, register_defense
from defbench.core import ComponentRegistry, ConfigError, Registry, RegistryError


def test_unknown_names_list_the_known_ones():
    with pytest.raises(RegistryError) as err:
        DEFENSES.get("fine-tune")
    msg = str(err.value)
    assert "unknown defense 'fine-tune'" in msg and "ft" in msg and "none" in msg
    with pytest.raises(RegistryError, match="did you mean badencoder"):
        ATTACKS.get("badencoderr")


def test_register_with_profiles_and_validation():
    reg = ComponentRegistry("thing", "defbench.test-things")

    @dataclass
    class Cfg:
        epochs: int = 100
        lr: float = 0.1

    @reg.component("demo", config=Cfg, summary="a demo", profiles={"ci": {"epochs": 2}})
    def demo(*args):
        return "ok"

    comp = reg.get("demo")
    assert comp.make_config("paper").epochs == 100
    assert comp.make_config("ci").epochs == 2
    assert comp.make_config("ci", {"lr": 0.5}).lr == 0.5
    with pytest.raises(ConfigError, match="did you mean epochs"):
        comp.make_config("ci", {"epoch": 3})
    with pytest.raises(ConfigError, match="expects an integer"):
        comp.make_config("ci", {"epochs": 2.5})
    with pytest.raises(RegistryError, match="registered twice"):
        reg.component("demo", config=Cfg, summary="again")(lambda *a: None)


def test_every_registry_is_one_type_with_did_you_mean():
    from defbench.attacks import TRIGGER_TYPES
    from defbench.benchmark.analysis.studies import STUDIES
    from defbench.benchmark.datasets import DATASETS
    from defbench.defenses import DETECTORS, MEASUREMENTS
    from defbench.encoders.base import ARCHITECTURES
    for registry, typo in ((ATTACKS, "bassll"), (DEFENSES, "mimc"), (DATASETS, "synth-cifar1"),
                           (ARCHITECTURES, "resnet81"), (TRIGGER_TYPES, "pach"), (MEASUREMENTS, "stage_mi"),
                           (DETECTORS, "decre"), (STUDIES, "component")):
        assert isinstance(registry, Registry)
        with pytest.raises(RegistryError, match="did you mean"):
            registry.get(typo)
    plain = Registry("widget")
    plain.add("a", 1)
    with pytest.raises(RegistryError, match="registered twice"):
        plain.add("a", 2)


def test_config_must_be_a_dataclass():
    with pytest.raises(TypeError):
        register_defense("broken", config=dict, summary="x")
