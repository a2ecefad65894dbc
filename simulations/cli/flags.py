"""Command-line options derived from the settings model, and the option types every command shares.

A settings field becomes the option ``--KEY`` (its flat key), with the
field's type, choices, bounds, help and default; its value lands in
``args.<field name>``. :func:`settings_from` turns the parsed options back
into :class:`~fedtrak.config.settings.Settings`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedtrak.config.flat import Spec
from fedtrak.config.settings import Settings
from fedtrak.errors import FedtrakError


def _converter(spec: Spec) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = spec.parse(text)
            if spec.choices is None:  # argparse itself refuses an invalid choice, listing them
                spec.check(value)
        except FedtrakError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    convert.__name__ = spec.kind
    return convert


def _help(spec: Spec, default: Any) -> str:
    if spec.kind == "bool":
        return spec.help
    shown = default if default is not None else None
    if isinstance(shown, tuple):
        shown = ",".join(map(str, shown))
    if shown is not None and "default" in spec.help and f"default {shown}" not in spec.help:  # the command's own
        return f"{spec.help}; here default {shown}"
    return spec.help if shown is None or "default" in spec.help else f"{spec.help} (default {shown})"


def add_settings(parser: argparse.ArgumentParser | argparse._ArgumentGroup, keys: Iterable[str],
                 defaults: Mapping[str, Any] | None = None, specs: Mapping[str, Spec] | None = None) -> None:
    """Add the options of the settings ``keys`` (flat keys), with ``defaults`` overriding the
    settings' own where a command has its own; ``specs``: another settings model's fields (a
    device's node settings) instead of the run's."""
    specs = specs or Settings.specs()
    defaults = defaults or {}
    for key in keys:
        spec = specs[key]
        default = defaults.get(key, spec.default)
        if spec.kind == "bool":  # an optional one (None: decided by a rule) also gets --no-KEY
            parser.add_argument(f"--{key}", dest=spec.name, default=default, help=_help(spec, default),
                                action=argparse.BooleanOptionalAction if spec.optional else "store_true")
        else:
            parser.add_argument(f"--{key}", dest=spec.name, type=_converter(spec), default=default,
                                choices=spec.choices, help=_help(spec, default),
                                metavar=None if spec.choices else spec.key.upper().replace("-", "_"))


def flag_keys(sections: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """The flat keys of every settings field of ``sections`` that commands offer as options."""
    wanted, skip = set(sections), set(exclude)
    return [k for k, s in Settings.specs().items() if s.section in wanted and s.meta["flag"] and k not in skip]


def settings_from(args: argparse.Namespace, keys: Iterable[str], **extra: Any) -> Settings:
    """The settings the parsed options of ``keys`` give (``extra``: more fields by name).

    Raises:
        FedtrakError: on settings that conflict (naming them).
    """
    specs = Settings.specs()
    return Settings().replaced(**{specs[k].name: getattr(args, specs[k].name) for k in keys}, **extra)


def positive_int(text: str) -> int:
    """An option value that must be a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def fraction(text: str) -> float:
    """An option value that must lie in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def int_list(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers.

    Raises:
        FedtrakError: naming ``flag`` if the text is not such a list.
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FedtrakError(f"{flag} must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise FedtrakError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def add_json(parser: argparse.ArgumentParser, what: str = "the rows") -> None:
    """The ``--json FILE`` option of benchmarks and reports."""
    parser.add_argument("--json", type=Path, default=None, help=f"also write {what} as JSON")
