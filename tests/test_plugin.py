"""An external defense package, installed with pip, works end to end through the `defbench.defenses` entry point.

The example package is built from a copy and installed into a temporary
target folder (no network, no build isolation) that only the subprocesses
see on their PYTHONPATH: the test venv and other tests never see the plugin,
and removing the folder uninstalls it.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from defbench.defenses import DEFENSES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "defbench-plugin-example"
NAME = "reinit-distil"
# the micro cell of tests/test_grid.py, plus the plugin's own settings through --set
MICRO = ["encoder.width=8", "encoder.channels_last=false", "pretrain.epochs=1", "pretrain.max_images=256",
         "pretrain.batch_size=64", "attack.badencoder.epochs=1", "attack.badencoder.shadow_images=128",
         "attack.badencoder.batch_size=64", "clean.max_images=128", "evaluate.epochs=2",
         "evaluate.max_train=300", "evaluate.max_test=200",
         f"defense.{NAME}.epochs=1", f"defense.{NAME}.batch_size=64"]
CELL = ["--profile", "ci", "--attack", "badencoder", "--defense", NAME, "--pretrain", "synth-cifar10",
        "--downstream", "synth-stl10"]


def _sets(items):
    return [x for s in items for x in ("--set", s)]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """Environment for subprocesses that see the installed plugin; the finalizer uninstalls it."""
    root = tmp_path_factory.mktemp("plugin")
    source, site = root / "source", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site),
                           str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(site.glob("defbench_plugin_example-*.dist-info/entry_points.txt"))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "DEFBENCH_HOME": str(root / "home"), "DEFBENCH_PROGRESS": "0"}
    yield env
    shutil.rmtree(site)  # the uninstall: nothing was written outside the temporary folder


def _cli(env, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "defbench.benchmark.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cell(plugin):
    proc = _cli(plugin, "run", *CELL, "--json", *_sets(MICRO))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_the_test_process_itself_never_sees_the_plugin(plugin):
    assert NAME not in DEFENSES.names()


def test_plugin_is_listed_with_its_settings(plugin):
    listed = _cli(plugin, "list", "defenses")
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith(NAME) and "re-initialise" in line for line in listed.stdout.splitlines())
    settings = _cli(plugin, "list", "settings").stdout.splitlines()
    assert f"defense.{NAME}.epochs" in settings and f"defense.{NAME}.lambda_contrastive" in settings


def test_run_uses_the_plugin_with_set_overrides(plugin, cell):
    (row,) = cell["results"]
    assert row["defense"] == NAME and not cell["failed"]
    assert row["acc"] is not None and row["asr"] is not None and row["defense_seconds"] > 0
    home = Path(plugin["DEFBENCH_HOME"])
    (meta,) = [json.loads(p.read_text()) for p in home.glob("artifacts/defend/*/*/meta.json")]
    assert meta["name"] == NAME
    assert meta["spec"]["config"]["epochs"] == 1 and meta["spec"]["config"]["batch_size"] == 64  # --set reached it
    assert meta["spec"]["config"]["stages"] == 1  # the plugin's own default
    assert meta["records"]["reinitialised_layers"] > 0 and len(meta["records"]["distil_loss"]) == 1


def test_a_misspelt_setting_gets_the_nearest_key(plugin):
    proc = _cli(plugin, "run", *CELL, *_sets(MICRO), "--set", f"defense.{NAME}.epoch=1")
    assert proc.returncode == 2
    assert f"unknown setting 'defense.{NAME}.epoch'" in proc.stderr
    assert f"did you mean defense.{NAME}.epochs" in proc.stderr and "Traceback" not in proc.stderr


def test_plugin_is_a_column_of_table1(plugin, cell):
    csv = _cli(plugin, "table", "table1", "--profile", "ci", "--format", "csv", *_sets(MICRO))
    assert csv.returncode == 0, csv.stderr
    header = csv.stdout.splitlines()[0].split(",")
    assert f"{NAME}_acc" in header and f"{NAME}_asr" in header
    md = _cli(plugin, "table", "table1", "--profile", "ci", *_sets(MICRO))
    assert md.returncode == 0 and f"{NAME} ACC" in md.stdout and "badencoder" in md.stdout


def test_plugin_resets_only_the_last_stage_and_distils(plugin):
    """The defense itself, in a subprocess that sees the plugin: layer4 is re-learnt, layer1-3 are kept."""
    script = textwrap.dedent("""
        import json, torch
        from defbench.defenses import CleanData, get_defense
        from defbench.encoders import RunContext, build_encoder
        torch.manual_seed(0)
        suspect = build_encoder(width=8).eval()
        comp = get_defense("reinit-distil")
        cfg = comp.make_config("ci", {"epochs": 2, "batch_size": 32})
        images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
        ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)
        out = comp.fn(suspect.clone(), CleanData(images), cfg, ctx)
        same = {n: torch.equal(p, dict(suspect.backbone.named_parameters())[n])
                for n, p in out.backbone.named_parameters()}
        print(json.dumps({"early_kept": all(v for n, v in same.items() if not n.startswith("layer4")),
                          "layer4_changed": not any(v for n, v in same.items() if n.startswith("layer4")),
                          "records": {k: v for k, v in ctx.records.items()}, "training": out.training}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=plugin, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["early_kept"] and result["layer4_changed"] and not result["training"]
    assert result["records"]["reinitialised_layers"] == 10  # 2 blocks x (2 conv + 2 BN) + downsample conv + BN
    assert len(result["records"]["distil_loss"]) == 2 and 0 < result["records"]["clean_cosine_to_suspect"] <= 1
