"""The documentation checks itself: every built-in attack and defense has its parity page with a parity table
that says where each value came from and a reference-trace section that agrees with the recorded traces
(tests/reference/*.json, one layout); every relative link resolves; README stays short; the CLI reference is the
code's; the user guide names no issue numbers or dates.

Fast: reads the registries, the profiles and the markdown files, trains nothing.
"""
import dataclasses
import importlib.util
import json
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


# ------------------------------------------------------------------ the reference trace of each method

REFERENCE = ROOT / "tests" / "reference"
TRACES = sorted(REFERENCE.glob("*.json"))
# every part of a method has one of these statuses; on its page a one-line paragraph, the label, opens the list of
# the parts that have it (docs/methods/README.md, "Reference trace")
TRACE_LABELS = {"Trace-tested": "trace-tested", "Different by design": "different by design",
                "Not traceable (no public code)": "not traceable"}
TRACE_LINK = re.compile(r"\]\((?:\.\./)+tests/reference/([\w.-]+\.json)\)")
REPO_AT = re.compile(r"\b([\w.-]+/[\w.-]+)@([0-9a-f]{7,40})\b")
SPELLING = {"λ": "lambda", "β": "beta", "−": "-", "×": "x", "`": "", "*": ""}


def trace_section(text: str) -> str | None:
    """The body of a page's '## Reference trace' section (up to the next '## ' heading), or None."""
    parts = re.split(r"^##\s+Reference trace\s*$", text, maxsplit=1, flags=re.MULTILINE)
    return re.split(r"^##\s", parts[1], maxsplit=1, flags=re.MULTILINE)[0] if len(parts) == 2 else None


def trace_groups(section: str) -> dict[str, list[str]]:
    """label -> its parts: a one-line paragraph ending in ':' labels the bullet list that follows it (a bullet's
    continuation lines joined to it); a list with no label is listed under ''."""
    groups, label = {}, ""
    for paragraph in re.split(r"\n\s*\n", section.strip()):
        lines = paragraph.strip().splitlines()
        if len(lines) == 1 and lines[0].endswith(":") and not lines[0].startswith("- "):
            label = lines[0][:-1].strip()
            groups.setdefault(label, [])
        elif lines[0].startswith("- "):
            bullets = groups.setdefault(label, [])
            for line in lines:
                if line.startswith("- "):
                    bullets.append(line[2:])
                else:
                    bullets[-1] += " " + line.strip()
        else:
            label = ""  # prose ends a label's list
    return groups


def spelled(text: str) -> str:
    """``text`` lower-cased, in plain spelling (λ = lambda, no backticks), spaces collapsed: how parts are matched."""
    for symbol, plain in SPELLING.items():
        text = text.replace(symbol, plain)
    return re.sub(r"\s+", " ", text).strip().lower()


def part_name(part: str) -> str:
    """A trace part's name, which its bullet on the page starts with: its text up to the first ':', ',', '(' or '—'."""
    return re.split(r"[:,(—]", spelled(part), maxsplit=1)[0].strip()


def load_traces() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in TRACES}


def layout_problems(trace: dict) -> list[str]:
    """What departs from the one layout of a trace: ``reference: {repository, commit}``, ``changes``, ``parts``."""
    ref = trace.get("reference")
    problems = [f"a top-level {key!r}: it belongs in 'reference' (repository, commit) or is called 'changes'"
                for key in ("repository", "commit", "changed") if key in trace]
    if not isinstance(ref, dict) or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(ref.get("repository"))) \
            or not re.fullmatch(r"[0-9a-f]{40}", str(ref.get("commit"))):
        problems.append(f"'reference' must be {{'repository': 'owner/name', 'commit': <40 hex digits>}}, got {ref!r}")
    if not trace.get("changes") or not all(isinstance(c, str) for c in trace["changes"]):
        problems.append("'changes' must list what was changed to run the authors' code (one string each)")
    if not trace.get("parts"):
        problems.append("'parts' must list the method's parts, each {'part', 'status', 'why'}")
    problems += [f"part {p.get('part')!r}: status {p.get('status')!r} is not one of {sorted(TRACE_LABELS.values())}"
                 for p in trace.get("parts", []) if p.get("status") not in TRACE_LABELS.values()]
    return problems


