"""The ``defbench`` command line: one module per subcommand, all sharing ``common``."""
from __future__ import annotations

import errno
import os
import sys
import warnings

import click

from .check_data import check_data
from .clean import clean
from .common import fail
from .config import config
from .defend import defend
from .demo import demo
from .detect import detect
from .evaluate import evaluate
from .golden import golden
from .grid import grid
from .listing import list_
from .report import report
from .run import run
from .table import table
from .zoo import zoo


# library warnings that tell a defbench user nothing (and would add lines to a one-line error)
QUIET_WARNINGS = [
    r"Detected pickle protocol \d+ in the checkpoint",  # torch.load(weights_only=True) on a file it then refuses
]


class OneLineErrors(click.Group):
    """A group whose usage errors (an unknown option, ``--workers 0``, a bad choice) are one line on stderr,
    like every other error of the command line, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with warnings.catch_warnings():
                for message in QUIET_WARNINGS:
                    warnings.filterwarnings("ignore", message=message)
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # `defbench` alone: the help text
            err.show()
            sys.exit(err.exit_code)
        except click.ClickException as err:
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            click.echo(f"defbench: error: {' '.join(err.format_message().split())}{hint}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            fail("aborted")
        except OSError as err:
            if err.errno != errno.EPIPE:  # `defbench table | head`: the reader left, nothing to say
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors)
@click.version_option(package_name="defbench")
def main():
    """defbench: backdoor defenses for self-supervised image encoders, compared on one footing."""


for _command in (demo, run, grid, table, report, golden, config, defend, evaluate, detect, check_data, clean, list_,
                 zoo):
    main.add_command(_command)

__all__ = ["main"]
