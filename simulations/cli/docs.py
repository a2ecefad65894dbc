"""``docs/cli.md``, generated from the command line's own parser.

``python -m fedtrak.simulations.cli.docs docs/cli.md`` writes it; a test fails
when the file in the repository differs from what the parser says now.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from fedtrak.simulations.cli import COMMANDS, parser

#: Help is wrapped at this width, whatever the terminal.
WIDTH = 100

HEADER = """# Command line

Every `fedtrak` command and its options, as `fedtrak COMMAND --help` prints them. This page is
generated from the parser (`python -m fedtrak.simulations.cli.docs docs/cli.md`); a test fails when
it is out of date.

| command | what it does |
|---|---|
"""


def _subcommands(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in p._actions:  # argparse keeps its subparsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _sections(p: argparse.ArgumentParser, name: str, level: int) -> Iterator[str]:
    yield f"{'#' * level} `{name}`\n\n```text\n{p.format_help().rstrip()}\n```\n"
    for sub_name, sub in _subcommands(p):
        yield from _sections(sub, f"{name} {sub_name}", level + 1)


def cli_markdown() -> str:
    """The Markdown of every command's help."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        top = parser()
        rows = "".join(f"| [`{name}`](#fedtrak-{name}) | {help_text} |\n" for name, (_, help_text) in COMMANDS.items())
        body = [section for name, sub in _subcommands(top) for section in _sections(sub, f"fedtrak {name}", 2)]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return HEADER + rows + "\n" + "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    """Write the page to the path given (standard output without one)."""
    argv = sys.argv[1:] if argv is None else argv
    text = cli_markdown()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