def trace_problems(name: str, text: str, traces: dict[str, dict]) -> list[str]:
    """What is wrong with a parity page's 'Reference trace' section, given every trace (file name -> JSON)."""
    section = trace_section(text)
    if section is None:
        return ["no '## Reference trace' section: list each part of the method under 'Trace-tested:', "
                "'Different by design:' or 'Not traceable (no public code):'"]
    groups = trace_groups(section)
    problems = [f"the label {label!r} is not a status: use one of {', '.join(TRACE_LABELS)}"
                for label in groups if label not in TRACE_LABELS]
    problems += [] if any(groups.values()) else ["the section lists no part"]
    linked = TRACE_LINK.findall(section)
    problems += [f"links {f}, which is not a trace in tests/reference" for f in linked if f not in traces]
    linked = [f for f in linked if f in traces]
    own = [f for f, trace in traces.items() if trace["method"] == name]
    problems += [f"does not link its trace tests/reference/{f}" for f in own if f not in linked]
    problems += commit_problems(section, {f: traces[f] for f in linked})
    for f in own:
        for part in traces[f]["parts"]:
            label = next((k for k, v in TRACE_LABELS.items() if v == part["status"]), part["status"])
            if not any(spelled(b).startswith(part_name(part["part"])) for b in groups.get(label, [])):
                problems.append(f"{f}'s part {part['part']!r} is {part['status']}: list it under '{label}:' "
                                f"starting with {part_name(part['part'])!r}")
    tested = {part_name(p["part"]) for f in linked for p in traces[f]["parts"] if p["status"] == "trace-tested"}
    problems += [f"'{b[:60]}' is listed as trace-tested but no linked trace records a trace-tested part it starts with"
                 for b in groups.get("Trace-tested", []) if not any(spelled(b).startswith(n) for n in tested)]
    return problems


def commit_problems(section: str, linked: dict[str, dict]) -> list[str]:
    """Each linked trace's repository is named with the commit it was recorded at (``owner/name@<hash>``), and no
    other commit of that repository is named."""
    named = REPO_AT.findall(section)
    problems = []
    for f, trace in linked.items():
        repo, commit = trace["reference"]["repository"], trace["reference"]["commit"]
        mine = [h for r, h in named if r == repo]
        if not any(commit.startswith(h) for h in mine):
            problems.append(f"does not name {repo}@{commit[:7]}, where {f} was recorded")
        problems += [f"names {repo}@{h}, but {f} was recorded at {commit[:7]}"
                     for h in mine if not commit.startswith(h)]
    return problems


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
def test_every_trace_has_the_common_layout(path):
    trace = json.loads(path.read_text(encoding="utf-8"))
    problems = layout_problems(trace)
    if not (METHODS_DIR / f"{trace.get('method')}.md").is_file():
        problems.append(f"'method' {trace.get('method')!r} names no page in docs/methods")
    assert not problems, f"tests/reference/{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("kind,name", _cases())
def test_every_parity_page_says_how_each_part_was_traced(kind, name):
    """The page's 'Reference trace' section gives each part one status, names the commit of each trace it links and
    lists every part its own traces record, under the status they record."""
    page = METHODS_DIR / f"{name}.md"
    problems = trace_problems(name, page.read_text(encoding="utf-8"), load_traces())
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_a_page_that_disagrees_with_its_trace_is_caught():
    trace = {"method": "m", "reference": {"repository": "a/b", "commit": "0123456" + "0" * 33},
             "changes": ["device: CPU"],
             "parts": [{"part": "λ schedule: raise and lowering", "status": "trace-tested", "why": ""},
                       {"part": "loss (labels)", "status": "different by design", "why": "no labels"}]}
    page = """## Reference trace

Trace-tested against a/b@0123456 ([`m.json`](../../tests/reference/m.json)).

Trace-tested:

- lambda schedule: every branch

Different by design:

- loss: NT-Xent, the reference's
  cross-entropy needs labels

## Deviations
"""
    traces = {"m.json": trace}
    assert trace_problems("m", page, traces) == [] and layout_problems(trace) == []

    def problem(text: str, traces: dict = traces) -> str:
        return " | ".join(trace_problems("m", text, traces))

    assert "names a/b@0123457, but m.json was recorded at 0123456" in problem(page.replace("@0123456", "@0123457"))
    assert "'Not applicable' is not a status" in problem(page.replace("Different by design:", "Not applicable:"))
    assert "part 'loss (labels)'" in problem(page.replace("- loss:", "- objective:"))  # a part missing
    assert "part 'loss (labels)'" in problem(page.replace("Different by design:", "Not traceable (no public code):"))
    assert "'pruning rule' is listed as trace-tested" in problem(page.replace("branch", "branch\n- pruning rule"))
    assert "no '## Reference trace' section" in problem(page.replace("## Reference trace", "## Trace"))
    assert "does not link its trace tests/reference/m.json" in \
        problem(page.replace("m.json", "n.json"), {**traces, "n.json": {**trace, "method": "n"}})
    assert "not one of" in " ".join(layout_problems({**trace, "parts": [{"part": "x", "status": "not applicable"}]}))
    assert "top-level 'repository'" in " ".join(
        layout_problems({k: v for k, v in trace.items() if k != "reference"} | {"repository": "a/b"}))
