"""From a profile and a cell description to the stages that compute it, and from a grid to its cells.

A cell is (attack, defense, pre-training set, downstream task). Its results
are three evaluations on the task, all with the attack's trigger and target:
the clean encoder (reference), the suspect encoder ("undefended") and the
defended one. A trigger the attack learns while it runs (``attacks.learned``)
is named by the attack stage that learns it, and every stage stamping it waits
for that stage (:func:`stamped_trigger`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...attacks import ATTACKS
from ...attacks.learned import is_learned
from ...core import ConfigError, RegistryError, UserError
from ...defenses import DEFENSES, MEASUREMENTS, needs_pretrain_data
from ..datasets import FAMILIES, data_version, get_spec
from .protocols import spec_entry
from .external import Suspect
from .settings import DEFAULT_PROTOCOL, Profile, ProtocolSettings
from .stages import Stage, pretrain_spec


def downstream_tasks(pretrain: str, requested: list[str] | tuple[str, ...] = ()) -> list[str]:
    if requested:
        return list(requested)
    if pretrain not in FAMILIES:
        get_spec(pretrain)  # an unknown name gets the registry's "unknown dataset" message first
        raise UserError(f"no default downstream tasks for pre-training set {pretrain!r}; "
                        "name them with --downstream")
    return [task for task, _ in FAMILIES[pretrain]]


def target_class(pretrain: str, downstream: str, configured: int) -> int:
    if configured >= 0:
        return configured
    for task, target in FAMILIES.get(pretrain, []):
        if task == downstream:
            return target
    return get_spec(downstream).default_target


def _labels(profile: Profile, **labels) -> dict:
    """A stage's labels; its ``overrides`` are the --set values that took effect for its attack and defense."""
    overrides = profile.overrides_for(attack=labels.get("attack"), defense=labels.get("defense"))
    return {"profile": profile.name, "overrides": overrides, "seed": profile.seed, **labels}


def components_used(stages: list[Stage]) -> dict[str, set[str]]:
    """kind -> the names of the attacks and defenses that ``stages`` and their inputs run (a measurement counts
    for the defense whose settings it reads): where a ``--set`` key can take effect (``Profile.check_reach``)."""
    used: dict[str, set[str]] = {"attack": set(), "defense": set()}
    todo, seen = list(stages), set()
    while todo:
        stage = todo.pop()
        if id(stage) in seen:
            continue
        seen.add(id(stage))
        todo.extend(stage.deps)
        if stage.kind == "attack":
            used["attack"].add(stage.name)
        elif stage.kind == "defend":
            used["defense"].add(stage.name)
        elif stage.kind == "measure":
            used["defense"].add(MEASUREMENTS.get(stage.name).defense)
    return used


def pretrain_stage(profile: Profile, dataset: str) -> Stage:
    """The clean encoder: SimCLR on ``dataset`` with the profile's encoder and pre-training settings."""
    spec = {"dataset": dataset, "data": data_version(dataset), "encoder": profile.encoder.to_dict(),
            "seed": profile.seed}
    return Stage("pretrain", dataset, spec, labels=_labels(profile, label=f"pretrain {dataset}"),
                 config=profile.pretrain)


def attack_stage(profile: Profile, attack: str, pretrain: str, downstream: str) -> Stage:
    component = ATTACKS.get(attack)
    cfg = profile.attack_config(attack)
    clean = pretrain_stage(profile, pretrain)
    try:
        trigger = cfg.make_trigger(profile.encoder.image_size).describe()
    except (ValueError, TypeError) as err:  # a trigger that does not fit the image: a setting, said up front
        raise ConfigError(f"attack.{attack}: {err}") from None
    spec = {"attack": component.key_name, "pretrain": pretrain, "downstream": downstream,
            "target": target_class(pretrain, downstream, cfg.target),
            "trigger": trigger,
            "encoder": clean.spec["encoder"], "recipe": clean.spec["recipe"],
            "max_images": clean.spec["max_images"], "seed": profile.seed,
            "data": {pretrain: data_version(pretrain), downstream: data_version(downstream)}}
    deps = (clean,) if component.options.needs_clean_encoder else ()
    return Stage("attack", component.key_name, spec, deps,
                 _labels(profile, label=f"{component.name} {pretrain}->{downstream}"), config=cfg)


