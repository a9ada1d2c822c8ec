"""The stage kinds and how each one runs.

A :class:`Stage` is pure data: its kind, a JSON-able ``spec`` holding
everything that determines its output, the typed settings its runner uses
(``config``: an attack's or defense's config, the probe's or the pre-training's
settings, as planned and checked once), and the stages it depends on. The spec
holds the config's dict form, written by the stage itself: it exists only to
be hashed and recorded. Its key hashes the spec, the keys of its inputs and
the code version of the modules it runs (:mod:`.keys`), so changing any of them
yields a new artifact while everything else stays cached. ``labels`` only name
results (attack, defense, role...) and are not part of the key. Everything the
pipeline knows about a kind -- its runner, its code roots, whether it makes an
encoder, its results row, its config's dict form -- is one :class:`StageKind`
record in :data:`KINDS`.

1. pretrain(dataset)                      -> clean encoder
2. attack(attack, [clean encoder], task)  -> suspect encoder
3. defend(defense, encoder, clean subset) -> defended encoder
4. evaluate(encoder, task, trigger)       -> ACC / ASR (+ a results row)
5. measure(measurement, encoder)          -> a measurement of a study (+ a results row)
6. import(checkpoint file)                -> an external encoder, keyed by the file's content (``external``)

An attack whose trigger is learned while it runs (``attacks.learned``) hands it over as a record; the attack
runner keeps it as ``trigger.json`` in the attack's artefact, and the stages that stamp it read it from there
(:func:`stored_trigger`: their spec names the attack stage, which they depend on).

An evaluate stage seeds its probe from the encoder's weights and the task
(``evaluate.probe_seed``), not from the stage's identity: the same weights on
the same task give the same ACC/ASR whichever stage produced them, so a grid
row and ``defbench evaluate`` of that encoder's file agree to the last digit.

A stage whose weights, features or losses are not finite fails with the stage
named, and leaves no artifact and no row.

On CUDA each runner puts its uint8 images on the device once (:func:`.device.resident`), so the loops'
batches are indexed, converted and augmented there; on a CPU nothing moves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from ...attacks import ATTACKS, trigger_from_description
from ...attacks.learned import LEARNED_TRIGGER, TRIGGER_FILE, is_learned
from ...core import UserError, build_config
from ...defenses import DEFENSES, MEASUREMENTS, REMOVED_RECORD, CleanData, PretrainData, on_transformers
from ...encoders import Encoder, RunContext, build_encoder, save_encoder, train_simclr
from ...encoders.checkpoints import CheckpointError
from ...encoders.tower_checkpoints import (TEXT_FILE, load_any_checkpoint as load_checkpoint,
                                           load_any_encoder as load_encoder, load_text_tower, save_text_tower)
from ...encoders.screening import is_screened, load_screen, save_screen
from . import evaluate as evaluation
from . import inputs, pretrain_inputs, protocols, screening
from .device import configure_backends, resident
from .keys import code_version, digest
from .results import ResultsDB
from .settings import EvalSettings, PretrainSettings
from .store import ArtifactStore, StoreError

# Part of every key: bump it when the way stages are seeded changes, so no artifact made under
# the old seeding is reused beside new ones. 3: the evaluate probe is seeded from the weights.
SEEDING = 3
INPUTS = "defbench.benchmark.pipeline.inputs"
SCREENING = "defbench.benchmark.pipeline.screening"
TOWER_LOADER = "defbench.encoders.tower_checkpoints"  # an import of a ViT / CLIP tower file
ON_TRANSFORMERS = "defbench.defenses.on_transformers"  # how a defense runs on a tower
PROTOCOLS = "defbench.benchmark.pipeline.protocols"  # an evaluation under a protocol other than the MLP probe


class NonFiniteError(UserError):
    """A stage produced NaN or infinite weights, features or losses."""


@dataclass(eq=False)
class Stage:
    kind: str
    name: str
    spec: dict
    deps: tuple["Stage", ...] = ()
    labels: dict = field(default_factory=dict)
    config: Any = None  # the typed settings its runner uses (None after a trip to another process: see settings)

    def __post_init__(self):
        if self.config is not None:  # the config's dict form, only to be hashed and recorded
            self.spec = {**self.spec, **KINDS[self.kind].to_spec(self.config)}

    def __getstate__(self) -> dict:
        """Sent to another process (a pool worker, a submitit job) without its typed config, which ``settings``
        rebuilds there from the spec: the config's class may come from a plugin file not yet loaded there."""
        return {**self.__dict__, "config": None}

    @property
    def settings(self):
        """The typed config: the planned one, or (in another process) rebuilt from the spec and checked again."""
        if self.config is None and KINDS[self.kind].from_spec is not None:
            self.config = KINDS[self.kind].from_spec(self)
        return self.config

    @cached_property
    def code(self) -> str:
        """The code version of every project module this stage runs (see :mod:`.keys`)."""
        return code_version(*KINDS[self.kind].code_roots(self))

    @cached_property
    def key(self) -> str:
        return digest({"kind": self.kind, "name": self.name, "spec": self.spec,
                       "deps": [d.key for d in self.deps], "code": self.code, "seeding": SEEDING})

    @cached_property
    def seed_identity(self) -> str:
        """The key without code versions: what the stage computes, not how its code is written."""
        return digest({"kind": self.kind, "name": self.name, "spec": self.spec,
                       "deps": [d.seed_identity for d in self.deps]})

    @property
    def label(self) -> str:
        return self.labels.get("label") or f"{self.kind} {self.name}"

    def seed(self) -> int:
        # Not from the key: a refactor that changes no numerics must give bit-identical numbers,
        # so editing a module re-runs its stages but never re-draws their random numbers.
        return int(self.seed_identity[:8], 16) % (2**31)


