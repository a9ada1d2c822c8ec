from dataclasses import dataclass

import pytest

from defbench.attacks import ATTACKS
from defbench.defenses import DEFENSES, register_defense
from defbench.encoders.registry import Registry, RegistryError


def test_unknown_names_list_the_known_ones():
    with pytest.raises(RegistryError) as err:
        DEFENSES.get("fine-tune")
    msg = str(err.value)
    assert "unknown defense 'fine-tune'" in msg and "ft" in msg and "none" in msg
    with pytest.raises(RegistryError, match="did you mean badencoder"):
        ATTACKS.get("badencoderr")


def test_register_with_profiles_and_validation():
    reg = Registry("thing", "defbench.test-things")

    @dataclass
    class Cfg:
        epochs: int = 100
        lr: float = 0.1

    @reg.register("demo", config=Cfg, summary="a demo", profiles={"ci": {"epochs": 2}})
    def demo(*args):
        return "ok"

    comp = reg.get("demo")
    assert comp.make_config("paper").epochs == 100
    assert comp.make_config("ci").epochs == 2
    assert comp.make_config("ci", {"lr": 0.5}).lr == 0.5
    with pytest.raises(RegistryError, match="did you mean epochs"):
        comp.make_config("ci", {"epoch": 3})
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("demo", config=Cfg, summary="again")(lambda *a: None)


def test_config_must_be_a_dataclass():
    with pytest.raises(TypeError):
        register_defense("broken", config=dict, summary="x")
