from dataclasses import dataclass

import pytest

from defbench.attacks import ATTACKS, register_attack
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


def test_a_misspelt_registration_option_fails_when_the_method_registers():
    @dataclass
    class Cfg:
        epochs: int = 1

    with pytest.raises(TypeError, match="budjet"):
        register_defense("typo-option", config=Cfg, summary="x", budjet=("epochs",))
    with pytest.raises(TypeError, match="need_clean_encoder"):
        register_attack("typo-option", config=Cfg, summary="x", need_clean_encoder=False)
    with pytest.raises(RegistryError, match=r"budget= names \['epoch'\], not fields of Cfg \(epochs\)"):
        register_defense("typo-field", config=Cfg, summary="x", budget=("epoch",))
    with pytest.raises(RegistryError, match="must be a tuple of config field names"):
        register_defense("typo-string", config=Cfg, summary="x", cost="epochs")
    assert not {"typo-option", "typo-field", "typo-string"} & (set(DEFENSES.names()) | set(ATTACKS.names()))


def test_options_are_typed_and_a_misspelt_read_fails():
    ft, ctrl = DEFENSES.get("ft").options, ATTACKS.get("ctrl").options
    assert ft.budget == ("epochs",) and ft.screens is False and ctrl.needs_clean_encoder is False
    assert ft["budget"] == ft.get("budget", ()) == ("epochs",)  # the string form reads the same value
    for read in (lambda: ft["screen"], lambda: ft.get("screen", False), lambda: ctrl.get("needs_clean_encodr", True)):
        with pytest.raises(KeyError, match="has no option"):
            read()
