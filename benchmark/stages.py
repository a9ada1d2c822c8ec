"""The four stage kinds and how each one runs.

A :class:`Stage` is pure data: its kind, a JSON-able ``spec`` holding
everything that determines its output, and the stages it depends on. Its key
hashes the spec, the keys of its inputs and the code version of the module
that implements it, so changing any of them yields a new artifact while
everything else stays cached. ``labels`` only name results (attack, defense,
role...) and are not part of the key.

1. pretrain(dataset)                      -> clean encoder
2. attack(attack, [clean encoder], task)  -> suspect encoder
3. defend(defense, encoder, clean subset) -> defended encoder
4. evaluate(encoder, task, trigger)       -> ACC / ASR (+ a results row)
"""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..attacks import ATTACKS, AttackInputs, trigger_from_description
from ..defenses import DEFENSES, CleanData
from ..encoders import (Encoder, RunContext, SimCLRConfig, build_encoder, load_encoder, save_encoder,
                        train_simclr)
from . import evaluate as evaluation
from .datasets import ImageSet, load_dataset
from .profiles import EvalSettings, canonical_json
from .results import ResultsDB
from .store import ArtifactStore

ENCODER_KINDS = ("pretrain", "attack", "defend")
# Part of every key: bump it when the way stages are seeded changes, so no artifact made under
# the old seeding is reused beside new ones.
SEEDING = 2


# ----------------------------------------------------------------- code versions

def _source_digest(module_name: str, seen: set[str]) -> list[str]:
    """Source hashes of a module and the defbench modules it uses directly."""
    if module_name in seen or module_name not in sys.modules:
        return []
    seen.add(module_name)
    module = sys.modules[module_name]
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = module_name
    digests = [hashlib.sha256(source.encode()).hexdigest()[:16]]
    for value in vars(module).values():
        dep = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(dep, str) and dep.startswith("defbench.") and dep not in seen:
            if not dep.startswith("defbench.benchmark"):  # harness changes never invalidate results
                seen.add(dep)
                try:
                    digests.append(hashlib.sha256(inspect.getsource(sys.modules[dep]).encode()).hexdigest()[:16])
                except (OSError, TypeError, KeyError):
                    pass
    return digests


def code_version(*module_names: str) -> str:
    seen: set[str] = set()
    parts = sorted(d for m in module_names for d in _source_digest(m, seen))
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:12]


# ----------------------------------------------------------------- stages

def _digest(payload: dict) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]


@dataclass(eq=False)
class Stage:
    kind: str
    name: str
    spec: dict
    deps: tuple["Stage", ...] = ()
    labels: dict = field(default_factory=dict)

    @cached_property
    def code(self) -> str:
        if self.kind == "pretrain":
            return code_version("defbench.encoders.simclr", "defbench.encoders.augment",
                                "defbench.encoders.resnet", "defbench.encoders.base")
        if self.kind == "attack":
            return code_version(ATTACKS.get(self.name).module)
        if self.kind == "defend":
            return code_version(DEFENSES.get(self.name).module)
        if self.kind == "measure":
            from .measures import get_measure
            return code_version(get_measure(self.name).__module__)
        return code_version("defbench.benchmark.evaluate")

    @cached_property
    def key(self) -> str:
        return _digest({"kind": self.kind, "name": self.name, "spec": self.spec,
                        "deps": [d.key for d in self.deps], "code": self.code, "seeding": SEEDING})

    @cached_property
    def seed_identity(self) -> str:
        """The key without code versions: what the stage computes, not how its code is written."""
        return _digest({"kind": self.kind, "name": self.name, "spec": self.spec,
                        "deps": [d.seed_identity for d in self.deps]})

    @property
    def label(self) -> str:
        return self.labels.get("label") or f"{self.kind} {self.name}"

    def seed(self) -> int:
        # Not from the key: a refactor that changes no numerics must give bit-identical numbers,
        # so editing a module re-runs its stages but never re-draws their random numbers.
        return int(self.seed_identity[:8], 16) % (2**31)


@dataclass
class Env:
    store: ArtifactStore
    db: ResultsDB
    data_dir: Path
    device: torch.device


# ----------------------------------------------------------------- data access

def _subsample(n: int, cap: int, seed: int) -> torch.Tensor:
    if not cap or cap >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def _name_seed(name: str, seed: int) -> int:
    return (int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) + seed) % (2**31)


