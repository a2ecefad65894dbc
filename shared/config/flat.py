"""Nested, typed settings and their one flat form.

A settings model is a frozen dataclass of sections (:class:`Sectioned`),
each a frozen dataclass whose fields are declared with :func:`setting`: a
default, a help text and the field's own checks (choices, bounds). From that
one declaration this module derives the flat form that Flower's run config,
``pyproject.toml`` and a client's job use, ``{"proj-dim": 512, ...}`` (the key
is the field name with hyphens unless the field names another), and back.
The command line is derived from the same fields
(:mod:`fedtrak.simulations.cli.flags`).

Flat values are Flower config values: ``int``, ``float``, ``bool`` and
``str``. A field typed ``X | None`` is ``""`` when ``None`` (not given); a
``tuple[int, ...]`` is a comma-separated string (``"0,3"``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

from fedtrak.errors import FedtrakError

FlatValue = int | float | bool | str


def setting(default: Any, help: str, *, key: str | None = None, choices: tuple[str, ...] | None = None,
            minimum: float | None = None, above: float | None = None, maximum: float | None = None,
            below: float | None = None, flag: bool = True) -> Any:
    """A settings field: its default, its help, its own checks and (``flag``) whether commands
    offer it as an option. ``key`` overrides the flat name (``lam`` is ``lambda``)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "key": key, "choices": choices, "minimum": minimum, "above": above,
        "maximum": maximum, "below": below, "flag": flag})


