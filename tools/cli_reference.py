"""Write ``docs/cli.md``, the command-line reference, from the click commands themselves.

Every command and sub-command of ``defbench`` is walked through click's own introspection (``list_commands``,
``get_command``, ``get_help``), so the page says what the code accepts whatever the modules behind the commands
look like. ``tests/test_docs.py`` fails when the page differs from what this script writes.

    python tools/cli_reference.py            # rewrite docs/cli.md
    python tools/cli_reference.py --check    # exit 1 if docs/cli.md is stale
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = 100  # fixed, so the page does not depend on the terminal that wrote it
HEADER = """# Command-line reference

Generated from the commands' own `--help` by `python tools/cli_reference.py`; do not edit by hand
(`tests/test_docs.py` fails when this page and the code disagree). The same text is one `--help` away:
`defbench COMMAND --help`.
"""


def walk(command: click.Command, ctx: click.Context):
    """(context, command) for ``command`` and every sub-command below it, in the order ``--help`` lists them."""
    yield ctx, command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, click.Context(sub, info_name=name, parent=ctx, terminal_width=WIDTH,
                                                   max_content_width=WIDTH))


def render(group: click.Command | None = None) -> str:
    """The whole page: one section per command, its help text verbatim."""
    if group is None:
        from defbench.benchmark.commands import main as group
    root = click.Context(group, info_name="defbench", terminal_width=WIDTH, max_content_width=WIDTH)
    sections = [HEADER]
    for ctx, command in walk(group, root):
        sections.append(f"## `{ctx.command_path}`\n\n```text\n{command.get_help(ctx).rstrip()}\n```\n")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
        if current != text:
            print(f"{PAGE} is stale: run `python tools/cli_reference.py`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
