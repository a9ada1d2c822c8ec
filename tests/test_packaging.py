"""The distribution ships every package: setup.py discovers them, and no folder of modules lacks its __init__.py
(a folder without one would be left out of the wheel without a word)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("defbench_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the setup() call is under `if __name__ == "__main__"`
    return module


def test_every_folder_of_modules_is_a_discovered_package():
    setup = _setup_module()
    assert setup.TOP_LEVEL == ["attacks", "benchmark", "core", "defenses", "encoders", "reports"]
    discovered = setup.discovered()
    folders = {p.parent.relative_to(ROOT) for top in setup.TOP_LEVEL for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts}
    expected = {"defbench." + ".".join(folder.parts): folder.as_posix() for folder in folders}
    assert discovered == expected, "a folder of modules without __init__.py would be left out of the wheel"


def test_discovered_packages_are_the_importable_ones():
    for name, folder in _setup_module().discovered().items():
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin).resolve() == ROOT / folder / "__init__.py", name