def _imports_tower(stage: Stage) -> bool:
    """Whether ``stage`` is, or works on an encoder that comes from, the import of a ViT / CLIP tower file."""
    if stage.kind == "import":
        return "layout" in stage.spec
    return any(_imports_tower(dep) for dep in stage.deps[:1])


def _tower(stage: Stage) -> tuple[str, ...]:
    """The tower loader, where ``stage`` meets a ViT / CLIP tower file; nothing for a ResNet (its keys stay)."""
    return (TOWER_LOADER,) if _imports_tower(stage) else ()


def _screens(stage: Stage) -> bool:
    """Whether ``stage`` makes an encoder that screens its inputs (a defense registered with ``screens=True``)."""
    return stage.kind == "defend" and DEFENSES.get(stage.name).options.screens


def makes_encoder(stage: Stage) -> bool:
    """Whether ``stage``'s artefact is an encoder (a divergence of its training is then recorded)."""
    return KINDS[stage.kind].makes_encoder


@dataclass
class Env:
    store: ArtifactStore
    db: ResultsDB
    data_dir: Path
    device: torch.device


def load_stage_encoder(env: Env, stage: Stage) -> Encoder:
    """The encoder a finished stage stored; a damaged file is a StoreError naming the folder to delete."""
    folder = env.store.path(stage.kind, stage.key)
    try:
        encoder = load_encoder(folder / "encoder.pt")
        if (folder / "screen.pt").is_file():  # an input screen (DeDe): the encoder wrapped with it
            encoder = load_screen(encoder, folder / "screen.pt")
        return encoder
    except CheckpointError as err:
        raise StoreError(f"the stored encoder of {stage.label} cannot be read ({err}); delete the folder {folder} "
                         "(or run `defbench clean --stale`) and rerun to recompute it") from None


def stored_trigger(env: Env, description: dict | None) -> dict | None:
    """``description`` itself, or for a learned trigger bound to its attack stage, the trigger that stage stored."""
    if not is_learned(description):
        return description
    if not description.get("stage"):
        raise StoreError(f"the {description.get('attack')} trigger is learned, but the plan bound it to no "
                         "attack stage")
    path = env.store.path("attack", description["stage"]) / TRIGGER_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read the learned trigger {path} ({type(err).__name__}); delete the folder "
                         f"{path.parent} and rerun to recompute it") from None


