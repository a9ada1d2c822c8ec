"""The contract every registered attack and defense keeps, checked for all of them (a new one is tested
without writing a line), and the fairness rule: nothing about the attack reaches a defense's settings.

- its config builds for every built-in profile (its ``profiles=`` names real profiles and real fields with
  values of the right type);
- a ``ci`` run (budgets cut to a step or two) on 32 random images returns an encoder of the same architecture;
- two runs with one seed give identical weights;
- (defenses) the planned defend stage is the same whichever attack made the suspect, and its spec carries no
  trigger, target or attack; only a defense registered with ``needs_pretrain_data`` plans (and gets) the
  suspect's pre-training data, described in its spec by the clean split and the victim's recipe (the
  poisoned images themselves follow from the suspect stage, rebuilt by the harness).
A toy defense written as one file in a temporary folder joins the registry through ``$DEFBENCH_PLUGINS``.
"""
import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from defbench.attacks import ATTACKS, AttackInputs, PatchTrigger
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.settings import builtin_profiles, load_profile
from defbench.core import build_config
from defbench.core.config import field_types
from defbench.defenses import DEFENSES, CleanData, PretrainData, needs_pretrain_data
from defbench.encoders import RunContext, SimCLRConfig, build_encoder

BUILTIN_DEFENSES = [c.name for c in DEFENSES.items() if c.module.startswith("defbench.defenses.")]
BUILTIN_ATTACKS = [c.name for c in ATTACKS.items() if c.module.startswith("defbench.attacks.")]
_BUDGET = re.compile(r"(^|_)(epochs|steps|iterations|iters|batches)$")


def tiny_budget(component, profile: str = "ci") -> object:
    """The component's ci config with every int budget cut to 1 and batch sizes to 16."""
    config = component.make_config(profile)
    small = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if _BUDGET.search(f.name):
            small[f.name] = min(value, 1)
        elif f.name.endswith("batch_size"):
            small[f.name] = min(value, 16)
        elif f.name in ("shadow_images", "inv_images", "stat_batches"):
            small[f.name] = min(value, 32) if value else 32
    return dataclasses.replace(config, **small)


def _encoder(seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder(width=8, channels_last=False)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _same_architecture(a, b) -> None:
    assert a.config == b.config
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def _weights(encoder) -> dict:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


@pytest.mark.parametrize("name", BUILTIN_DEFENSES + BUILTIN_ATTACKS)
def test_config_builds_for_every_builtin_profile(name):
    kind = "defense" if name in BUILTIN_DEFENSES else "attack"
    component = (DEFENSES if kind == "defense" else ATTACKS).get(name)
    assert set(component.profiles) <= set(builtin_profiles()), component.profiles
    hints = field_types(component.config)
    for profile, values in component.profiles.items():
        for key, value in values.items():
            assert key in hints, f"{name}: profiles[{profile!r}] sets unknown field {key!r}"
        build_config(component.config, values, f"{kind}.{name}")  # typed and range-checked
    for profile in builtin_profiles():
        load_profile(profile).component_config(kind, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_DEFENSES)
def test_a_defense_returns_the_same_architecture_deterministically(name):
    component = DEFENSES.get(name)
    cfg = tiny_budget(component)
    suspect, clean = _encoder(), CleanData(_images(32, 1))
    extra = {"pretrain": PretrainData(_images(48, 4), SimCLRConfig(epochs=1, batch_size=16))} \
        if needs_pretrain_data(component) else {}
    runs = []
    for _ in range(2):
        ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(7)
        out = component.fn(suspect.clone(), clean, cfg, ctx, **extra)
        _same_architecture(out, suspect)
        runs.append(_weights(out))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), f"{name}: {key} differs between two runs with one seed"


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_ATTACKS)
def test_an_attack_returns_the_same_architecture_deterministically(name):
    component = ATTACKS.get(name)
    cfg = tiny_budget(component)
    clean_encoder = _encoder()
    inputs = AttackInputs(encoder_config=clean_encoder.config, pretrain_images=_images(32, 2),
                          target_images=_images(8, 3), trigger=PatchTrigger(size=4, image_size=32),
                          pretrain_recipe=SimCLRConfig(epochs=1, batch_size=16),
                          clean_encoder=clean_encoder if component.options.needs_clean_encoder else None)
    runs = []
    for _ in range(2):
        ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(7)
        out = component.fn(inputs, cfg, ctx)
        _same_architecture(out, clean_encoder)
        runs.append(_weights(out))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), f"{name}: {key} differs between two runs with one seed"


def _keys_and_strings(obj, keys=None, strings=None):
    keys, strings = set() if keys is None else keys, set() if strings is None else strings
    if isinstance(obj, dict):
        for k, v in obj.items():
            keys.add(k)
            _keys_and_strings(v, keys, strings)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _keys_and_strings(v, keys, strings)
    elif isinstance(obj, str):
        strings.add(obj)
    return keys, strings


@pytest.mark.parametrize("profile", ["paper", "tiny", "ci"])
def test_no_defense_setting_depends_on_the_attack(profile):
    prof = load_profile(profile)
    pretrain = prof.grid.pretrain[0]
    task = "synth-stl10" if pretrain.startswith("synth") else "stl10"
    for defense in BUILTIN_DEFENSES:
        if defense == "none":
            continue
        specs = []
        for attack in BUILTIN_ATTACKS:
            stage = cell_stages(prof, attack, defense, pretrain, task)["defended"].deps[0]
            assert stage.kind == "defend" and len(stage.deps) == 1 and stage.deps[0].kind == "attack"
            keys, strings = _keys_and_strings(stage.spec)
            assert not keys & {"trigger", "target", "attack", "downstream"}, (defense, attack, keys)
            assert ("pretrain_data" in stage.spec) == needs_pretrain_data(DEFENSES.get(defense)), defense
            assert attack not in strings, (defense, attack)
            specs.append(stage.spec)
        assert all(spec == specs[0] for spec in specs), f"{defense}: settings differ between attacks"


TOY = '''
    """A toy defense in one file: re-initialise the projection head (changes nothing the probe sees)."""
    from dataclasses import dataclass

    from defbench.defenses import register_defense


    @dataclass
    class ToyConfig:
        scale: float = 1.0


    @register_defense("toy-one-file", config=ToyConfig, summary="a defense in one file",
                      profiles={"ci": {"scale": 0.5}})
    def toy(encoder, clean, cfg, ctx):
        for module in encoder.head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return encoder
'''


@pytest.mark.slow
def test_a_new_defense_is_one_file(tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy.py").write_text(textwrap.dedent(TOY))
    env = {**os.environ, "DEFBENCH_PLUGINS": str(tmp_path / "plugins"), "DEFBENCH_HOME": str(tmp_path / "home")}
    listed = subprocess.run([sys.executable, "-m", "defbench.benchmark.cli", "list", "defenses"], env=env,
                            capture_output=True, text=True, timeout=300, check=True).stdout
    assert "toy-one-file" in listed and "a defense in one file" in listed
    from conftest import MICRO
    run = subprocess.run([sys.executable, "-m", "defbench.benchmark.cli", "run", "--profile", "ci", "--defense",
                          "toy-one-file", "--downstream", "synth-stl10", *[x for s in MICRO for x in ("--set", s)]],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    assert "toy-one-file ACC" in run.stdout
