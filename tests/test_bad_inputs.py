"""Bad inputs to every command (issue 20): each one is refused with exit code != 0, exactly one line on stderr,
no traceback, nothing on stdout, and nothing written under DEFBENCH_HOME but the results database.

Most cases run in-process through click's CliRunner (the same `main` the console script calls); the cases that
need another process (a read-only or full DEFBENCH_HOME, the real entry point) run as subprocesses, each
batch in one interpreter.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from defbench.benchmark.cli import main
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.encoders import build_encoder, save_encoder
from defbench.encoders.checkpoints import FORMAT

from conftest import MICRO

QUIET_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # Python's
DB_FILES = {"results.sqlite", "results.sqlite-wal", "results.sqlite-shm", "results.sqlite-journal"}
MARKER = "pwned-by-a-data-file"
SETS = [x for s in MICRO for x in ("--set", s)]  # a case that is wrongly accepted stays small
CELL = ["--profile", "ci", "--pretrain", "synth-cifar10", "--downstream", "synth-stl10"]


class _Hostile:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _npz(folder: Path, train_y, test_y=None, n_pixels: int = 8, train_x=None) -> str:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = train_x if train_x is not None else rng.integers(0, 255, (len(train_y), n_pixels, n_pixels, 3), np.uint8)
    np.savez(folder / "train.npz", x=x, y=np.asarray(train_y))
    if test_y is not None:
        np.savez(folder / "test.npz", x=rng.integers(0, 255, (len(test_y), n_pixels, n_pixels, 3), np.uint8),
                 y=np.asarray(test_y))
    return f"npz:{folder}"


def _cifar(root: Path, hostile: Path | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        entry = {"labels": [i % 10 for i in range(20)], "data": np.zeros((20, 3072), np.uint8)}
        if hostile is not None and name == "data_batch_1":
            entry["data"] = _Hostile(hostile)
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol=2))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data files, checkpoints and homes the cases point at (small npz sets: nothing is generated)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    home = root / "home"
    home.mkdir()
    w = {"home": str(home), "root": str(root)}
    d = root / "data"
    w["pre"] = _npz(d / "pre", [0, 1, 2, 3] * 50)  # 200 images: a 4-image clean set at the ci fraction
    w["good"] = _npz(d / "good", [0, 1, 2, 3] * 10, [0, 1, 2, 3] * 5)
    w["empty"] = _npz(d / "empty", np.zeros(0, np.int64), [0, 1], train_x=np.zeros((0, 8, 8, 3), np.uint8))
    w["negative"] = _npz(d / "negative", [0, 1, -2, 1] * 5, [0, 1])
    w["huge_label"] = _npz(d / "huge-label", [0, 1, 10**9, 1] * 5, [0, 1])
    w["unseen"] = _npz(d / "unseen", [0, 1, 2] * 10, [0, 1, 7])
    w["single"] = _npz(d / "single", [0] * 20, [0, 0])
    w["no_target_test"] = _npz(d / "no-target-test", [0, 1, 2, 3] * 10, [0, 1, 2] * 3)
    w["all_target_test"] = _npz(d / "all-target-test", [0, 1, 2, 3] * 10, [2] * 6)
    w["float_y"] = f"npz:{d / 'float-y.npz'}"
    np.savez(d / "float-y.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.float32))
    w["object"] = f"npz:{d / 'object.npz'}"
    np.savez(d / "object.npz", x=np.array([None, {"a": 1}], dtype=object), y=np.zeros(2, int))
    w["tiny_pretrain"] = _npz(d / "tiny-pretrain", [0, 1] * 5, [0, 1])  # 10 images: a 0 or 1-image clean set
    w["one_image"] = f"npz:{d / 'one-image.npz'}"
    np.savez(d / "one-image.npz", x=np.zeros((1, 8, 8, 3), np.uint8))
    # a folder task whose class 'c' has no training images (but is a class: the target can name it)
    for split, classes in (("train", "ab"), ("test", "ab")):
        for c in "abc":
            (d / "folder" / split / c).mkdir(parents=True)
        for c in classes:
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / "folder" / split / c / f"{i}.png")
    w["folder"] = f"folder:{d / 'folder'}"
    w["a_file"] = str(d / "a-file.txt")
    (d / "a-file.txt").write_text("not a folder\n")
    w["hostile_cifar"] = str(_cifar(d / "hostile-cifar", hostile=root / MARKER))
    w["marker"] = str(root / MARKER)
    # checkpoints
    encoder = build_encoder(width=8)
    save_encoder(encoder, d / "good.pt")
    w["good_pt"] = str(d / "good.pt")
    config = {**encoder.config.to_dict(), "image_size": -4}
    torch.save({"format": FORMAT, "config": config, "state_dict": encoder.state_dict()}, d / "negative-size.pt")
    w["negative_size_pt"] = str(d / "negative-size.pt")
    (d / "hostile.pt").write_bytes(pickle.dumps(_Hostile(root / MARKER)))
    w["hostile_pt"] = str(d / "hostile.pt")
    (d / "truncated.pt").write_bytes((d / "good.pt").read_bytes()[:5000])
    w["truncated_pt"] = str(d / "truncated.pt")
    # profile files
    profiles = {"garbage": "this is [not toml", "cycle": 'base = "cycle.toml"\n', "width": "[encoder]\nwidth = -1\n",
                "unknown": "[encoder]\nwidht = 8\n", "seed": 'seed = "x"\n', "nested": "[encoder.x]\ny = 1\n",
                "base": "base = 5\n", "epochs": 'base = "ci"\n[defense.ft]\nepochs = 1e12\n'}
    for name, text in profiles.items():
        (d / f"{name}.toml").write_text(text)
        w[f"{name}_toml"] = str(d / f"{name}.toml")
    (d / "binary.toml").write_bytes(b"\xff\xfe\x00 not text")
    w["binary_toml"] = str(d / "binary.toml")
    # golden files
    (d / "golden-binary.csv").write_bytes(b"\x00\xff\xfe garbage \x81")
    (d / "golden-seed.csv").write_text("# seed: x\nattack,pretrain,downstream,column,acc,asr,tol_acc,tol_asr\n")
    (d / "golden-empty.csv").write_text("")
    (d / "golden-columns.csv").write_text("a,b\n1,2\n")
    for name in ("binary", "seed", "empty", "columns"):
        w[f"golden_{name}"] = str(d / f"golden-{name}.csv")
    # homes
    for name in ("garbage_db", "dir_db", "empty_db"):
        (root / name).mkdir()
        w[f"{name}_home"] = str(root / name)
    (root / "garbage_db" / "results.sqlite").write_bytes(b"this is not a database" * 100)
    (root / "dir_db" / "results.sqlite").mkdir()
    ResultsDB(root / "empty_db" / "results.sqlite")
    return w


# (id, arguments, a fragment the one line must hold, which DEFBENCH_HOME: a key of `world`, default "home")
CASES = [
    # --- empty lists are errors, not "everything" (item 3)
    ("grid-defenses-comma", ["grid", *CELL[:2], "--defenses", ","], "names nothing"),
    ("grid-attacks-blank", ["grid", *CELL[:2], "--attacks", " , "], "names nothing"),
    ("grid-pretrain-comma", ["grid", *CELL[:2], "--pretrain", ","], "names nothing"),
    ("grid-downstream-comma", ["grid", *CELL[:2], "--downstream", ", ,"], "names nothing"),
    ("table-defenses-comma", ["table", "table1", "--profile", "ci", "--defenses", ","], "names nothing"),
    ("grid-no-pretrain", ["grid", *CELL[:2], "--set", "grid.pretrain=[]"], "no pretrain to run"),
    # --- settings: types and ranges, checked when planned (item 4)
    ("epochs-negative", ["run", *CELL, "--set", "defense.ft.epochs=-1"], "between 0 and 10,000,000"),
    ("epochs-absurd", ["run", *CELL, "--set", "defense.ft.epochs=1e11"], "between 0 and 10,000,000"),
    ("epochs-fraction", ["run", *CELL, "--set", "defense.epochs=1.5"], "expects an integer"),
    ("epochs-text", ["run", *CELL, "--set", "pretrain.epochs=many"], "expects an integer"),
    ("pretrain-epochs-negative", ["run", *CELL, "--set", "pretrain.epochs=-1"], "pretrain.epochs"),
    ("attack-epochs-negative", ["run", *CELL, "--set", "attack.badencoder.epochs=-2"], "badencoder.epochs"),
    ("batch-zero", ["run", *CELL, "--set", "pretrain.batch_size=0"], "between 1 and"),
    ("eval-batch-negative", ["run", *CELL, "--set", "evaluate.batch_size=-3"], "between 1 and"),
    ("feature-batch-zero", ["run", *CELL, "--set", "evaluate.feature_batch=0"], "between 1 and"),
    ("clean-fraction-zero", ["run", *CELL, "--set", "clean.fraction=0"], "clean.fraction"),
    ("clean-fraction-big", ["run", *CELL, "--set", "clean.fraction=1.5"], "clean.fraction"),
    ("clean-fraction-nan", ["run", *CELL, "--set", "clean.fraction=nan"], "finite"),
    ("clean-max-negative", ["run", *CELL, "--set", "clean.max_images=-1"], "clean.max_images"),
    ("poison-ratio-big", ["run", *CELL, "--set", "clean.poison_ratio=2"], "between 0 and 1"),
    ("max-test-negative", ["run", *CELL, "--set", "evaluate.max_test=-1"], "evaluate.max_test"),
    ("max-train-absurd", ["run", *CELL, "--set", "evaluate.max_train=1e9"], "evaluate.max_train"),
    ("width-zero", ["run", *CELL, "--set", "encoder.width=0"], "encoder.width"),
    ("image-size-tiny", ["run", *CELL, "--set", "encoder.image_size=4"], "encoder.image_size"),
    ("arch-unknown", ["run", *CELL, "--set", "encoder.arch=vgg"], "unknown encoder architecture"),
    ("std-zero", ["run", *CELL, "--set", "encoder.std=[0, 0, 0]"], "std > 0"),
    ("mean-two", ["run", *CELL, "--set", "encoder.mean=[0.5, 0.5]"], "expects 3 values"),
    ("hidden-zero", ["run", *CELL, "--set", "evaluate.hidden=[0, 4]"], "evaluate.hidden"),
    ("dropout-one", ["run", *CELL, "--set", "evaluate.dropout=1"], "dropout"),
    ("eval-lr-zero", ["run", *CELL, "--set", "evaluate.lr=0"], "positive"),
    ("defense-lr-zero", ["run", *CELL, "--set", "defense.ft.lr=0"], "must be positive"),
    ("defense-lr-inf", ["run", *CELL, "--set", "defense.ft.lr=inf"], "finite"),
    ("momentum-big", ["run", *CELL, "--set", "defense.ft.momentum=1.5"], "between 0 and 1"),
    ("temperature-zero", ["run", *CELL, "--set", "defense.ft.temperature=0"], "must be positive"),
    ("weight-decay-negative", ["run", *CELL, "--set", "defense.ft.weight_decay=-1"], "0 or more"),
    ("trigger-empty", ["run", *CELL, "--set", "attack.trigger_size=0"], "does not fit"),
    ("trigger-too-big", ["run", *CELL, "--set", "attack.trigger_size=100"], "does not fit"),
    ("trigger-outside", ["config", "--profile", "ci", "--set", "attack.trigger_row=40"], "does not fit"),
    ("hidden-huge", ["run", *CELL, "--set", "evaluate.hidden=[1000000000, 4]"], "between 1 and 65,536"),
    ("width-huge", ["run", *CELL, "--set", "encoder.width=100000"], "at most 1,024"),
    ("max-train-one", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{good}", "--set",
                       "evaluate.max_train=1"], "max_train=1 subset) holds a single class"),
    ("target-negative", ["run", *CELL, "--set", "attack.target=-3"], "class index"),
    ("target-not-a-class", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{good}",
                            "--set", "attack.target=99"], "not a class of npz:"),
    ("seed-negative", ["run", *CELL, "--seed", "-1"], "seed must be between"),
    ("seed-huge", ["run", *CELL, "--seed", str(2**70)], "seed must be between"),
    ("seed-set-huge", ["run", *CELL, "--set", f"seed={2**64}"], "seed must be between"),
    ("seed-text", ["run", *CELL, "--set", "seed=abc"], "expects an integer"),
    ("key-unknown", ["run", *CELL, "--set", "nokey=1"], "unknown setting 'nokey'"),
    ("key-misspelt", ["run", *CELL, "--set", "pretrain.epoch=2"], "did you mean"),
    ("key-empty", ["run", *CELL, "--set", "=3"], "key=value"),
    ("key-no-value", ["run", *CELL, "--set", "foo"], "key=value"),
    ("defense-field-unknown", ["run", *CELL, "--set", "defense.ft.nosuch=1"], "unknown setting"),
    ("defense-unknown-key", ["run", *CELL, "--set", "defense.nosuch.epochs=1"], "unknown defense"),
    ("grid-list-type", ["run", *CELL, "--set", "grid.attacks=5"], "expects a list"),
    ("profile-unknown", ["run", "--profile", "huge"], "unknown profile"),
    ("profile-missing-file", ["run", "--profile", "{root}/missing.toml"], "profile file not found"),
    ("profile-garbage", ["run", "--profile", "{garbage_toml}"], "not valid TOML"),
    ("profile-cycle", ["run", "--profile", "{cycle_toml}"], "cycle"),
    ("profile-width", ["run", "--profile", "{width_toml}"], "encoder.width"),
    ("profile-unknown-key", ["run", "--profile", "{unknown_toml}"], "did you mean encoder.width"),
    ("profile-seed-type", ["run", "--profile", "{seed_toml}"], "expects an integer"),
    ("profile-nested", ["run", "--profile", "{nested_toml}"], "not a settings table"),
    ("profile-base-type", ["run", "--profile", "{base_toml}"], "base must be"),
    ("profile-binary", ["run", "--profile", "{binary_toml}"], "cannot read the profile file"),
    ("profile-epochs", ["run", "--profile", "{epochs_toml}"], "defense.ft.epochs"),
    # --- names
    ("attack-unknown", ["run", *CELL, "--attack", "badencodr"], "did you mean badencoder"),
    ("defense-unknown", ["run", *CELL, "--defense", "nope"], "unknown defense 'nope'"),
    ("pretrain-unknown", ["run", "--profile", "ci", "--pretrain", "imagenet"], "unknown dataset 'imagenet'"),
    ("downstream-unknown", ["run", "--profile", "ci", "--downstream", "nosuch"], "unknown dataset 'nosuch'"),
    ("npz-missing", ["run", "--profile", "ci", "--pretrain", "npz:{root}/nope", "--downstream", "{good}"],
     "does not exist"),
    ("folder-is-file", ["run", "--profile", "ci", "--pretrain", "folder:{a_file}", "--downstream", "{good}"],
     "not a directory"),
    ("npz-no-family", ["config", "--profile", "ci", "--pretrain", "{pre}"], "name them with --downstream"),
    ("device-unknown", ["run", *CELL, "--device", "banana"], "unknown device"),
    ("device-cuda-missing", ["run", *CELL, "--device", "cuda:7"], "cuda:7"),
    ("grid-attack-unknown", ["grid", *CELL[:2], "--attacks", "nosuch"], "unknown attack"),
    ("grid-defense-unknown", ["grid", *CELL[:2], "--defenses", "ft,nosuch"], "unknown defense 'nosuch'"),
    ("grid-workers-zero", ["grid", *CELL[:2], "--workers", "0"], "--workers"),
    ("grid-workers-negative", ["grid", *CELL[:2], "--workers", "-2"], "--workers"),
    ("grid-workers-huge", ["grid", *CELL[:2], "--workers", "100000"], "CPU cores"),
    ("grid-executor", ["grid", *CELL[:2], "--executor", "slurm"], "--executor"),
    ("option-unknown", ["run", "--bogus"], "No such option"),
    ("command-unknown", ["nosuch"], "No such command"),
    ("list-unknown", ["list", "nosuch"], "is not one of"),
    ("clean-nothing", ["clean"], "--stale"),
    # --- data, checked before any stage (item 5)
    ("data-empty", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{empty}"], "holds no images"),
    ("data-negative-label", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{negative}"],
     "has label -2"),
    ("data-huge-label", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{huge_label}"],
     "at most"),
    ("data-test-unseen", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{unseen}"],
     "never occur in the training split"),
    ("data-single-class", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{single}"],
     "single class"),
    ("data-target-not-in-test", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream",
                                 "{no_target_test}", "--set", "attack.target=3"],
     "test split (its evaluate.max_test=200 subset) has no image of the attack's target class 3"),
    ("data-all-target", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{all_target_test}",
                         "--set", "attack.target=2"], "is of the target class 2"),
    ("data-target-not-in-train", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{folder}",
                                  "--set", "attack.target=2"], "training split has no image"),
    ("data-target-out-of-range", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{good}",
                                  "--set", "attack.target=4"], "not a class of"),
    ("data-float-labels", ["run", "--profile", "ci", "--pretrain", "{pre}", "--downstream", "{float_y}"],
     "integer labels"),
    ("data-object-array", ["run", "--profile", "ci", "--pretrain", "{object}", "--downstream", "{good}"],
     "without pickle"),
    ("data-clean-set-too-small", ["run", "--profile", "ci", "--pretrain", "{tiny_pretrain}", "--downstream",
                                  "{good}"], "clean set would hold"),
    ("data-hostile-cifar", ["run", "--profile", "ci", "--pretrain", "cifar10", "--downstream", "{good}",
                            "--data-dir", "{hostile_cifar}"], "refused to read"),
    ("grid-data-single-class", ["grid", "--profile", "ci", "--attacks", "badencoder", "--defenses", "ft",
                                "--pretrain", "{pre}", "--downstream", "{single}"], "single class"),
    # --- state: DEFBENCH_HOME and the results database (item 6)
    ("home-is-a-file", ["run", *CELL], "it is a file", "a_file"),
    ("home-under-a-file", ["grid", *CELL[:2]], "cannot use DEFBENCH_HOME", "a_file_child"),
    ("report-home-is-a-file", ["report", "components", "--profile", "ci"], "it is a file", "a_file"),
    ("report-no-database", ["report", "components", "--profile", "ci", "--no-run"], "no results database",
     "a_file"),
    ("db-garbage-run", ["run", *CELL], "not a database", "garbage_db_home"),
    ("db-garbage-table", ["table", "table1", "--profile", "ci"], "not a database", "garbage_db_home"),
    ("db-garbage-report", ["report", "components", "--profile", "ci", "--no-run"], "not a database",
     "garbage_db_home"),
    ("db-directory", ["run", *CELL], "cannot open the results database", "dir_db_home"),
    ("table-no-db", ["table", "table1", "--profile", "ci"], "no results database", "a_file_child"),
    ("table-defense-unknown", ["table", "table1", "--profile", "ci", "--defenses", "nosuch"],
     "neither a registered defense", "empty_db_home"),
    ("table-output-under-file", ["table", "table1", "--profile", "ci", "-o", "{a_file}/t.md"], "cannot write",
     "empty_db_home"),
    ("table-output-directory", ["table", "table1", "--profile", "ci", "-o", "{root}"], "directory",
     "empty_db_home"),
    ("table-format", ["table", "table1", "--format", "xls"], "--format"),
    ("table-seed-negative", ["table", "table1", "--profile", "ci", "--seed", "-1"], "seed must be between"),
    ("report-unknown", ["report", "nosuch"], "unknown report"),
    ("report-workers", ["report", "components", "--workers", "0"], "--workers"),
    ("report-studied-defense", ["report", "components", "--profile", "ci", "--set", "studies.defense=nosuch"],
     "unknown defense"),
    ("report-no-pretrain", ["report", "components", "--profile", "ci", "--set", "grid.pretrain=[]",
                            "--set", 'studies.pretrain=""'],
     "no pre-training set"),
    ("report-out-under-file", ["report", "components", "--profile", "ci", "-o", "{a_file}/out"], "is a file"),
    # --- golden
    ("golden-missing-file", ["golden", "check", "--file", "{root}/none.csv"], "no golden file"),
    ("golden-binary", ["golden", "check", "--file", "{golden_binary}"], "golden file"),
    ("golden-bad-seed", ["golden", "check", "--file", "{golden_seed}"], "seed"),
    ("golden-empty", ["golden", "check", "--file", "{golden_empty}"], "golden file"),
    ("golden-columns", ["golden", "check", "--file", "{golden_columns}"], "lacks columns"),
    ("golden-seeds-comma", ["golden", "update", "--seeds", ","], "names nothing"),
    ("golden-seeds-text", ["golden", "update", "--seeds", "a,b"], "integers"),
    ("golden-seeds-negative", ["golden", "update", "--seeds", "-1"], "between 0 and"),
    ("golden-output-under-file", ["golden", "update", "--seeds", "0", "--file", "{a_file}/g.csv"], "is a file"),
    ("golden-workers", ["golden", "check", "--workers", "0"], "--workers"),
    ("golden-workers-huge", ["golden", "check", "--workers", "100000"], "--workers"),
    # --- config
    ("config-epochs", ["config", "--profile", "ci", "--set", "evaluate.epochs=-1"], "evaluate.epochs"),
    ("config-attack", ["config", "--attack", "nosuch"], "unknown attack"),
    ("config-downstream", ["config", "--profile", "ci", "--downstream", "nosuch"], "unknown dataset"),
    ("config-seed", ["config", "--seed", "-5"], "seed must be between"),
    # --- detect
    ("detect-no-encoder", ["detect", "--profile", "ci"], "give --encoder"),
    ("detect-missing", ["detect", "--profile", "ci", "--encoder", "{root}/none.pt"], "not found"),
    ("detect-text-file", ["detect", "--profile", "ci", "--encoder", "{a_file}"], "a-file.txt"),
    ("detect-directory", ["detect", "--profile", "ci", "--encoder", "{root}"], "not found"),
    ("detect-negative-size", ["detect", "--profile", "ci", "--encoder", "{negative_size_pt}"], "image_size"),
    ("detect-hostile-pickle", ["detect", "--profile", "ci", "--encoder", "{hostile_pt}"], "refused"),
    ("detect-truncated", ["detect", "--profile", "ci", "--encoder", "{truncated_pt}"], "truncated.pt"),
    ("detect-images-negative", ["detect", "--encoder", "{good_pt}", "--images", "-1"], "--images"),
    ("detect-images-one", ["detect", "--encoder", "{good_pt}", "--images", "1"], "--images"),
    ("detect-images-too-many", ["detect", "--profile", "ci", "--encoder", "{good_pt}", "--data", "{good}",
                                "--images", "1000"], "has only 40 images"),
    ("detect-one-image-data", ["detect", "--profile", "ci", "--encoder", "{good_pt}", "--data", "{one_image}"],
     "at least 2"),
    ("detect-restarts", ["detect", "--encoder", "{good_pt}", "--restarts", "0"], "--restarts"),
    ("detect-restarts-huge", ["detect", "--encoder", "{good_pt}", "--restarts", "1000000"], "--restarts"),
    ("detect-quantile", ["detect", "--calibrate", "0", "--quantile", "2"], "--quantile"),
    ("detect-quantile-nan", ["detect", "--calibrate", "0", "--quantile", "nan"], "--quantile"),
    ("detect-threshold-nan", ["detect", "--encoder", "{good_pt}", "--threshold", "nan"], "finite"),
    ("detect-threshold-inf", ["detect", "--encoder", "{good_pt}", "--threshold", "inf"], "finite"),
    ("detect-calibrate-comma", ["detect", "--calibrate", ","], "names nothing"),
    ("detect-calibrate-text", ["detect", "--calibrate", "a,b"], "integer seeds"),
    ("detect-calibrate-negative", ["detect", "--calibrate", "-1"], "between 0 and"),
    ("detect-detector", ["detect", "--detector", "nosuch"], "unknown detector"),
    ("detect-data", ["detect", "--profile", "ci", "--encoder", "{good_pt}", "--data", "nosuch"], "unknown dataset"),
    ("detect-seed", ["detect", "--encoder", "{good_pt}", "--seed", "-1"], "--seed"),
    ("detect-device", ["detect", "--encoder", "{good_pt}", "--device", "banana"], "unknown device"),
    ("detect-home-is-a-file", ["detect", "--profile", "ci", "--encoder", "{good_pt}", "--data", "synth-gtsrb"],
     "DEFBENCH_HOME", "a_file"),
]


def _fill(args: list[str], world: dict) -> list[str]:
    return [a.format(**world) for a in args]


def _home(world: dict, which: str) -> Path:
    if which == "a_file_child":
        return Path(world["a_file"]) / "home"
    return Path(world[which])


def _snapshot(home: Path) -> dict[str, tuple]:
    if not home.is_dir():
        return {}
    return {str(p.relative_to(home)): (p.is_dir(), 0 if p.is_dir() else p.stat().st_size,
                                       0 if p.is_dir() else p.stat().st_mtime_ns)
            for p in home.rglob("*")}


def _changes(before: dict, after: dict) -> list[str]:
    changed = [k for k in after if before.get(k) != after[k]] + [k for k in before if k not in after]
    return [k for k in changed if k not in DB_FILES]


def check_refused(result_code: int, stdout: str, stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert result_code not in (0, None), f"accepted: {stdout[-500:]} {stderr[-500:]}"
    assert len(lines) == 1, f"stderr is not one line: {stderr!r}"
    assert "Traceback" not in stderr + stdout and "unexpected" not in lines[0], lines[0]
    assert lines[0].startswith("defbench: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert stdout == "", f"stdout: {stdout!r}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_before_anything_runs(case, world, monkeypatch):
    name, args, expected, *which = case
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    home = _home(world, which[0] if which else "home")
    monkeypatch.setenv("DEFBENCH_HOME", str(home))
    if not which:  # the shared home: the database may be created; everything else must stay as it is
        for db in DB_FILES:
            (home / db).unlink(missing_ok=True)
    Path(world["marker"]).unlink(missing_ok=True)  # each case answers for itself
    before = _snapshot(home)
    full = _fill(args, world)
    if full[0] in ("run", "grid", "report") and "ci" in full:  # were it accepted, it would stay small
        full = [full[0], *SETS, *full[1:]]  # (the case's own --set comes later and wins)
    with warnings.catch_warnings(record=True) as caught:  # what the console script would print to stderr too
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, full)
    shown = [w for w in caught if not issubclass(w.category, QUIET_BY_DEFAULT)]
    assert not shown, f"a warning adds lines to stderr: {shown[0].category.__name__}: {shown[0].message}"
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    check_refused(result.exit_code, result.stdout, result.stderr, expected)
    changes = _changes(before, _snapshot(home))
    assert not changes, f"written under DEFBENCH_HOME: {changes}"
    assert not Path(world["marker"]).exists(), "a data file ran code"
