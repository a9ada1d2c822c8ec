"""The harness: caching, the defense contract, results rows, the CLI's errors."""
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from defbench.benchmark.pipeline import scheduler as runner
from defbench.benchmark.cli import main
from defbench.benchmark.pipeline.plan import cell_stages, defend_stage
from defbench.benchmark.pipeline.scheduler import run_grid, run_one
from defbench.defenses import CleanData, register_defense

from conftest import PRETRAIN, TASK  # noqa: E402


@dataclasses.dataclass
class SpyConfig:
    epochs: int = 1


SEEN = {}


@register_defense("spy", config=SpyConfig, summary="test spy: records what a defense is given")
def spy_defense(encoder, clean, cfg, ctx):
    SEEN.update(encoder=encoder, clean=clean, cfg=cfg, ctx=ctx)
    return encoder


def _reachable(obj, depth=0, seen=None):
    """Every attribute value reachable from obj (a few levels deep)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return
    seen.add(id(obj))
    yield obj
    children = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        children = list(vars(obj).values())
    for child in children:
        yield from _reachable(child, depth + 1, seen)


def test_a_defense_sees_only_the_encoder_unlabelled_clean_images_and_its_config(ci_profile, ci_env, ci_stages):
    stage = defend_stage(ci_profile, "spy", ci_stages[1], PRETRAIN)
    run_one(stage, ci_env)
    clean, cfg, ctx = SEEN["clean"], SEEN["cfg"], SEEN["ctx"]
    assert isinstance(clean, CleanData) and [f.name for f in dataclasses.fields(clean)] == ["images"]
    assert clean.images.dtype == torch.uint8 and len(clean) == ci_profile.clean.max_images
    assert isinstance(cfg, SpyConfig)
    for value in _reachable([clean, cfg, ctx]):
        assert not (torch.is_tensor(value) and value.dtype == torch.int64), "integer tensor (labels?) reachable"
        names = set(vars(value)) if hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module) else set()
        assert not names & {"labels", "target", "trigger", "test", "targets"}, names
    # the clean images are a seeded random subset of the pre-training set, indices saved beside the result
    index = torch.load(ci_env.store.path("defend", stage.key) / "clean_indices.pt", weights_only=True)
    assert len(index) == len(clean) and not torch.equal(index, torch.arange(len(index)))


def test_finished_stages_are_never_recomputed(ci_profile, ci_env, monkeypatch):
    stages = list(cell_stages(ci_profile, "badencoder", "none", PRETRAIN, TASK).values())
    first = run_grid(stages, ci_env, show_progress=False)
    assert all(o.status in ("ran", "cached") for o in first)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was recomputed")
    monkeypatch.setattr(runner, "run_stage", refuse)
    again = run_grid(stages, ci_env, show_progress=False)
    assert [o.status for o in again] == ["cached"] * len(again)


def test_results_rows_carry_config_seed_device_and_code(ci_profile, ci_env):
    stages = cell_stages(ci_profile, "badencoder", "none", PRETRAIN, TASK)
    run_grid(list(stages.values()), ci_env, show_progress=False)
    rows = ci_env.db.evaluations(eval_key=stages["undefended"].key)
    assert len(rows) == 1
    row = rows.iloc[0]
    assert row.attack == "badencoder" and row.role == "undefended" and row.profile == "ci"
    assert row.device == "cpu" and row.seed == 0 and len(row.code_version) == 12
    assert json.loads(row.config)["eval"]["downstream"] == TASK
    assert 0 <= row.acc <= 100 and 0 <= row.asr_all <= 100


def test_a_lost_database_is_refilled_from_the_artifacts(ci_profile, ci_env, tmp_path, monkeypatch):
    import time

    from defbench.benchmark.pipeline.results import ResultsDB
    from defbench.benchmark.pipeline.stages import Env
    stages = list(cell_stages(ci_profile, "badencoder", "none", PRETRAIN, TASK).values())
    run_grid(stages, ci_env, show_progress=False)
    monkeypatch.setattr(time, "strftime", lambda *args: "2999-01-01T00:00:00")  # "now", while refilling
    fresh = Env(ci_env.store, ResultsDB(tmp_path / "new.sqlite"), ci_env.data_dir, ci_env.device)
    outcomes = run_grid(stages, fresh, show_progress=False)
    assert all(o.status == "cached" for o in outcomes)
    rows = fresh.db.evaluations()
    assert len(rows) == 2
    # a row rewritten from the cache is dated when its result was computed, not when it was rewritten
    for row in rows.itertuples():
        assert row.created_at == ci_env.store.read_meta("evaluate", row.eval_key)["written_at"]


def test_a_failing_stage_fails_only_its_dependents(ci_profile, ci_env):
    @dataclasses.dataclass
    class Cfg:
        pass

    @register_defense("explodes", config=Cfg, summary="test: always fails")
    def explodes(encoder, clean, cfg, ctx):
        raise RuntimeError("boom")

    stages = cell_stages(ci_profile, "badencoder", "explodes", PRETRAIN, TASK)
    outcomes = {o.stage.labels.get("role", o.stage.kind): o
                for o in run_grid(list(stages.values()), ci_env, show_progress=False)}
    assert outcomes["defended"].status == "skipped"
    assert outcomes["undefended"].status in ("ran", "cached")
    failed = [o for o in run_grid(list(stages.values()), ci_env, show_progress=False) if o.status == "failed"]
    assert len(failed) == 1 and "boom" in failed[0].error


@pytest.mark.parametrize("args, expected", [
    (["run", "--attack", "badencodr"], "did you mean badencoder"),
    (["run", "--defense", "nope"], "unknown defense 'nope'"),
    (["run", "--set", "pretrain.epoch=2"], "pretrain.epochs"),
    (["run", "--profile", "huge"], "unknown profile"),
    (["run", "--pretrain", "imagenet"], "unknown dataset 'imagenet'"),
    (["run", "--device", "cuda:7"], "CUDA is not available"),
])
def test_cli_bad_input_is_one_line_with_the_fix(args, expected):
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output


def test_cli_missing_real_dataset_names_the_files(tmp_path):
    result = CliRunner().invoke(main, ["run", "--profile", "ci", "--pretrain", "cifar10", "--downstream", "svhn",
                                       "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "cifar-10-batches-py" in result.output


def test_cli_run_json_on_a_cached_cell(ci_stages):
    result = CliRunner().invoke(main, ["run", "--profile", "ci", "--defense", "none", "--downstream", TASK, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    (row,) = payload["results"]
    for key in ("attack", "defense", "pretrain", "downstream", "acc", "asr", "acc_undefended", "asr_undefended",
                "seconds", "asr_excl_target"):
        assert key in row
    assert row["pretrain"] == PRETRAIN and row["downstream"] == TASK


def test_list_shows_registered_components():
    out = CliRunner().invoke(main, ["list", "defenses"]).output
    assert "ft " in out and "fine-tune" in out
    assert "synth-gtsrb" in CliRunner().invoke(main, ["list", "datasets"]).output


def test_poison_ratio_stamps_that_share_of_the_defenders_clean_set(ci_env, ci_stages):
    from defbench.benchmark.pipeline.plan import defend_stage
    from defbench.benchmark.pipeline.settings import load_profile, parse_sets
    from defbench.benchmark.pipeline.inputs import clean_subset
    profile = load_profile("ci", parse_sets(["clean.poison_ratio=0.25"]))
    stage = defend_stage(profile, "ft", ci_stages[1], PRETRAIN)
    images, _ = clean_subset(ci_env.data_dir, stage.spec["clean"])
    clean, _ = clean_subset(ci_env.data_dir, {**stage.spec["clean"], "poison_ratio": 0.0})
    patched = (images[:, :, 21:31, 21:31] == 255).flatten(1).all(1)
    assert patched.sum() == round(0.25 * len(images))
    assert torch.equal(images[~patched], clean[~patched])
    assert stage.key != defend_stage(load_profile("ci"), "ft", ci_stages[1], PRETRAIN).key


def test_editing_a_module_reruns_its_stages_with_the_same_seed(ci_profile):
    """A refactor gets a fresh artifact but the same random numbers, so equal code gives equal numbers."""
    stages = cell_stages(ci_profile, "badencoder", "mimic", PRETRAIN, TASK)
    defend, evaluate = stages["defended"].deps[0], stages["defended"]
    before = {s: (s.key, s.seed()) for s in (defend, evaluate)}
    for stage in before:
        stage.__dict__.pop("key"), stage.__dict__.pop("seed_identity")
    defend.__dict__["code"] = "edited-code"
    for stage, (key, seed) in before.items():
        assert stage.key != key and stage.seed() == seed
    assert len({s.seed() for s in stages.values()}) == len(stages)  # stages still draw different numbers


def test_defenses_can_be_applied_to_the_clean_encoder(ci_profile):
    from defbench.benchmark.pipeline.plan import clean_encoder_stages
    stages = clean_encoder_stages(ci_profile, "badencoder", "ft", PRETRAIN, TASK)
    defended = stages["defended"]
    assert defended.labels["role"] == "clean-defended"
    assert defended.deps[0].kind == "defend" and defended.deps[0].deps[0].kind == "pretrain"


def test_a_redrawn_set_never_reuses_the_old_draws_features(ci_profile):
    from defbench.benchmark.pipeline.stages import feature_key
    clean = cell_stages(ci_profile, "badencoder", "none", PRETRAIN, TASK)["clean"]
    redrawn = dataclasses.replace(clean, spec={**clean.spec, "data": clean.spec["data"] + "r1"})
    assert redrawn.deps[0].key == clean.deps[0].key  # the same encoder ...
    split = f"{TASK}/test/0/0"
    assert feature_key(redrawn, split, None) != feature_key(clean, split, None)  # ... on other images
    resized = dataclasses.replace(clean, spec={**clean.spec, "image_size": 2 * clean.spec["image_size"]})
    assert feature_key(resized, split, None) != feature_key(clean, split, None)
    assert feature_key(clean, split, None) == feature_key(clean, split, None)


def test_every_stamping_stage_rebuilds_a_learned_trigger_from_its_attacks_artefact(tmp_path):
    """Evaluations (screened ones too) and measurements stamp a learned trigger through one helper."""
    from defbench.attacks import PatchTrigger
    from defbench.attacks.learned import TRIGGER_FILE, LearnedTrigger
    from defbench.benchmark.pipeline import stages
    from defbench.benchmark.pipeline.results import ResultsDB
    from defbench.benchmark.pipeline.store import ArtifactStore

    env = stages.Env(store=ArtifactStore(tmp_path / "artifacts"), db=ResultsDB(tmp_path / "results.sqlite"),
                     data_dir=tmp_path / "data", device=torch.device("cpu"))
    learned = PatchTrigger(size=4)  # what the attack stored
    folder = env.store.path("attack", "abc123")
    folder.mkdir(parents=True)
    (folder / TRIGGER_FILE).write_text(json.dumps(learned.describe()))
    placeholder = {**LearnedTrigger(attack="toy").describe(), "stage": "abc123"}
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert torch.equal(stages._stamping_trigger(env, placeholder).apply(images), learned.apply(images))
    assert stages._stamping_trigger(env, None) is None
