"""The paper's studies beyond Table I, as small grids (``defbench report NAME``).

A study is a list of *arms*; an arm is a set of ``--set`` overrides plus what
to run under them (which attack, which defenses, on the suspect or on the
clean encoder, or a measurement). Every arm becomes ordinary stages through
the planner of Table I (``plan.py``), so the studies share the artifact store
with the grid and with each other: the full-MIMIC arm of the component
ablation, the lambda = 1 points of the sweeps, the 10x10 trigger and the
profile's clean ratio are the same stages, computed once.

The evaluate stages carry ``study``, ``arm``, ``sweep`` and ``x`` labels, which
land in the results database; each study carries its renderer (a function of
``reports/ablations.py``) that draws it from those rows alone. Where a study
runs (attack, studied defense, pre-training set, tasks) is the profile's
``[studies]`` section; arms name settings generically (``defense.FIELD``:
the studied defense's field), so no defense is hard-wired here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ...core import ConfigError, Registry, UserError
from ...defenses import DEFENSES, MEASUREMENTS
from ...reports import ablations as render
from ...reports import protocols as render_protocols
from ..pipeline.plan import (attack_stage, cell_stages, clean_encoder_stages, clean_set_spec, downstream_tasks,
                             pretrain_stage, stamped_trigger)
from ..pipeline.settings import DEFAULT_PROTOCOL, Profile, load_profile
from ..pipeline.stages import Stage

EVERY_DEFENSE = ("*",)  # the profile's grid.defenses (e.g. --set 'grid.defenses=["ft","mine"]')
STUDIED = ("studied",)  # the profile's studies.defense (the paper's: MIMIC)


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict = field(default_factory=dict)
    x: float | None = None  # the swept value, when the study sweeps one
    sweep: str = ""  # which sweep of the study (the lambda study has two)
    defenses: tuple[str, ...] = STUDIED
    attack: str = ""  # "": the profile's studies.attack
    on_clean_encoder: bool = False  # apply the defenses to the clean encoder (Table III)
    measure: str = ""  # a measurement instead of evaluations (e.g. "stage-mi")
    protocol: str = DEFAULT_PROTOCOL  # how the downstream task uses the encoder (pipeline/protocols.py)


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    paper: str  # where the paper shows it
    arms: tuple[Arm, ...] | Callable[[Profile], tuple[Arm, ...]]  # or built from the profile (budgets)
    render: Callable  # render(rows, asr_column, measurements) -> (figure, table, notes); reports/ablations.py

    def arms_for(self, profile: Profile) -> tuple[Arm, ...]:
        return self.arms(profile) if callable(self.arms) else self.arms


def _sweep(field_name: str, values, sweep: str = "", fmt: str = "{}", **arm) -> tuple[Arm, ...]:
    return tuple(Arm(fmt.format(v), {field_name: v}, x=float(v), sweep=sweep, **arm) for v in values)


CLEAN_RATIOS = (0.01, 0.02, 0.03, 0.04, 0.05)
BUDGET_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the frontier: each defense's own budget times these


def budget_fields(defense: str) -> tuple[str, ...]:
    """The config fields that set how much a defense computes (declared at registration: ``budget=(...)``)."""
    fields = DEFENSES.get(defense).options.budget
    if not fields:
        raise ConfigError(f"defense {defense} declares no budget (register_defense(..., budget=('epochs',))), "
                          "so the frontier cannot scale it")
    return fields


def frontier_arms(profile: Profile) -> tuple[Arm, ...]:
    """Every grid defense at BUDGET_SCALES times its own budget fields (integers, at least 1): only the
    budget varies, nothing is selected by ASR."""
    arms = []
    for defense in profile.grid.defenses:
        config = profile.defense_config(defense)
        for scale in BUDGET_SCALES:
            values = {f: max(1, round(getattr(config, f) * scale)) for f in budget_fields(defense)}
            text = ", ".join(f"{f}={v}" for f, v in values.items())
            arms.append(Arm(f"{defense} x{scale:g} ({text})", {f"defense.{defense}.{f}": v for f, v in values.items()},
                            x=scale, sweep=defense, defenses=(defense,)))
    return tuple(arms)

def _decimal(value: float) -> float:
    """A product such as 3 x 0.05 as the decimal a user types (0.15, not 0.15000000000000002), so that
    `--set clean.fraction=0.15` runs the very stage the study keys."""
    return float(f"{value:.12g}")


def regime_arms(profile: Profile) -> tuple[Arm, ...]:
    """The studied defense (MIMIC) one factor at a time around the profile's setting: its lr x10, the paper's
    Eq. 6 attention term, 4x and 16x its epochs, twice the encoder width, three times the clean set."""
    cfg = profile.defense_config(profile.studies.defense)
    fraction, lr = min(1.0, _decimal(3 * profile.clean.fraction)), _decimal(cfg.lr * 10)
    return (
        Arm("as profiled"),
        Arm(f"lr {lr:g}", {"defense.lr": lr}),
        Arm("Eq. 6 attention", {"defense.attention_form": "eq6"}),
        Arm(f"{4 * cfg.epochs} epochs", {"defense.epochs": 4 * cfg.epochs}, x=4 * cfg.epochs),
        Arm(f"{16 * cfg.epochs} epochs", {"defense.epochs": 16 * cfg.epochs}, x=16 * cfg.epochs),
        Arm(f"width {2 * profile.encoder.width}", {"encoder.width": 2 * profile.encoder.width}),
        Arm(f"clean x{fraction / profile.clean.fraction:g}", {"clean.fraction": fraction}),
    )


STUDIES: Registry[Study] = Registry("report")
for _study in [
    Study("components", "MIMIC's components: without L0 (clone), L1 (NT-Xent), L2 (attention) or the MI "
          "localisation (uniform beta)", "Figure 8", (
              Arm("MIMIC"),
              Arm("w/o L0", {"defense.use_clone": False}),
              Arm("w/o L1", {"defense.use_contrastive": False}),
              Arm("w/o L2", {"defense.use_attention": False}),
              Arm("w/o MI", {"defense.use_mi": False}),
              Arm("clone only", {"defense.use_contrastive": False, "defense.use_attention": False}),
          ), render.components),
    Study("lambdas", "MIMIC's loss weights: lambda1 (NT-Xent) and lambda2 (attention, a multiplier of beta)",
          "Figure 9",
          _sweep("defense.lambda1", (0.0, 0.2, 0.4, 0.7, 1.0), "lambda1", "λ1={}")
          + _sweep("defense.lambda2", (0.0, 0.1, 0.3, 1.0, 3.0), "lambda2", "λ2={}"), render.lambdas),
    Study("trigger-size", "Trigger size: 3x3, 5x5 and 10x10 white patches, BadEncoder then MIMIC", "Figure 10",
          _sweep("attack.trigger_size", (3, 5, 10), fmt="{0}x{0}"), render.trigger_size),
    Study("clean-ratio", "The defender's clean data: 1% to 5% of the pre-training set, every defense",
          "Figure 12", _sweep("clean.fraction", CLEAN_RATIOS, fmt="{:.0%}", defenses=EVERY_DEFENSE),
          render.clean_ratio),
    Study("poison-ratio", "A poisoned 'clean' set: 0% to 25% of the defender's images carry the trigger",
          "Figure 13", _sweep("clean.poison_ratio", (0.0, 0.05, 0.1, 0.15, 0.2, 0.25), fmt="{:.0%}"),
          render.poison_ratio),
    Study("clean-encoders", "Each defense applied to a clean (unattacked) encoder: ACC before and after",
          "Table III", (Arm("clean encoder", defenses=EVERY_DEFENSE, on_clean_encoder=True),), render.clean_encoders),
    Study("mi-layers", "MI between each stage and the feature, on clean and on triggered inputs", "Figure 4", (
        Arm("backdoored", measure="stage-mi"),
        Arm("clean", measure="stage-mi", on_clean_encoder=True),
    ), render.mi_layers),
    Study("adaptive", "Adaptive BadEncoder: an MI regulariser pulls the triggered MI profile onto the clean one",
          "Figure 11", (
              Arm("BadEncoder", attack="badencoder"),
              Arm("adaptive BadEncoder", attack="badencoder-adaptive"),
          ), render.adaptive),
    Study("cost", "Wall time of each defense, and how it grows with the clean-set size", "Section V (cost)",
          _sweep("clean.fraction", (0.01, 0.03, 0.05), fmt="{:.0%}", defenses=EVERY_DEFENSE), render.cost),
    Study("frontier", "Efficacy against compute: each defense at 1/4 to 4 times its own budget",
          "(this benchmark)", frontier_arms, render.frontier),
    Study("protocols", "Does a defense's ASR depend on how the encoder is used downstream? Every defense under "
          "the MLP probe, a linear probe, a weighted kNN vote and whole-encoder fine-tuning", "(this benchmark)",
          tuple(Arm(p, protocol=p, defenses=EVERY_DEFENSE) for p in ("mlp", "linear", "knn", "finetune")),
          render_protocols.protocols),
    Study("mimic-regime", "MIMIC's regime, one factor at a time: lr, the attention term's form, epochs, encoder "
          "width, clean-set size", "(this benchmark)", regime_arms, render.regime),
]:
    STUDIES.add(_study.name, _study)


def get_study(name: str) -> Study:
    return STUDIES.get(name)


@dataclass
class StudyPlan:
    study: Study
    profile: Profile  # the base profile (the user's --set, no arm overrides)
    attack: str
    pretrain: str
    tasks: list[str]
    evaluations: list[Stage]  # every evaluate stage, one per (arm, role, defense, task), labelled
    measurements: list[Stage]

    @property
    def stages(self) -> list[Stage]:
        return self.evaluations + self.measurements

    @staticmethod
    def expected(stages: list[Stage]) -> list[dict]:
        """What the report needs from the results database: one label dict per row."""
        keys = ("arm", "role", "defense", "attack", "overrides", "seed")
        return [{**{k: s.labels.get(k) for k in keys},
                 "downstream": s.spec.get("downstream", s.labels.get("downstream")), "key": s.key} for s in stages]


def _label(stages, study: Study, arm: Arm) -> None:
    for stage in stages:
        stage.labels.update(study=study.name, arm=arm.name, sweep=arm.sweep, x=arm.x)


def plan_study(name: str, profile_name: str, sets: dict | None = None) -> StudyPlan:
    study = get_study(name)
    base = load_profile(profile_name, sets)
    if not (base.studies.pretrain or base.grid.pretrain):
        raise UserError("no pre-training set for the studies: set studies.pretrain or grid.pretrain")
    pretrain = base.studies.pretrain or base.grid.pretrain[0]
    tasks = downstream_tasks(pretrain, base.studies.downstream)
    evaluations: list[Stage] = []
    measurements: list[Stage] = []
    for arm in study.arms_for(base):
        prof = load_profile(profile_name, {**(sets or {}), **arm.overrides})
        attack = arm.attack or base.studies.attack
        arm_stages: list[Stage] = []
        for task in tasks:
            if arm.measure:
                arm_stages.append(_measure_stage(prof, arm, attack, pretrain, task))
                continue
            for defense in _defenses(arm, prof):
                plan = clean_encoder_stages if arm.on_clean_encoder else cell_stages
                arm_stages.extend(plan(prof, attack, defense, pretrain, task, protocol=arm.protocol).values())
        _label(arm_stages, study, arm)
        (measurements if arm.measure else evaluations).extend(arm_stages)
    return StudyPlan(study, base, base.studies.attack, pretrain, tasks, evaluations, measurements)


def _defenses(arm: Arm, prof: Profile) -> list[str]:
    if arm.defenses == EVERY_DEFENSE:
        return list(prof.grid.defenses)
    if arm.defenses == STUDIED:
        return [prof.studies.defense]
    return list(arm.defenses)


def _measure_stage(prof: Profile, arm: Arm, attack: str, pretrain: str, task: str) -> Stage:
    suspect = attack_stage(prof, attack, pretrain, task)
    encoder = pretrain_stage(prof, pretrain) if arm.on_clean_encoder else suspect
    measurement = MEASUREMENTS.get(arm.measure)
    trigger, needs = stamped_trigger(suspect)
    spec = {"measure": arm.measure, "trigger": trigger,
            "clean": clean_set_spec(prof, pretrain),
            "settings": measurement.settings_of(prof.defense_config(measurement.defense)),
            "seed": prof.seed}
    role = "clean" if arm.on_clean_encoder else "undefended"
    labels = {"profile": prof.name, "overrides": prof.overrides_for(attack=attack, defense=measurement.defense),
              "seed": prof.seed, "attack": attack,
              "pretrain": pretrain, "downstream": task, "role": role, "defense": "none",
              "label": f"measure {arm.measure} {role} {attack} {pretrain}->{task}"}
    return Stage("measure", arm.measure, spec, (encoder, *(n for n in needs if n.key != encoder.key)), labels)
