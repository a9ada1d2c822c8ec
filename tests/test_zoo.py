"""The checkpoint zoo: the shipped manifest's schema, the hash check of fetch, and verify on locally made files."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import TASK
from defbench.benchmark.pipeline import zoo
from defbench.benchmark.cli import main
from defbench.encoders import build_encoder, save_encoder
from defbench.encoders.checkpoints import file_sha256


def test_the_shipped_manifest_lists_public_encoders_with_their_sources():
    entries = zoo.load_manifest()
    assert len(entries) >= 8
    assert {e.kind for e in entries.values()} == {"backdoored", "clean"}
    for e in entries.values():
        assert e.source.startswith("https://") and e.paper and e.licence and e.url.startswith("https://")
        assert not e.sha256 or e.sha256_source  # a stated hash says who states it; the rest are unverified
    stl10 = entries["badencoder-cifar10-stl10"]
    assert (stl10.target, stl10.task, stl10.layout, stl10.image_size) == (9, "stl10", "badencoder", 32)
    assert entries["openai-clip-vit-b-32"].sha256 in entries["openai-clip-vit-b-32"].url  # OpenAI's own statement


@pytest.mark.parametrize("change, expected", [
    ({"sha256": "abc"}, "64 lowercase hex"),
    ({"kind": "evil"}, "kind must be one of"),
    ({"layout": "caffe"}, "layout must be one of"),
    ({"min_asr": None, "kind": "backdoored"}, "needs min_asr"),
    ({"trigger": "patch:10", "target": None}, "go together"),
    ({"surprise": 1}, "unknown fields surprise"),
])
def test_a_bad_manifest_entry_is_one_line(tmp_path, change, expected):
    entry = _entry(tmp_path, "x", "file:///nowhere", "")
    entry.update(change)
    path = _manifest(tmp_path, [{k: v for k, v in entry.items() if v is not None}])
    with pytest.raises(zoo.ZooError) as err:
        zoo.load_manifest(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def _entry(tmp_path, name: str, url: str, sha: str, **extra) -> dict:
    return {"name": name, "kind": "backdoored", "url": url, "file": "encoder.pt", "layout": "defbench",
            "arch": "ResNet-18 width 8", "image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "task": TASK, "paper": "a test", "licence": "none", "source": "https://example.org/readme",
            "sha256": sha, "sha256_source": "computed by this test" if sha else "", "target": 9,
            "trigger": "patch:10", "min_acc": 0.0, "min_asr": 0.0, **extra}


def _manifest(tmp_path, entries: list[dict]):
    lines = []
    for entry in entries:
        lines.append("[[encoder]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    path = tmp_path / "zoo.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def local_zoo(tmp_path, monkeypatch):
    """A manifest of locally made files: one whose hash it states, one with a wrong hash, one unreachable."""
    torch.manual_seed(0)
    made = tmp_path / "made.pt"
    save_encoder(build_encoder(width=8, channels_last=False), made)
    sha = file_sha256(made)
    path = _manifest(tmp_path, [
        _entry(tmp_path, "local", made.as_uri(), sha),
        _entry(tmp_path, "strict", made.as_uri(), sha, min_asr=100.5, min_acc=0.0),
        _entry(tmp_path, "tampered", made.as_uri(), "0" * 64),
        _entry(tmp_path, "remote", "https://example.org/encoder.pt", ""),
        _entry(tmp_path, "folder", "https://example.org/shared-folder", "", direct=False),
    ])
    monkeypatch.setenv("DEFBENCH_ZOO", str(path))
    return sha


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result, [line for line in result.output.splitlines() if line.strip()]


def test_fetch_checks_the_hash_and_says_in_one_line_what_it_cannot_do(local_zoo):
    result, lines = _cli("zoo", "fetch", "local")
    assert result.exit_code == 0 and local_zoo in lines[0] and "matches the manifest" in lines[0]
    assert zoo.get("local").path().is_file()
    for name, expected in (("tampered", "refused and deleted"), ("remote", "DEFBENCH_OFFLINE=1"),
                           ("folder", "shared folder"), ("nosuch", "no zoo entry")):
        result, lines = _cli("zoo", "fetch", name)
        assert result.exit_code != 0 and len(lines) == 1 and expected in lines[0], result.output
    assert not zoo.get("tampered").path().exists()
    result, lines = _cli("zoo", "verify", "remote")
    assert result.exit_code != 0 and "zoo fetch remote" in lines[0]


def test_verify_calls_a_checkpoint_live_only_when_acc_and_asr_pass(local_zoo):
    sets = ["--profile", "ci", "--device", "cpu", "--set", "evaluate.epochs=2", "--set", "evaluate.max_train=200",
            "--set", "evaluate.max_test=100"]
    for name in ("local", "strict"):
        assert _cli("zoo", "fetch", name)[0].exit_code == 0
    result, _ = _cli("zoo", "verify", "local", "--json", *sets)
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert row["live"] and row["target"] == 9 and 0 <= row["asr"] <= 100 and row["sha256"] == local_zoo
    result, _ = _cli("zoo", "verify", "strict", "--json", *sets)
    row = json.loads(result.output)
    assert not row["live"] and "ASR" in row["verdict"] and "< 100.5" in row["verdict"]
    suspect = zoo.suspect("local")  # what `grid --suspect zoo:local` adds as a row group
    assert (suspect.name, suspect.target, suspect.sha256) == ("local", 9, local_zoo)
    result, lines = _cli("zoo", "list")
    assert result.exit_code == 0 and len(lines) == 5 and "sha256 stated" in lines[0]