def stamped_trigger(suspect: Stage) -> tuple[dict, tuple[Stage, ...]]:
    """The description of ``suspect``'s trigger for the stages that stamp it, and the stages they must wait for.

    A fixed trigger is its planned description, needing nothing. A learned one (``attacks.learned``) is bound to
    the attack stage that learns it: its key names the artefact holding the trigger, and the stamping stage
    depends on that stage (the clean encoder's evaluation included).
    """
    trigger = suspect.spec["trigger"]
    if not is_learned(trigger):
        return trigger, ()
    return {**trigger, "stage": suspect.key}, (suspect,)


def clean_set_spec(profile: Profile, pretrain: str, image_size: int | None = None, size: int | None = None) -> dict:
    """The defender's clean subset of ``pretrain`` (``inputs.clean_subset`` draws it): the profile's share of its
    pre-training split, or ``size`` images; read at ``image_size`` (default: the profile's encoder's)."""
    fraction, cap = (1.0, size) if size else (profile.clean.fraction, profile.clean.max_images)
    return {"dataset": pretrain, "data": data_version(pretrain), "fraction": fraction, "max_images": cap,
            "image_size": image_size or profile.encoder.image_size, "seed": profile.seed}


def pretrain_data_spec(profile: Profile, pretrain: str, image_size: int | None = None) -> dict:
    """What a defense registered with ``needs_pretrain_data`` is given besides the clean set: the clean
    pre-training split of ``pretrain`` (capped and seeded as the profile's pre-training) and the victim's recipe.
    The images follow from the suspect (``pretrain_inputs``: a data-poisoning attack's poisoned set)."""
    return {"dataset": pretrain, "data": data_version(pretrain), "image_size": image_size or profile.encoder.image_size,
            "seed": profile.seed, **pretrain_spec(profile.pretrain)}


def defend_stage(profile: Profile, defense: str, encoder: Stage, pretrain: str, image_size: int | None = None,
                 clean_size: int | None = None) -> Stage:
    """``defense`` on ``encoder`` with the clean set of ``clean_set_spec`` (an external encoder reads it at its own
    input size) and, for a defense that asks for it, the suspect's pre-training set (``pretrain_data_spec``);
    the spec holds the defense's settings and its data, never the trigger or the target."""
    component = DEFENSES.get(defense)
    cfg = profile.defense_config(defense)
    clean = clean_set_spec(profile, pretrain, image_size, clean_size)
    if profile.clean.poison_ratio > 0:  # the defender's "clean" set secretly holds triggered images
        if encoder.kind != "attack":
            raise ConfigError("clean.poison_ratio needs an attacked encoder (its trigger poisons the clean set)")
        clean.update(poison_ratio=profile.clean.poison_ratio, trigger=stamped_trigger(encoder)[0])
    spec = {"defense": component.key_name, "clean": clean, "seed": profile.seed}
    if needs_pretrain_data(component):  # only then: every other defense keeps its key
        spec["pretrain_data"] = pretrain_data_spec(profile, pretrain, image_size)
    where = encoder.labels.get("label", encoder.name)
    return Stage("defend", component.key_name, spec, (encoder,), _labels(profile, label=f"{component.name} on {where}"),
                 config=cfg)