def _stamping_trigger(env: Env, description: dict | None):
    """The trigger a stage stamps (a learned one rebuilt from its attack's artefact); None without one."""
    return trigger_from_description(stored_trigger(env, description)) if description else None


def _learned_trigger(env: Env, suspect: Stage) -> dict | None:
    """The trigger attack stage ``suspect`` learned while it ran (None: a fixed trigger, or not an attack)."""
    trigger = suspect.spec.get("trigger") if suspect.kind == "attack" else None
    return stored_trigger(env, {**trigger, "stage": suspect.key}) if is_learned(trigger) else None


# ----------------------------------------------------------------- finiteness

def _check_encoder(stage: Stage, encoder: Encoder) -> None:
    bad = [name for name, t in encoder.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"{stage.label}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); "
                             "the settings make training diverge (a learning rate too large?)")


def _check_tensor(stage: Stage, what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{stage.label}: the {what} hold NaN or inf; the encoder is broken")


def _non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _check_losses(stage: Stage, records: dict) -> None:
    bad = [k for k, v in records.items() if "loss" in k and _non_finite(v)]
    if bad:
        raise NonFiniteError(f"{stage.label}: the recorded {bad[0]} holds NaN or inf; training diverged")


# ----------------------------------------------------------------- runners

def _run_pretrain(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    encoder = build_encoder(s["encoder"]).to(ctx.device)
    images = resident(inputs.pretrain_images(env.data_dir, s), ctx.device)
    history = train_simclr(encoder, images, stage.settings, ctx, desc=f"pretrain {s['dataset']}")
    ctx.record("loss_history", history)
    return {"encoder": encoder}


def _run_attack(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    component = ATTACKS.get(s["attack"])
    clean = load_stage_encoder(env, stage.deps[0]) if stage.deps else None
    given = inputs.attack_inputs(env.data_dir, s, clean)
    given = dataclasses.replace(given, pretrain_images=resident(given.pretrain_images, ctx.device),
                                target_images=resident(given.target_images, ctx.device))
    encoder = component.fn(given, stage.settings, ctx)
    learned = ctx.records.pop(LEARNED_TRIGGER, None)  # a learned trigger lives in its own file, not the records
    if is_learned(s["trigger"]) != (learned is not None):
        raise TypeError(f"attack {s['attack']!r} planned a {'learned' if is_learned(s['trigger']) else 'fixed'} "
                        f"trigger but {'recorded none' if learned is None else 'recorded a learned one'} "
                        f"(ctx.record({LEARNED_TRIGGER!r}, trigger.describe()))")
    if learned is not None:
        trigger_from_description(learned)  # one that cannot be rebuilt fails here, not in the evaluations
        (out / TRIGGER_FILE).write_text(json.dumps(learned))
    return {"encoder": encoder}


CLEAN_ONLY, WITH_PRETRAIN = "clean set", "clean set + pre-training set"  # what a defense used, in its results


def _run_defend(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    component = DEFENSES.get(s["defense"])
    clean = {**s["clean"], "trigger": stored_trigger(env, s["clean"]["trigger"])} if "trigger" in s["clean"] \
        else s["clean"]
    images, index = inputs.clean_subset(env.data_dir, clean)
    torch.save(index, out / "clean_indices.pt")
    extra, pretraining = {}, None
    if "pretrain_data" in s:  # only a defense registered with needs_pretrain_data: the suspect's pre-training set
        pretraining = pretrain_inputs.suspect_pretraining(env.data_dir, s["pretrain_data"], stage.deps[0], stage.seed(),
                                                          _learned_trigger(env, stage.deps[0]))
        extra["pretrain"] = PretrainData(resident(pretraining.images, ctx.device), pretraining.recipe)
    suspect = load_stage_encoder(env, stage.deps[0]).to(ctx.device)
    run = on_transformers.runner(component, suspect)  # the registered function, or its variant on a ViT
    encoder = run(suspect, CleanData(resident(images, ctx.device)), stage.settings, ctx, **extra)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"defense {s['defense']!r} returned {type(encoder).__name__}, not an Encoder")
    fingerprint = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    result = {"n_clean": len(images), "clean_sha256": fingerprint,
              "defense_data": WITH_PRETRAIN if pretraining is not None else CLEAN_ONLY}
    if pretraining is not None:  # computed here, after the defense returned: it never sees which are poisons
        result["pretrain_data"] = {**pretraining.summary(),
                                   **pretrain_inputs.removal_summary(pretraining, ctx.records.get(REMOVED_RECORD, []))}
    return {"encoder": encoder, "result": result}


def _run_import(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s, path = stage.spec, stage.labels.get("path", "")
    encoder, info = load_checkpoint(path, image_size=s["image_size"], mean=s["mean"], std=s["std"])
    if info["sha256"] != s["sha256"]:
        raise CheckpointError(f"{path} changed since the run was planned (sha256 {info['sha256'][:12]}, planned "
                              f"{s['sha256'][:12]}); rerun the command")
    (out / "source.json").write_text(json.dumps(info, indent=1))
    if info.get("text_tower"):  # a CLIP model's text tower, for zero-shot evaluation of this encoder and its defenses
        save_text_tower(path, out / TEXT_FILE)
    return {"encoder": encoder, "result": {"source": info}}


def feature_key(stage: Stage, split_id: str, trigger_desc: dict | None) -> str:
    """The store key of evaluate ``stage``'s features of one split: its encoder, the split, the trigger, and the
    images' data version and size, so a redrawn set (a new revision) never reuses the old draw's features."""
    return digest([stage.deps[0].key, split_id, trigger_desc, stage.spec["data"], stage.spec["image_size"]])


def _features(env: Env, stage: Stage, encoder: Encoder, ctx: RunContext, images: torch.Tensor, split_id: str,
              trigger_desc: dict | None, batch: int) -> torch.Tensor:
    """Features of one encoder on one (sub)set, computed once and kept in the store."""
    key = feature_key(stage, split_id, trigger_desc)
    path = env.store.path("features", key) / "features.pt"
    if env.store.exists("features", key):
        return env.store.load_tensor(path)
    trigger = _stamping_trigger(env, trigger_desc)
    feats = evaluation.extract_features(encoder, images, ctx, batch, trigger, desc=f"features {split_id}")
    _check_tensor(stage, f"features of {split_id}{' (triggered)' if trigger else ''}", feats)
    with env.store.lock("features", key), env.store.writing("features", key, {"split": split_id}) as tmp:
        env.store.save_tensor(feats, tmp / "features.pt")
    return feats


def _run_evaluate(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    cfg = stage.settings
    encoder = load_stage_encoder(env, stage.deps[0]).to(ctx.device)
    ctx.reseed(evaluation.probe_seed(s, encoder))
    splits = inputs.evaluation_splits(env.data_dir, s, cfg.max_train, cfg.max_test)
    (train, train_id), (test, test_id) = splits["train"], splits["test"]
    train_images, test_images = resident(train.images, ctx.device), resident(test.images, ctx.device)
    if "protocol" in s:  # another protocol than the reference MLP probe (pipeline/protocols.py)
        return _run_protocol(stage, env, ctx, out, encoder, cfg, (train, train_images, train_id),
                             (test, test_images, test_id))
    f_train = _features(env, stage, encoder, ctx, train_images, train_id, None, cfg.feature_batch)
    f_test = _features(env, stage, encoder, ctx, test_images, test_id, None, cfg.feature_batch)
    f_trig = _features(env, stage, encoder, ctx, test_images, test_id, s["trigger"], cfg.feature_batch) \
        if s["trigger"] else None
    if is_screened(encoder):  # rejections counted as benchmark/pipeline/screening.py says
        trigger = _stamping_trigger(env, s["trigger"])
        masks = [screening.accept_mask(encoder, images, ctx, cfg.feature_batch, t)
                 for images, t in ((train_images, None), (test_images, None), (test_images, trigger))]
        metrics = screening.probe_and_score(f_train, masks[0], train, f_test, masks[1], f_trig,
                                            masks[2] if trigger else None, test, s["target"], cfg, ctx)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return {"result": metrics}
    probe = evaluation.train_probe(f_train, train.labels, max(train.num_classes, test.num_classes), cfg, ctx)
    metrics = evaluation.score(evaluation.predict(probe, f_test, ctx.device),
                               evaluation.predict(probe, f_trig, ctx.device) if f_trig is not None else None,
                               test.labels, s["target"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"result": metrics}


def _text_tower(env: Env, stage: Stage):
    """The text tower kept by the import stage this stage's encoder comes from (None: there is none)."""
    while stage.kind != "import":
        if not stage.deps:
            return None
        stage = stage.deps[0]
    path = env.store.path("import", stage.key) / TEXT_FILE
    return load_text_tower(path) if path.is_file() else None


def _run_protocol(stage: Stage, env: Env, ctx: RunContext, out: Path, encoder, cfg, train_split, test_split) -> dict:
    """ACC/ASR under the stage's protocol; features come from (and go to) the same cache as the MLP probe's."""
    s = stage.spec
    (train, train_images, train_id), (test, test_images, test_id) = train_split, test_split
    if is_screened(encoder):
        raise UserError(f"{stage.label}: protocol {s['protocol']['name']} does not count an input screen's "
                        "rejections; evaluate a screening defense (DeDe) with the mlp protocol")
    where = {"train": (train_images, train_id, None), "test": (test_images, test_id, None),
             "triggered": (test_images, test_id, s["trigger"])}

    def features(which: str) -> torch.Tensor:
        images, split_id, trigger = where[which]
        return _features(env, stage, encoder, ctx, images, split_id, trigger, cfg.feature_batch)

    text = _text_tower(env, stage.deps[0]) if s["protocol"]["name"] == "zeroshot" else None
    metrics = protocols.run(s["protocol"], encoder, dataclasses.replace(train, images=train_images),
                            dataclasses.replace(test, images=test_images), _stamping_trigger(env, s["trigger"]),
                            s["target"], cfg, ctx, features, text)
    metrics["protocol"] = s["protocol"]["name"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"result": metrics}


def _run_measure(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    measurement = MEASUREMENTS.get(stage.name)
    encoder = load_stage_encoder(env, stage.deps[0]).to(ctx.device)
    images, _ = inputs.clean_subset(env.data_dir, s["clean"])
    images = resident(images, ctx.device)
    named = {"clean": images, "triggered": _stamping_trigger(env, s["trigger"]).apply(images)}
    result = measurement.fn(encoder, named, s["settings"], ctx)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return {"result": result}



def run_stage(stage: Stage, env: Env) -> dict:
    """Compute one stage (its inputs must exist) and write its artifact; returns its meta."""
    configure_backends(env.device)
    ctx = RunContext(device=env.device).reseed(stage.seed())
    started = time.perf_counter()
    meta = {"name": stage.name, "spec": stage.spec, "deps": [d.key for d in stage.deps],
            "code_version": stage.code, "device": str(env.device), "labels": stage.labels,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with env.store.writing(stage.kind, stage.key, meta) as out:
        output = KINDS[stage.kind].run(stage, env, ctx, out)
        _check_losses(stage, ctx.records)
        if "encoder" in output:
            _check_encoder(stage, output["encoder"])
            save_encoder(output["encoder"], out / "encoder.pt")  # a screened encoder: the encoder alone
            if is_screened(output["encoder"]):
                save_screen(output["encoder"], out / "screen.pt")
        meta.update(result=output.get("result", {}), records=ctx.records, seconds=time.perf_counter() - started)
    env.db.add_stage({"stage_key": stage.key, "kind": stage.kind, "name": stage.name, "label": stage.label,
                      "seconds": meta["seconds"], "device": meta["device"], "code_version": stage.code,
                      "spec": stage.spec, "records": ctx.records})
    return meta


# ----------------------------------------------------------------- results rows

def _row_key(stage: Stage) -> str:
    return digest([stage.key, {k: v for k, v in stage.labels.items() if k != "label"}])


def record_evaluation(stage: Stage, env: Env) -> dict:
    """(Re)write the results row of a finished evaluate stage from its artifact; returns the row."""
    meta = env.store.read_meta(stage.kind, stage.key)
    encoder_stage = stage.deps[0]
    encoder_meta = env.store.read_meta(encoder_stage.kind, encoder_stage.key)
    labels = stage.labels
    row = {
        "row_key": _row_key(stage), "eval_key": stage.key, "encoder_key": encoder_stage.key,
        "profile": labels.get("profile"), "overrides": labels.get("overrides", {}), "seed": labels.get("seed"),
        "attack": labels.get("attack"), "defense": labels.get("defense"), "role": labels.get("role"),
        "pretrain": labels.get("pretrain"), "downstream": stage.spec["downstream"], "target": stage.spec["target"],
        "protocol": (stage.spec.get("protocol") or {}).get("name", protocols.DEFAULT),
        **{k: meta["result"][k] for k in ("acc", "asr_all", "asr_excl", "n_test")},
        "encoder_seconds": encoder_meta.get("seconds"), "eval_seconds": meta.get("seconds"),
        "device": meta.get("device"), "code_version": stage.code,
        "config": {"eval": stage.spec, "encoder": encoder_meta.get("spec")},
        "extra": {**row_records(encoder_meta.get("records", {})),
                  **{k: v for k, v in encoder_meta.get("result", {}).items() if k in ("n_clean", "defense_data")},
                  **_pretrain_extra(encoder_meta.get("result", {}).get("pretrain_data")),
                  **{k: v for k, v in meta["result"].items()  # a screened encoder's rejection rates
                     if k not in ("acc", "asr_all", "asr_excl", "n_test", "protocol")},
                  **({"suspect": labels["suspect"]} if labels.get("suspect") else {})},
        **{k: labels.get(k) for k in ("study", "arm", "sweep", "x")}, **_computed_at(meta),
    }
    env.db.add_evaluation(row)
    return row


def _computed_at(meta: dict) -> dict:
    """A row's date: when its stage's result was written, so a row rewritten from the cache keeps it."""
    return {"created_at": meta["written_at"]} if meta.get("written_at") else {}


def row_records(records: dict) -> dict:
    """A stage's records for its results row: a long curve (over 64 entries) stays in the artifact and only
    its last entry comes along, as ``<name>_last`` (a 160-epoch loss history still gives its final losses)."""
    row = {}
    for name, value in records.items():
        if isinstance(value, list) and len(value) > 64:
            row[f"{name}_last"] = value[-1]
        else:
            row[name] = value
    return row


def _pretrain_extra(summary: dict | None) -> dict:
    """A defended row's record of the pre-training data its defense used (none for the clean set alone)."""
    if not summary:
        return {}
    return {f"pretrain_{k}": summary[k] for k in ("source", "n_images", "n_poison", "removed", "removed_poison")
            if k in summary}


def record_measurement(stage: Stage, env: Env) -> dict:
    """(Re)write the results row of a finished measure stage; idempotent like ``record_evaluation``."""
    meta = env.store.read_meta(stage.kind, stage.key)
    labels = stage.labels
    row = {"row_key": _row_key(stage), "stage_key": stage.key, "name": stage.name, "result": meta["result"],
           "seconds": meta.get("seconds"), "device": meta.get("device"), "code_version": stage.code,
           **{k: labels.get(k) for k in ("study", "arm", "profile", "overrides", "seed", "attack", "defense",
                                         "pretrain", "downstream", "role")}, **_computed_at(meta)}
    env.db.add_measurement(row)
    return row


def record_row(stage: Stage, env: Env) -> None:
    """The results row of a finished evaluate/measure stage (idempotent: restores a lost row); none for the
    kinds without rows."""
    write = KINDS[stage.kind].write_row
    if write is not None:
        write(stage, env)


# ----------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class StageKind:
    """Everything the pipeline knows about one kind of stage."""
    name: str
    run: Callable[[Stage, Env, RunContext, Path], dict]  # computes the artefact: {"encoder": ..., "result": ...}
    code_roots: Callable[[Stage], tuple[str, ...]]  # the project modules it runs: their code versions key it
    makes_encoder: bool  # its artefact is an encoder
    write_row: Callable[[Stage, Env], dict] | None = None  # its results row, from its artefact
    to_spec: Callable[[Any], dict] | None = None  # its typed config's dict form, as spec entries
    from_spec: Callable[[Stage], Any] | None = None  # the typed config rebuilt from those entries (another process)


def _component_config(registry):
    """``from_spec`` of an attack or defense stage: its config class, built from the spec's ``config``."""
    return lambda stage: build_config(registry.get(stage.name).config, stage.spec["config"],
                                      f"{registry.kind}.{stage.name}")


def _config_spec(config) -> dict:
    return {"config": dataclasses.asdict(config)}


def pretrain_spec(config: PretrainSettings) -> dict:
    """The pre-training settings as spec entries: the recipe (what SimCLR trains with) and the image cap."""
    recipe = dataclasses.asdict(config)
    return {"max_images": recipe.pop("max_images"), "recipe": recipe}


def _pretrain_config(stage: Stage) -> PretrainSettings:
    return build_config(PretrainSettings, {**stage.spec["recipe"], "max_images": stage.spec["max_images"]},
                        "pretrain")


def _defend_roots(stage: Stage) -> tuple[str, ...]:
    """The defense's module; on a tower, how a defense runs there; with the suspect's pre-training images, the
    harness code that picks them."""
    roots = (DEFENSES.get(stage.name).module, INPUTS)
    if _imports_tower(stage):
        return *roots, TOWER_LOADER, ON_TRANSFORMERS
    return (*roots, pretrain_inputs.MODULE) if "pretrain_data" in stage.spec else roots


def _evaluate_roots(stage: Stage) -> tuple[str, ...]:
    """The probe's module; the tower loader, another protocol's code and, for a screened encoder, how rejections
    are counted (each part of the result) where they apply."""
    protocol = (PROTOCOLS,) if "protocol" in stage.spec else ()
    screen = (SCREENING,) if _screens(stage.deps[0]) else ()
    return "defbench.benchmark.pipeline.evaluate", INPUTS, *_tower(stage), *protocol, *screen


KINDS: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("pretrain", _run_pretrain, lambda stage: ("defbench.encoders.simclr", INPUTS, *_tower(stage)),
              makes_encoder=True, to_spec=pretrain_spec, from_spec=_pretrain_config),
    StageKind("attack", _run_attack, lambda stage: (ATTACKS.get(stage.name).module, INPUTS, *_tower(stage)),
              makes_encoder=True, to_spec=_config_spec, from_spec=_component_config(ATTACKS)),
    StageKind("defend", _run_defend, _defend_roots, makes_encoder=True, to_spec=_config_spec,
              from_spec=_component_config(DEFENSES)),
    StageKind("evaluate", _run_evaluate, _evaluate_roots, makes_encoder=False, write_row=record_evaluation,
              to_spec=lambda config: {"eval": dataclasses.asdict(config)},
              from_spec=lambda stage: build_config(EvalSettings, stage.spec["eval"], "evaluate")),
    StageKind("measure", _run_measure,
              lambda stage: (MEASUREMENTS.get(stage.name).fn.__module__, INPUTS, *_tower(stage)),
              makes_encoder=False, write_row=record_measurement),
    StageKind("import", _run_import, lambda stage: ("defbench.encoders.checkpoints", INPUTS, *_tower(stage)),
              makes_encoder=True),
)}
