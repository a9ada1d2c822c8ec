"""Package discovery (the rest of the metadata is in pyproject.toml).

The packages live in top-level folders (the project card's layout: ``core/``, ``encoders/``, ``attacks/``,
``defenses/``, ``benchmark/``, ``reports/``) and are imported as ``defbench.core``, ``defbench.encoders``, ... so
that installing defbench never shadows generic top-level names such as ``benchmark``. Every top-level folder with
an ``__init__.py`` is a package, and so is every folder below it with one: a new subpackage ships in the wheel
and shows in an editable install without editing this file (``tests/test_packaging.py`` checks that no folder of
modules lacks its ``__init__.py``).
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
TOP_LEVEL = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def discovered() -> dict[str, str]:
    """``defbench.<folder>[.<sub>...]`` -> its folder, for every package under the top-level folders."""
    found = find_packages(where=str(ROOT), include=[*TOP_LEVEL, *(f"{top}.*" for top in TOP_LEVEL)])
    return {f"defbench.{name}": name.replace(".", "/") for name in found}


if __name__ == "__main__":
    packages = discovered()
    setup(packages=sorted(packages), package_dir={name: packages[name] for name in packages if name.count(".") == 1})