def evaluate_stage(profile: Profile, encoder: Stage, downstream: str, trigger: dict | None, target: int | None,
                   image_size: int | None = None, needs: tuple[Stage, ...] = (), protocol: str = DEFAULT_PROTOCOL,
                   **labels) -> Stage:
    """ACC (and ASR with ``trigger`` and ``target``; None: ACC only) of ``encoder`` on ``downstream``, read at
    ``image_size`` (default: the profile's encoder's); ``needs``: further stages to wait for (the attack stage
    holding a learned trigger, :func:`stamped_trigger`). ``protocol``: how the task uses the encoder
    (``pipeline/protocols.py``); only a protocol other than the MLP probe enters the spec."""
    spec = {"downstream": downstream, "data": data_version(downstream),
            "image_size": image_size or profile.encoder.image_size,
            "trigger": trigger, "target": target, "seed": profile.seed}
    entry = spec_entry(protocol, getattr(profile, "protocols", None) or ProtocolSettings())
    if entry:
        spec["protocol"] = entry
    label = f"evaluate {labels.get('role')} {labels.get('defense', '')} on {downstream}".replace("  ", " ")
    label += f" ({protocol})" if entry else ""
    deps = (encoder, *(stage for stage in needs if stage.key != encoder.key))
    return Stage("evaluate", downstream, spec, deps, _labels(profile, label=label, **labels), config=profile.evaluate)


def current_names(attack: str, defense: str) -> tuple[str, str]:
    """The names ``attack`` and ``defense`` are registered under now (a former name, ``formerly=``, finds its
    method): results rows carry the current name, stage keys the first (``Component.key_name``)."""
    return ATTACKS.get(attack).name, DEFENSES.get(defense).name


def clean_encoder_stages(profile: Profile, attack: str, defense: str, pretrain: str,
                         downstream: str, protocol: str = DEFAULT_PROTOCOL) -> dict[str, Stage]:
    """A defense applied to the CLEAN encoder (Table III): evaluations before and after."""
    attack, defense = current_names(attack, defense)
    trigger_source = attack_stage(profile, attack, pretrain, downstream)  # planned for its trigger (run if learned)
    (trigger, needs), target = stamped_trigger(trigger_source), trigger_source.spec["target"]
    clean = pretrain_stage(profile, pretrain)
    common = {"attack": attack, "pretrain": pretrain, "needs": needs, "protocol": protocol}
    return {
        "clean": evaluate_stage(profile, clean, downstream, trigger, target, role="clean", defense="none", **common),
        "defended": evaluate_stage(profile, defend_stage(profile, defense, clean, pretrain), downstream, trigger,
                                   target, role="clean-defended", defense=defense, **common),
    }


def cell_stages(profile: Profile, attack: str, defense: str, pretrain: str, downstream: str,
                protocol: str = DEFAULT_PROTOCOL) -> dict[str, Stage]:
    """The evaluate stages of one cell, by role: clean, undefended, defended (absent for 'none')."""
    attack, defense = current_names(attack, defense)
    suspect = attack_stage(profile, attack, pretrain, downstream)
    (trigger, needs), target = stamped_trigger(suspect), suspect.spec["target"]
    common = {"attack": attack, "pretrain": pretrain, "needs": needs, "protocol": protocol}
    stages = {
        "clean": evaluate_stage(profile, pretrain_stage(profile, pretrain), downstream, trigger, target,
                                role="clean", defense="none", **common),
        "undefended": evaluate_stage(profile, suspect, downstream, trigger, target,
                                     role="undefended", defense="none", **common),
    }
    if defense != "none":
        defended = defend_stage(profile, defense, suspect, pretrain)
        stages["defended"] = evaluate_stage(profile, defended, downstream, trigger, target,
                                            role="defended", defense=defense, **common)
    return stages


def planned_evaluation_key(profile: Profile, attack: str, defense: str, role: str, pretrain: str,
                           downstream: str) -> str | None:
    """The key today's code and ``profile`` give the evaluate stage of one Table I row (clean, undefended,
    defended); None when the row's attack or defense is no longer registered, or the role is not a cell's."""
    try:
        stage = cell_stages(profile, attack, defense, pretrain, downstream).get(role)
        return stage.key if stage is not None else None
    except RegistryError:  # an unregistered attack/defense (e.g. an uninstalled plugin)
        return None


