"""The ``fedtrak`` command line.

One module per command group (:mod:`~fedtrak.simulations.cli.run`,
:mod:`~fedtrak.simulations.cli.evaluate`, :mod:`~fedtrak.simulations.cli.deploy`,
:mod:`~fedtrak.simulations.cli.bench`), each with ``add_arguments(command,
parser)`` and a dispatch table ``COMMANDS``. Only the group of the command
being run is imported, and heavy libraries only when a command runs, so
``fedtrak --help`` is quick. Bad input ends with one line, ``fedtrak: error:
...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from types import ModuleType

from fedtrak.errors import FedtrakError

#: Command -> (its group's module, its one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("run", "federated attribution on Flower's simulation engine (the main job)"),
    "attribute": ("run", "centralized TRAK attribution (the reference path)"),
    "train": ("run", "train checkpoints only"),
    "evaluate": ("evaluate", "LDS, owner-level LDS and mislabel detection of a run"),
    "report": ("evaluate", "a self-contained HTML page with figures of a run"),
    "attack": ("evaluate", "attacks of a curious server on a run's releases (inversion, membership)"),
    "sweep": ("evaluate", "attribution quality against epsilon, per mode (privacy/utility)"),
    "audit": ("evaluate", "canary audit: an empirical epsilon lower bound of the Gram release"),
    "certs": ("deploy", "TLS certificates for a SuperLink: a CA and a server certificate"),
    "keys": ("deploy", "a SuperNode's authentication key pair (Flower's format)"),
    "device": ("deploy", "a device owner's view: what it would send, what it kept"),
    "bench": ("bench", "benchmarks (run by hand)"),
}


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, ``(default X)``, where its text does not say it (a
    flag, an option without a default and an empty list say none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help, action.default
        if (text and not _SAYS_DEFAULT.search(text) and action.option_strings and action.nargs != 0
                and default not in (None, argparse.SUPPRESS, [], ())):
            return f"{text} (default {default})"
        return text


#: How an option's help says its default itself ("(default ...)", or a setting's "; here default ...").
_SAYS_DEFAULT = re.compile(r"\(default\b|here default\b")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``fedtrak: error: ...``; its help shows each
    option's default (:class:`DefaultsFormatter`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"fedtrak: error: {message} (see {self.prog} --help)\n")


def _group(command: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{COMMANDS[command][0]}")


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser, with the options of ``command`` (every command's if ``None``)."""
    top = OneLineParser(prog="fedtrak", description="fedtrak: privacy-aware federated training-data "
                                                     "attribution (TRAK on Flower)")
    sub = top.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            _group(name).add_arguments(name, p)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedtrak`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        return _group(args.command).COMMANDS[args.command](args) or 0
    except FedtrakError as exc:
        print(f"fedtrak: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtrak: interrupted", file=sys.stderr)
        return 130
