"""Every code block of README.md, CONTRIBUTING.md and docs/ marked runnable is run, so an import path or a flag
cannot rot unnoticed.

A block is runnable when the line just before its opening fence is ``<!-- runnable -->``:

- a ``python`` block runs as a script in a fresh interpreter (its registrations stay out of this test session),
  with a fresh ``DEFBENCH_HOME``, and must exit 0;
- a ``bash`` block runs each command line (comments and blank lines skipped) through the ``defbench`` command
  group in this process, with a fresh ``DEFBENCH_HOME``; a line must ask for ``--help``, run at ``--profile ci``
  or be ``defbench list`` (seconds, not minutes), and must exit 0.

Fast by construction: a handful of interpreters and ``--help`` texts.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w+)?\s*$")
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]


def runnable_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, line number of the fence, code) of each block marked runnable in ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        opening = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert opening, f"{path.name}:{i + 1}: {MARKER} must be followed directly by a ``` fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append((opening.group(1) or "", i + 2, "\n".join(lines[i + 2:end])))
    return blocks


def _cases():
    for page in PAGES:
        for language, line, code in runnable_blocks(page):
            yield pytest.param(language, code, id=f"{page.relative_to(ROOT)}:{line}")


CASES = list(_cases())


def test_the_guide_has_runnable_blocks_in_each_kind():
    languages = {case.values[0] for case in CASES}
    assert {"python", "bash"} <= languages, f"runnable blocks found: {languages}"


@pytest.mark.parametrize("language,code", CASES)
def test_runnable_block(language, code, tmp_path, monkeypatch):
    assert language in ("python", "bash"), f"a runnable block is python or bash, not {language!r}"
    if language == "python":
        run_python(code, tmp_path)
    else:
        monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path / "home"))
        for command in shell_commands(code):
            run_defbench(command)


def run_python(code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "DEFBENCH_HOME": str(tmp_path / "home"), "DEFBENCH_PROGRESS": "0"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"the snippet failed:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"


def shell_commands(code: str) -> list[list[str]]:
    """Each command line of a bash block as argv (without ``defbench``); each must be cheap (:func:`cheap`)."""
    commands = []
    for line in code.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line)
        assert argv[0] == "defbench", f"a runnable bash line runs defbench, got: {line}"
        assert cheap(argv[1:]), f"a runnable line asks for --help, runs at --profile ci or lists: {line}"
        commands.append(argv[1:])
    return commands


def cheap(args: list[str]) -> bool:
    """--help, the ci profile, or `list` (reads the registries): what a test may run in seconds."""
    profile = next((b for a, b in zip(args, args[1:]) if a == "--profile"), None)
    profile = profile or next((a.split("=", 1)[1] for a in args if a.startswith("--profile=")), None)
    return "--help" in args or profile == "ci" or args[:1] == ["list"]


def run_defbench(args: list[str]) -> None:
    from defbench.benchmark.commands import main
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, f"`defbench {' '.join(args)}` exited {result.exit_code}:\n{result.output[-3000:]}"
