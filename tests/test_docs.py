"""Every built-in attack and defense has its parity page, docs/methods/<name>.md, with a parity table.

Fast: reads the registries and the markdown files, trains nothing.
"""
import re
from pathlib import Path

import pytest

from defbench.attacks import ATTACKS
from defbench.defenses import DEFENSES

METHODS_DIR = Path(__file__).resolve().parent.parent / "docs" / "methods"

# Registered names that are not methods, so have no reference to be at parity with.
NOT_METHODS = {("defense", "none")}  # the undefended baseline: returns the suspect unchanged


def _builtin(registry, package: str) -> list[str]:
    # plugins (entry points, $DEFBENCH_PLUGINS, the ones tests register) document themselves elsewhere
    return [name for name in registry.names() if registry.get(name).module.startswith(f"defbench.{package}.")]


def _cases():
    cases = [("attack", n) for n in _builtin(ATTACKS, "attacks")] + \
            [("defense", n) for n in _builtin(DEFENSES, "defenses")]
    return [pytest.param(kind, name, id=f"{kind}:{name}") for kind, name in cases if (kind, name) not in NOT_METHODS]


def test_the_registries_hold_the_table_i_methods():
    assert {"badencoder", "bassl", "ctrl", "drupe"} <= set(_builtin(ATTACKS, "attacks"))
    assert {"ft", "fp", "nad", "anp", "moth", "decree", "medic", "mimic"} <= set(_builtin(DEFENSES, "defenses"))


@pytest.mark.parametrize("kind,name", _cases())
def test_every_registered_method_has_a_parity_page_with_a_parity_table(kind, name):
    page = METHODS_DIR / f"{name}.md"
    assert page.is_file(), f"{kind} {name!r} is registered but docs/methods/{name}.md does not exist"
    text = page.read_text(encoding="utf-8")
    assert re.search(r"^#{1,6}\s+Parity table\s*$", text, re.MULTILINE), f"{page.name}: no 'Parity table' heading"
    table_rows = [line for line in text.splitlines() if re.match(r"^\|.*\|.*\|\s*$", line.strip())
                  and not re.match(r"^\|[\s:|-]+\|$", line.strip())]
    assert len(table_rows) >= 2, f"{page.name}: no markdown table row (a header and at least one row)"


def test_the_exempt_names_are_registered():
    registered = {("attack", n) for n in ATTACKS.names()} | {("defense", n) for n in DEFENSES.names()}
    assert NOT_METHODS <= registered, NOT_METHODS - registered
