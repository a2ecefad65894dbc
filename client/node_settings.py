"""A device's own settings: every key of its node config, typed, with its default and a strict parser.

A node config (``flower-supernode --node-config "k=v ..."``, or the defaults a
simulation's ClientApp is built with) is the device owner's: the server's run
config never reaches these values. Every key is declared once here; ``fedtrak
device check`` offers the same keys as flags (``--privacy-budget``), and an
unknown key, or a value of the wrong type (``serve-full='maybe'``), is refused
by name rather than read as something else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtrak.config.flat import Sectioned, Spec, setting
from fedtrak.errors import FedtrakError, Refused

#: Where a device keeps its feature store (and its privacy ledger) when its node config names none.
DEFAULT_STORE = Path.home() / ".cache" / "fedtrak" / "store"
#: Total delta of a budget that states only epsilon: room for ten runs at the default delta 1e-5.
DEFAULT_BUDGET_DELTA = 1e-4
#: Node-config keys of older releases, and what replaced them.
RENAMED = {"allow-full": "serve-full (the run's own setting is allow-full)"}


@dataclass(frozen=True)
class NodeFields:
    """The node config's keys (see the module docstring)."""

    store_dir: str | None = setting(None, f"root of the device's feature store and privacy ledger (default "
                                          f"{DEFAULT_STORE})")
    privacy_budget: float | None = setting(None, "the owner's total epsilon over every run (default: none, the "
                                                 "ledger only records)", above=0)
    privacy_budget_delta: float = setting(DEFAULT_BUDGET_DELTA, "the owner's total delta over every run",
                                          above=0, below=1)
    serve_full: bool = setting(False, "serve the full release policy (every example's exact score: "
                                      "simulation and evaluation only)")
    min_noise_multiplier: float | None = setting(None, "every attribution release of a run must carry at least "
                                                       "this noise multiplier (a run without noise is refused)",
                                                 above=0)
    min_secagg_threshold: int | None = setting(None, "the run must sum Grams with secure aggregation at a share "
                                                     "threshold of at least this many clients", minimum=1)
    max_proj_dim: int | None = setting(None, "the projection dimension k may be at most this", minimum=1)
    max_clip_norm: float | None = setting(None, "the clip norm may be at most this", above=0)
    data_path: str | None = setting(None, "the device's own data: an .npz file with arrays x and y")
    owner: str | None = setting(None, "the owner's name in results (default: the node id)")
    task: str | None = setting(None, "the task the device serves, by registered name or package.module:function "
                                     "(an import path in a job is loaded only if it is this one)")
    partition_id: int | None = setting(None, "simulation: this node's partition of the built-in data", minimum=0)
    num_partitions: int | None = setting(None, "simulation: how many partitions the built-in data has",
                                         minimum=1)


@dataclass(frozen=True)
class NodeSettings(Sectioned):
    """A device's settings: one section, :class:`NodeFields`."""

    node: NodeFields = field(default_factory=NodeFields)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NodeSettings:
        """The settings a node config holds (strings are parsed as on a command line: ``'false'`` is
        false); ``""`` means not given.

        Raises:
            Refused: naming an unknown or renamed key, or a value of the wrong type or range (the
                node's own settings: the reason may reach the server).
        """
        renamed = sorted(k for k in config if k in RENAMED)
        if renamed:
            raise Refused("node config: " + "; ".join(f"{k} is now {RENAMED[k]}" for k in renamed))
        try:
            settings = cls().updated({k: v for k, v in config.items()}, parse=True)
            settings.check()
        except FedtrakError as exc:
            raise Refused(f"node config: {exc}") from None
        return settings

    @property
    def fields(self) -> NodeFields:
        """The node's values."""
        return self.node

    @property
    def store_root(self) -> Path:
        """The store root, as given or the default."""
        return Path(self.node.store_dir or DEFAULT_STORE).expanduser()


def node_specs() -> dict[str, Spec]:
    """Every node-config key's spec, by key (for ``fedtrak device check``'s flags)."""
    return NodeSettings.specs()


#: An absolute local path in a text (POSIX, ``~/``, or a Windows drive's), not part of a word, a
#: URL or a placeholder.
_PATH = re.compile(r"(?<![\w.:/~<>-])(?:~?/[\w.+@%=~-]+)+/?|\b[A-Za-z]:\\[^\s'\"]+")


def without_local_paths(text: str, node_config: Mapping[str, Any]) -> str:
    """``text`` with the device's local paths taken out, for what leaves it (an error reply): its
    data file (``<data-path>``), its store (``<store-dir>``) and any other absolute path, ``~/...``
    included (``<local path>``). The device's own log keeps the paths."""
    named = {str(node_config.get("data-path") or ""): "<data-path>",
             str(node_config.get("store-dir") or DEFAULT_STORE): "<store-dir>"}
    places: dict[str, str] = {}
    for given, mark in named.items():
        if given:
            for form in {given, str(Path(given).expanduser()), str(Path(given).expanduser().resolve())}:
                if "/" in form:  # a bare file name could be any word of the text
                    places[form] = mark
    for place in sorted(places, key=len, reverse=True):  # the longest first: a data file inside the store
        text = text.replace(place, places[place])
    return _PATH.sub("<local path>", text)