@dataclass(frozen=True)
class Spec:
    """One field of one section, as the flat form and the command line see it."""

    section: str
    name: str
    key: str
    kind: str  # int, float, str, bool or ints
    optional: bool
    default: Any
    meta: Mapping[str, Any]

    @property
    def help(self) -> str:
        """The field's help text."""
        return str(self.meta["help"])

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The allowed values of a choice field."""
        return self.meta["choices"]

    def coerce(self, value: Any) -> Any:
        """A flat (run config) value as this field's Python value.

        Raises:
            FedtrakError: naming the key if the value has the wrong type.
        """
        if self.optional and (value is None or value == ""):
            return None
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise FedtrakError(f"{self.key} must be true or false, got {value!r}")
        if self.kind == "ints":
            return self.parse(value) if isinstance(value, str) else self._ints(value)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise FedtrakError(f"{self.key} must be an integer, got {value!r}")
            return value
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FedtrakError(f"{self.key} must be a number, got {value!r}")
            return float(value)
        return str(value)

    def _ints(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise FedtrakError(f"{self.key} must be comma-separated integers, got {value!r}")
        return tuple(value)

    def parse(self, text: str) -> Any:
        """A value as typed on a command line or in a run-config string.

        Raises:
            FedtrakError: naming the key if the text is not of the field's type.
        """
        text = text.strip()
        if self.optional and text == "":
            return None
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "ints":
                return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            kind = {"int": "an integer", "float": "a number", "ints": "comma-separated integers"}[self.kind]
            raise FedtrakError(f"{self.key} must be {kind}, got {text!r}") from None
        return self.coerce(text)

    def check(self, value: Any) -> None:
        """The field's own checks (choices and bounds; ``None`` passes).

        Raises:
            FedtrakError: naming the key, the value and what is allowed.
        """
        if value is None:
            return
        m = self.meta
        if m["choices"] is not None and value not in m["choices"]:
            raise FedtrakError(f"{self.key}={value!r}: use one of {', '.join(m['choices'])}")
        values = value if self.kind == "ints" else (value,) if self.kind in ("int", "float") else ()
        for v in values:
            if isinstance(v, float) and math.isnan(v):
                raise FedtrakError(f"{self.key} must be a number, got nan")
            low = (m["minimum"] is not None and v < m["minimum"]) or (m["above"] is not None and not v > m["above"])
            high = (m["maximum"] is not None and v > m["maximum"]) or (m["below"] is not None and not v < m["below"])
            if low or high:
                raise FedtrakError(f"{self.key} must be {self.bounds()}, got {v!r}")

    def bounds(self) -> str:
        """The allowed range in words (``a number > 0 and < 1``)."""
        m = self.meta
        parts = [f">= {m['minimum']:g}" if m["minimum"] is not None else "",
                 f"> {m['above']:g}" if m["above"] is not None else "",
                 f"<= {m['maximum']:g}" if m["maximum"] is not None else "",
                 f"< {m['below']:g}" if m["below"] is not None else ""]
        what = "an integer" if self.kind in ("int", "ints") else "a number"
        return f"{what} " + " and ".join(p for p in parts if p)

    def flat(self, value: Any) -> FlatValue:
        """A Python value of this field in the flat form."""
        if value is None:
            return ""
        if self.kind == "ints":
            return ",".join(str(v) for v in value)
        return value


def _kind(annotation: str) -> tuple[str, bool]:
    base, optional = annotation, annotation.endswith(" | None")
    if optional:
        base = annotation[: -len(" | None")]
    kinds = {"int": "int", "float": "float", "str": "str", "bool": "bool", "tuple[int, ...]": "ints"}
    if base not in kinds:
        raise TypeError(f"settings field type {annotation!r} has no flat form")
    return kinds[base], optional


def section_specs(section: str, cls: type) -> list[Spec]:
    """The :class:`Spec` of every field of a section class."""
    out = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind(str(f.type))
        out.append(Spec(section, f.name, f.metadata.get("key") or f.name.replace("_", "-"), kind, optional,
                        f.default, f.metadata))
    return out


@dataclass(frozen=True)
class Sectioned:
    """A settings model: a frozen dataclass whose fields are sections (see the module docstring)."""

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        """Every field of every section by its flat key (keys are unique across sections)."""
        out: dict[str, Spec] = {}
        names: set[str] = set()
        for f in dataclasses.fields(cls):
            for spec in section_specs(f.name, f.default_factory):  # type: ignore[arg-type]
                if spec.key in out or spec.name in names:
                    raise TypeError(f"settings field {spec.name!r} ({spec.key!r}) is declared twice")
                out[spec.key] = spec
                names.add(spec.name)
        return out

    def _items(self) -> Iterator[tuple[Spec, Any]]:
        for spec in self.specs().values():
            yield spec, getattr(getattr(self, spec.section), spec.name)

    def check(self) -> None:
        """Every field's own checks, after Python's ``1`` where ``1.0`` is meant is made a float
        (so the job's wire form, which is exact about types, carries it however it was built)."""
        for spec, value in self._items():
            if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(getattr(self, spec.section), spec.name, float(value))  # frozen, being built
        for spec, value in self._items():
            spec.check(value)

    def flat(self, sections: tuple[str, ...] | None = None) -> dict[str, FlatValue]:
        """The flat form (of the given ``sections`` only, if given)."""
        return {s.key: s.flat(v) for s, v in self._items() if sections is None or s.section in sections}

    def nested(self) -> dict[str, dict[str, Any]]:
        """Section by section, JSON-ready (``None`` stays ``None``, tuples become lists)."""
        out: dict[str, dict[str, Any]] = {}
        for spec, value in self._items():
            out.setdefault(spec.section, {})[spec.key] = list(value) if isinstance(value, tuple) else value
        return out

    def updated(self, values: Mapping[str, Any], parse: bool = False) -> Self:
        """A copy with flat ``values`` over this one's (``parse``: the values are strings to parse).

        Raises:
            FedtrakError: naming unknown keys, or a value of the wrong type or out of range.
        """
        specs = self.specs()
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise FedtrakError(f"unknown setting(s) {unknown}; known: {sorted(specs)}")
        changes: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            spec = specs[key]
            changes.setdefault(spec.section, {})[spec.name] = (
                spec.parse(value) if parse and isinstance(value, str) else spec.coerce(value))
        sections = {name: dataclasses.replace(getattr(self, name), **vals) for name, vals in changes.items()}
        return dataclasses.replace(self, **sections)

    @classmethod
    def in_python_words(cls, text: str) -> str:
        """``text`` with every setting spelled the command line's way (``clip-norm``,
        ``--clip-norm``) spelled the Python way (``clip_norm``): errors raised to a Python caller."""
        names = {s.key: s.name for s in cls.specs().values() if s.key != s.name}
        if not names:
            return text
        pattern = r"(?<![\w-])(?:--)?(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?![\w-])"
        return re.sub(pattern, lambda m: names[m.group(1)], text)

    def replaced(self, **values: Any) -> Self:
        """A copy with fields replaced by Python values, by field name (``proj_dim=64``), whatever
        their section.

        Raises:
            FedtrakError: naming an unknown field or a value out of range.
        """
        by_name = {s.name: s for s in self.specs().values()}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise FedtrakError(f"unknown setting(s) {unknown}; known: {sorted(by_name)}")
        changes: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            changes.setdefault(by_name[name].section, {})[name] = value  # check() makes an int a float
        sections = {name: dataclasses.replace(getattr(self, name), **vals) for name, vals in changes.items()}
        return dataclasses.replace(self, **sections)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> Self:
        """Defaults with flat ``values`` over them (see :meth:`updated`)."""
        return cls().updated(values)