def _suspect_target(suspect: Suspect, pretrain: str, downstream: str) -> int | None:
    """The target class a suspect's ASR is measured for: its own, else the task's default; None without a trigger."""
    if suspect.trigger is None:
        return None
    return suspect.target if suspect.target is not None else target_class(pretrain, downstream, -1)


def suspect_stages(profile: Profile, suspect: Suspect, defense: str, pretrain: str,
                   downstream: str) -> dict[str, Stage]:
    """The evaluate stages of one suspect cell, by role: undefended and (unless ``defense`` is none) defended.
    The defense runs on the defender's clean share of ``pretrain``, read at the encoder's input size."""
    imported = suspect.stage()
    target = _suspect_target(suspect, pretrain, downstream)
    common = {"attack": suspect.name, "pretrain": pretrain, "suspect": suspect.record()}
    size = suspect.image_size
    stages = {"undefended": evaluate_stage(profile, imported, downstream, suspect.trigger, target, image_size=size,
                                           role="undefended", defense="none", **common)}
    if defense != "none":
        defended = defend_stage(profile, defense, imported, pretrain, image_size=size)
        stages["defended"] = evaluate_stage(profile, defended, downstream, suspect.trigger, target, image_size=size,
                                            role="defended", defense=defense, **common)
    return stages


def planned_suspect_key(profile: Profile, suspect: Suspect, defense: str, role: str, pretrain: str,
                        downstream: str) -> str | None:
    """The key today's code gives one suspect row (from its stored record: the file is not read)."""
    try:
        stage = suspect_stages(profile, suspect, defense, pretrain, downstream).get(role)
        return stage.key if stage is not None else None
    except (RegistryError, KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------- the grid of Table I

@dataclass
class GridSpec:
    attacks: list[str]
    defenses: list[str]
    pretrain: list[str]
    downstream: list[str] = field(default_factory=list)  # empty: each pre-training set's family
    suspects: list[Suspect] = field(default_factory=list)  # external encoders: a row group each


def grid_spec(profile: Profile, attacks=(), defenses=(), pretrain=(), downstream=(), suspects=()) -> GridSpec:
    """``attacks=["none"]``: no built-in attack (only the suspects). A renamed method's former name stands for it."""
    attacks = [] if list(attacks) == ["none"] else list(attacks) or list(profile.grid.attacks)
    defenses = list(defenses) or list(profile.grid.defenses)
    return GridSpec([ATTACKS.get(a).name if a in ATTACKS else a for a in attacks],
                    [DEFENSES.get(d).name if d in DEFENSES else d for d in defenses],
                    list(pretrain) or list(profile.grid.pretrain), list(downstream), list(suspects))


def expand_grid(profile: Profile, spec: GridSpec) -> dict[tuple, Stage]:
    """(attack or suspect, defense-or-'undefended'/'clean', pretrain, task) -> its evaluate stage."""
    cells: dict[tuple, Stage] = {}
    for pretrain in spec.pretrain:
        for task in downstream_tasks(pretrain, spec.downstream):
            for attack in spec.attacks:
                for defense in spec.defenses or ["none"]:
                    stages = cell_stages(profile, attack, defense, pretrain, task)
                    cells[(attack, "clean", pretrain, task)] = stages["clean"]
                    cells[(attack, "undefended", pretrain, task)] = stages["undefended"]
                    if "defended" in stages:
                        cells[(attack, defense, pretrain, task)] = stages["defended"]
            for suspect in spec.suspects:
                for defense in spec.defenses or ["none"]:
                    stages = suspect_stages(profile, suspect, defense, pretrain, task)
                    cells[(suspect.name, "undefended", pretrain, task)] = stages["undefended"]
                    if "defended" in stages:
                        cells[(suspect.name, defense, pretrain, task)] = stages["defended"]
    return cells
