"""The documentation checks itself: every built-in attack and defense has its parity page with a parity table
that says where each value came from; every relative link resolves; README stays short; the CLI reference is the
code's; the user guide names no issue numbers or dates.

Fast: reads the registries, the profiles and the markdown files, trains nothing.
"""
import dataclasses
import importlib.util
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


@pytest.mark.parametrize("kind,name", _cases())
def test_the_methods_index_links_every_parity_page(kind, name):
    assert f"]({name}.md)" in (METHODS_DIR / "README.md").read_text(encoding="utf-8"), \
        f"docs/methods/README.md does not list the {kind} {name!r}: add a row linking {name}.md"


def test_the_exempt_names_are_registered():
    registered = {("attack", n) for n in ATTACKS.names()} | {("defense", n) for n in DEFENSES.names()}
    assert NOT_METHODS <= registered, NOT_METHODS - registered


# ------------------------------------------------------------------ the user guide: links, length, CLI reference

ROOT = METHODS_DIR.parent.parent
GUIDE = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
# the results pages are generated from a committed snapshot of results rows (`defbench report publish`)
GENERATED = ROOT / "docs" / "results-tiny"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _links(page: Path) -> list[str]:
    """Relative link targets of ``page`` (code blocks skipped), without their #fragment."""
    text = FENCED.sub("", page.read_text(encoding="utf-8"))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t.split("#")[0] for t in targets if not re.match(r"^(https?:|mailto:|#)", t) and t.split("#")[0]]


@pytest.mark.parametrize("page", GUIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = [t for t in _links(page) if not (page.parent / t).exists()]
    generated = [t for t in broken if GENERATED in (page.parent / t).resolve().parents]
    hint = (f"; {GENERATED.relative_to(ROOT)}/ is generated: `defbench report publish --profile tiny -o "
            f"{GENERATED.relative_to(ROOT)}` renders it from its rows.csv" if generated else "")
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}{hint}"


def test_the_link_check_sees_links():
    assert "docs/getting-started.md" in _links(ROOT / "README.md")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines; keep it to 120 and move the rest into docs/"


@pytest.mark.parametrize("page", [p for p in GUIDE if GENERATED not in p.parents],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_name_no_issue_numbers_or_dates(page):
    """Users cannot see the project's issue tracker, and a date says when, not what: history stays in git."""
    text = page.read_text(encoding="utf-8")
    found = re.findall(r"\bissues? #?\d+|\b20\d\d-\d\d-\d\d\b", text, re.IGNORECASE)
    assert not found, f"{page.relative_to(ROOT)} names {found}"


def test_the_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == module.render(), "docs/cli.md is stale: run `python tools/cli_reference.py`"
    assert "## `defbench run`" in current and "## `defbench golden check`" in current  # sub-commands walked


# ------------------------------------------------------------------ where each setting came from

COLUMNS = ["setting", "reference", "paper", "tiny", "ci", "chosen from"]
PROFILES = ("paper", "tiny", "ci")
# where a value that differs from the reference may come from (docs/concepts.md, "Where a setting comes from")
SOURCES = ("reference", "scaling rule", "clean data", "own objective", "by design")
ATTACK_SOURCES = SOURCES + ("attacker's side",)  # an attack may be tuned on ASR: that is the attacker's side


def parity_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first table after the 'Parity table' heading; cells stripped of backticks."""
    body = re.split(r"^#{1,6}\s+Parity table\s*$", text, maxsplit=1, flags=re.MULTILINE)[1]
    lines = [line.strip() for line in body.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not re.match(r"^\|[\s:|-]+\|$", line):
            table.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))])
    return [re.sub(r"[`*]", "", cell).lower() for cell in table[0]], table[1:]


def differing_fields(kind: str, name: str) -> dict[str, dict[str, object]]:
    """field -> {profile: value} for each setting whose value is not the same at paper, tiny and ci."""
    from defbench.benchmark.pipeline.settings import load_profile
    values = {}
    for profile in PROFILES:
        prof = load_profile(profile)
        cfg = prof.attack_config(name) if kind == "attack" else prof.defense_config(name)
        values[profile] = dataclasses.asdict(cfg)
    return {field: {p: values[p][field] for p in PROFILES} for field in values["paper"]
            if len({repr(values[p][field]) for p in PROFILES}) > 1}


def source_problems(kind: str, text: str, differing: dict[str, dict[str, object]]) -> list[str]:
    """What is wrong with a parity page's 'chosen from' column, given the fields that differ between profiles."""
    header, rows = parity_table(text)
    if len(header) != len(COLUMNS) or not all(h.startswith(c) for h, c in zip(header, COLUMNS)):
        return [f"the parity table's columns must be {' | '.join(COLUMNS)}, got {header}"]
    problems = [f"row {row[0]!r} has {len(row)} cells" for row in rows if len(row) != len(COLUMNS)]
    problems += [f"row {row[0]!r} has an empty 'chosen from' cell (—: every profile keeps the reference)"
                 for row in rows if not row[-1]]
    allowed = tuple(s for s in (ATTACK_SOURCES if kind == "attack" else SOURCES) if s != "reference")
    for field, by_profile in differing.items():
        named = [row for row in rows if f"`{field}`" in row[0]]
        if not named:
            problems.append(f"{field} differs between profiles ({by_profile}) but no row names `{field}`")
        elif not named[0][-1].lower().startswith(allowed):
            problems.append(f"{field} differs between profiles ({by_profile}); its 'chosen from' cell "
                            f"{named[0][-1]!r} must start with one of: {', '.join(allowed)}")
    return problems


@pytest.mark.parametrize("kind,name", _cases())
def test_every_parity_table_says_where_each_value_came_from(kind, name):
    """A value a profile sets apart from the reference names its source in the 'chosen from' column."""
    page = METHODS_DIR / f"{name}.md"
    problems = source_problems(kind, page.read_text(encoding="utf-8"), differing_fields(kind, name))
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_a_value_without_a_source_is_caught():
    page = """## Parity table

| setting | reference | `paper` | `tiny` | `ci` | chosen from |
|---|---|---|---|---|---|
| `epochs` | 100 | 100 | 12 | 5 | scaling rule: the profile's time budget |
| `lr` | 0.01 | 0.01 | 0.001 | 0.001 | |
| `wd` | 5e-4 | 5e-4 | 5e-4 | 5e-4 | — |
"""
    differing = {"epochs": {"paper": 100, "tiny": 12}, "lr": {"paper": 0.01, "tiny": 0.001},
                 "batch_size": {"paper": 256, "tiny": 128}}
    problems = source_problems("defense", page, differing)
    assert any("`lr`" in p and "empty" in p for p in problems)  # no source at all
    assert any(p.startswith("lr differs") for p in problems)
    assert any(p.startswith("batch_size differs") and "no row" in p for p in problems)  # no row at all
    assert not any(p.startswith("epochs") for p in problems)
    assert source_problems("defense", page.replace("scaling rule", "reference"), {"epochs": {}})  # not a source
    assert source_problems("attack", page.replace("scaling rule", "attacker's side"), {"epochs": {}}) == \
        source_problems("attack", page, {"epochs": {}})  # an attack may be tuned on ASR
