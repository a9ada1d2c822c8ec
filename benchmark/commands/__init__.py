"""The ``defbench`` command line: one module per subcommand, all sharing ``common``."""
from __future__ import annotations

import click

from .config import config
from .defend import defend
from .detect import detect
from .evaluate import evaluate
from .golden import golden
from .grid import grid
from .listing import list_
from .report import report
from .run import run
from .table import table


@click.group()
@click.version_option(package_name="defbench")
def main():
    """defbench: backdoor defenses for self-supervised image encoders, compared on one footing."""


for _command in (run, grid, table, report, golden, config, defend, evaluate, detect, list_):
    main.add_command(_command)

__all__ = ["main"]
