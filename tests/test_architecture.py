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


def _imports(name: str, path: Path, anywhere: bool = False) -> set[str]:
    """Project modules imported at module level (imports inside functions run late and cannot cycle), or with
    ``anywhere`` also inside functions (a late import is still an arrow between packages)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in (ast.walk(tree) if anywhere else tree.body):
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


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


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


# Every package and the packages it may import (its own subpackages aside). The arrows point one way, from the
# command line down to core: a package placed here may use only what is listed for it, and a new package must be
# placed (test_every_package_has_a_layer), so the package graph stays a DAG.
LAYERS = {
    "defbench.core": (),
    "defbench.encoders": ("defbench.core",),
    "defbench.defenses": ("defbench.core", "defbench.encoders"),
    "defbench.attacks": ("defbench.core", "defbench.encoders", "defbench.defenses"),  # adaptive: MIMIC's MINE
    "defbench.reports": ("defbench.core",),  # reads results rows only
    "defbench.benchmark.datasets": ("defbench.core", "defbench.encoders"),
    "defbench.benchmark.pipeline": ("defbench.core", "defbench.encoders", "defbench.attacks", "defbench.defenses",
                                    "defbench.benchmark.datasets"),
    "defbench.benchmark.analysis": ("defbench.core", "defbench.encoders", "defbench.attacks", "defbench.defenses",
                                    "defbench.reports", "defbench.benchmark.datasets", "defbench.benchmark.pipeline"),
    "defbench.benchmark.commands": ("defbench.core", "defbench.encoders", "defbench.attacks", "defbench.defenses",
                                    "defbench.reports", "defbench.benchmark.datasets", "defbench.benchmark.pipeline",
                                    "defbench.benchmark.analysis"),
    "defbench.benchmark": ("defbench.benchmark.commands",),  # cli.py: the console script, imported by nothing
}


def _package_of(module: str) -> str:
    """The package a module belongs to: itself for a package's ``__init__``, else its parent."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


PACKAGE_GRAPH: dict[str, set[str]] = {}
for _name, _path in MODULES.items():
    PACKAGE_GRAPH.setdefault(_package_of(_name), set()).update(
        _package_of(dep) for dep in _imports(_name, _path, anywhere=True) if _package_of(dep) != _package_of(_name))


def test_every_package_has_a_layer():
    assert set(PACKAGE_GRAPH) == set(LAYERS), "place the new package in LAYERS (and say what it may import)"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_arrows_point_one_way(package):
    bad = sorted(PACKAGE_GRAPH.get(package, set()) - set(LAYERS[package]))
    culprits = [f"{m} imports {sorted(d for d in _imports(m, MODULES[m], anywhere=True) if _package_of(d) in bad)}"
                for m in sorted(MODULES) if _package_of(m) == package and any(
                    _package_of(d) in bad for d in _imports(m, MODULES[m], anywhere=True))]
    assert not bad, f"{package} may not import {bad}: " + "; ".join(culprits)


def test_the_package_graph_is_a_dag():
    """Packages, not modules: the allowed arrows themselves have no loop (a package high up, such as the command
    line, can never be imported by one it uses), and nothing imports the command line's package."""
    order: list[str] = []
    todo = dict(LAYERS)
    while todo:
        ready = [p for p, deps in todo.items() if set(deps) <= set(order)]
        assert ready, f"the layers form a loop among {sorted(todo)}"
        order += sorted(ready)
        for p in ready:
            del todo[p]
    assert not [p for p, deps in PACKAGE_GRAPH.items() if "defbench.benchmark" in deps]


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
