"""The code's shape: no import cycles, arrows that point one way, and a harness that reaches components only
through the registries. (`pytest tests/test_architecture.py` is the command that shows "no cycles".)"""
import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "defbench.core", "encoders": "defbench.encoders", "attacks": "defbench.attacks",
            "defenses": "defbench.defenses", "benchmark": "defbench.benchmark", "reports": "defbench.reports"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            out[name] = path
    return out


MODULES = _modules()


def _top_level_imports(name: str, path: Path) -> set[str]:
    """Project modules imported at module level (imports inside functions run late and cannot cycle)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES}


GRAPH = {name: _top_level_imports(name, path) for name, path in MODULES.items()}


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if dep == node or (node.startswith(dep + ".") and MODULES[dep].name == "__init__.py"):
                continue  # a module importing its own package's __init__ is how packages load, not a cycle
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("layer, forbidden", [
    ("defbench.core", ("defbench.encoders", "defbench.attacks", "defbench.defenses", "defbench.benchmark",
                       "defbench.reports")),
    ("defbench.encoders", ("defbench.attacks", "defbench.defenses", "defbench.benchmark", "defbench.reports")),
    ("defbench.defenses", ("defbench.attacks", "defbench.benchmark", "defbench.reports")),
    ("defbench.attacks", ("defbench.benchmark", "defbench.reports")),
    ("defbench.reports", ("defbench.benchmark", "defbench.attacks", "defbench.defenses", "defbench.encoders")),
])
def test_arrows_point_one_way(layer, forbidden):
    for module, deps in GRAPH.items():
        if module == layer or module.startswith(layer + "."):
            bad = sorted(d for d in deps if d.startswith(forbidden))
            assert not bad, f"{module} imports {bad}"


def test_the_harness_reaches_components_only_through_registries():
    for module, path in MODULES.items():
        if not module.startswith("defbench.benchmark"):
            continue
        text = path.read_text()
        for internal in ("MIMICConfig", "estimate_stage_mi", "invert_trigger", "DecreeConfig", '"mi_'):
            assert internal not in text, f"{module} reaches into a defense: {internal}"
        for deep in ("defbench.defenses.", "..defenses.", "...defenses."):
            assert f"from {deep}" not in text.replace("from ...defenses import", ""), module


def test_the_old_second_executor_is_gone():
    assert importlib.util.find_spec("defbench.benchmark.runner") is None
    assert not (ROOT / "benchmark" / "runner.py").exists()