def dataset_split(env: Env, name: str, split: str, image_size: int, cap: int, seed: int) -> ImageSet:
    data = load_dataset(name, split, env.data_dir, image_size)
    return data.subset(_subsample(len(data), cap, _name_seed(f"{name}/{split}", seed)))


def clean_subset(env: Env, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean images (random, seeded) and their indices in the pre-training split."""
    data = load_dataset(spec["dataset"], "pretrain", env.data_dir, spec["image_size"])
    n = max(1, round(spec["fraction"] * len(data)))
    if spec.get("max_images"):
        n = min(n, spec["max_images"])
    gen = torch.Generator().manual_seed(_name_seed(f"clean/{spec['dataset']}", spec["seed"]))
    index = torch.randperm(len(data), generator=gen)[:n].sort().values
    images = data.images[index]
    if spec.get("poison_ratio"):  # robustness study: a share of the "clean" set carries the trigger
        poisoned = torch.randperm(n, generator=gen)[:round(spec["poison_ratio"] * n)]
        images = images.clone()
        images[poisoned] = trigger_from_description(spec["trigger"]).apply(images[poisoned])
    return images, index


def load_stage_encoder(env: Env, stage: Stage) -> Encoder:
    return load_encoder(env.store.path(stage.kind, stage.key) / "encoder.pt")


# ----------------------------------------------------------------- runners

def _run_pretrain(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    images = dataset_split(env, s["dataset"], "pretrain", s["encoder"]["image_size"], s["max_images"], s["seed"])
    encoder = build_encoder(s["encoder"]).to(ctx.device)
    history = train_simclr(encoder, images.images, SimCLRConfig(**s["recipe"]), ctx, desc=f"pretrain {s['dataset']}")
    ctx.record("loss_history", history)
    save_encoder(encoder, out / "encoder.pt")
    return {}


def _run_attack(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    component = ATTACKS.get(s["attack"])
    cfg = component.config(**s["config"])
    size = s["encoder"]["image_size"]
    trigger = trigger_from_description(s["trigger"])
    shadow = dataset_split(env, s["pretrain"], "pretrain", size, s["max_images"], s["seed"])
    task = load_dataset(s["downstream"], "train", env.data_dir, size)
    targets = task.images[task.of_class(s["target"])]
    if len(targets) == 0:
        raise ValueError(f"{s['downstream']} has no training images of target class {s['target']}; "
                         "set attack.target to a class it has")
    inputs = AttackInputs(
        encoder_config=build_encoder(s["encoder"]).config, pretrain_images=shadow.images,
        target_images=targets, trigger=trigger, pretrain_recipe=SimCLRConfig(**s["recipe"]),
        clean_encoder=load_stage_encoder(env, stage.deps[0]) if stage.deps else None)
    encoder = component.fn(inputs, cfg, ctx)
    save_encoder(encoder, out / "encoder.pt")
    return {}


def _run_defend(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    component = DEFENSES.get(s["defense"])
    cfg = component.config(**s["config"])
    images, index = clean_subset(env, s["clean"])
    torch.save(index, out / "clean_indices.pt")
    suspect = load_stage_encoder(env, stage.deps[0]).to(ctx.device)
    encoder = component.fn(suspect, CleanData(images), cfg, ctx)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"defense {s['defense']!r} returned {type(encoder).__name__}, not an Encoder")
    save_encoder(encoder, out / "encoder.pt")
    return {"n_clean": len(images)}


def _features(env: Env, encoder_stage: Stage, encoder: Encoder, ctx: RunContext, data: ImageSet,
              split_id: str, trigger_desc: dict | None, batch: int) -> torch.Tensor:
    """Features of one encoder on one (sub)set, computed once and kept in the store."""
    key = hashlib.sha256(canonical_json([encoder_stage.key, split_id, trigger_desc]).encode()).hexdigest()[:24]
    path = env.store.path("features", key) / "features.pt"
    if env.store.exists("features", key):
        return torch.load(path, weights_only=True)
    trigger = trigger_from_description(trigger_desc) if trigger_desc else None
    feats = evaluation.extract_features(encoder, data.images, ctx, batch, trigger, desc=f"features {split_id}")
    with env.store.lock("features", key), env.store.writing("features", key, {"split": split_id}) as tmp:
        torch.save(feats, tmp / "features.pt")
    return feats


def _run_evaluate(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    s = stage.spec
    cfg = EvalSettings(**{**s["eval"], "hidden": tuple(s["eval"]["hidden"])})
    encoder_stage = stage.deps[0]
    encoder = load_stage_encoder(env, encoder_stage).to(ctx.device)
    train = dataset_split(env, s["downstream"], "train", s["image_size"], cfg.max_train, s["seed"])
    test = dataset_split(env, s["downstream"], "test", s["image_size"], cfg.max_test, s["seed"])
    ids = {part: f"{s['downstream']}/{part}/{cap}/{s['seed']}"
           for part, cap in (("train", cfg.max_train), ("test", cfg.max_test))}
    f_train = _features(env, encoder_stage, encoder, ctx, train, ids["train"], None, cfg.feature_batch)
    f_test = _features(env, encoder_stage, encoder, ctx, test, ids["test"], None, cfg.feature_batch)
    f_trig = _features(env, encoder_stage, encoder, ctx, test, ids["test"], s["trigger"], cfg.feature_batch)
    probe = evaluation.train_probe(f_train, train.labels, max(train.num_classes, test.num_classes), cfg, ctx)
    metrics = evaluation.score(evaluation.predict(probe, f_test, ctx.device),
                               evaluation.predict(probe, f_trig, ctx.device), test.labels, s["target"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _run_measure(stage: Stage, env: Env, ctx: RunContext, out: Path) -> dict:
    from .measures import get_measure  # the measurements use the stages' helpers
    result = get_measure(stage.name)(stage, env, ctx, out)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


RUNNERS = {"pretrain": _run_pretrain, "attack": _run_attack, "defend": _run_defend, "evaluate": _run_evaluate,
           "measure": _run_measure}


def run_stage(stage: Stage, env: Env) -> dict:
    """Compute one stage (its inputs must exist) and write its artifact; returns its meta."""
    ctx = RunContext(device=env.device).reseed(stage.seed())
    started = time.perf_counter()
    meta = {"name": stage.name, "spec": stage.spec, "deps": [d.key for d in stage.deps],
            "code_version": stage.code, "device": str(env.device), "labels": stage.labels,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with env.store.writing(stage.kind, stage.key, meta) as out:
        result = RUNNERS[stage.kind](stage, env, ctx, out)
        meta.update(result=result, records=ctx.records, seconds=time.perf_counter() - started)
    env.db.add_stage({"stage_key": stage.key, "kind": stage.kind, "name": stage.name, "label": stage.label,
                      "seconds": meta["seconds"], "device": meta["device"], "code_version": stage.code,
                      "spec": stage.spec, "records": ctx.records})
    return meta


def record_evaluation(stage: Stage, env: Env) -> dict:
    """(Re)write the results row of a finished evaluate stage from its artifact; returns the row."""
    meta = env.store.read_meta(stage.kind, stage.key)
    encoder_stage = stage.deps[0]
    encoder_meta = env.store.read_meta(encoder_stage.kind, encoder_stage.key)
    labels = stage.labels
    row_id = canonical_json([stage.key, {k: v for k, v in labels.items() if k != "label"}])
    row = {
        "row_key": hashlib.sha256(row_id.encode()).hexdigest()[:24],
        "eval_key": stage.key, "encoder_key": encoder_stage.key,
        "profile": labels.get("profile"), "overrides": labels.get("overrides", {}), "seed": labels.get("seed"),
        "attack": labels.get("attack"), "defense": labels.get("defense"), "role": labels.get("role"),
        "pretrain": labels.get("pretrain"), "downstream": stage.spec["downstream"], "target": stage.spec["target"],
        **{k: meta["result"][k] for k in ("acc", "asr_all", "asr_excl", "n_test")},
        "encoder_seconds": encoder_meta.get("seconds"), "eval_seconds": meta.get("seconds"),
        "device": meta.get("device"), "code_version": stage.code,
        "config": {"eval": stage.spec, "encoder": encoder_meta.get("spec")},
        "extra": {**{k: v for k, v in encoder_meta.get("records", {}).items()  # curves stay in the artifact
                     if not (isinstance(v, list) and len(v) > 64)},
                  **{k: v for k, v in encoder_meta.get("result", {}).items() if k == "n_clean"}},
        **{k: labels.get(k) for k in ("study", "arm", "sweep", "x")},
    }
    env.db.add_evaluation(row)
    return row
