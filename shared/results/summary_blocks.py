"""The typed blocks of the run summary (:mod:`fedtrak.results.summary`, which writes and reads them):
each block's fields are its keys in ``summary.json``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtrak.data.corruption import FlipSpec
from fedtrak.data.partition import Partition as DataPartition
from fedtrak.privacy.accountant import Release


@dataclass(frozen=True)
class Owner:
    """One ``owner_scores`` column of a federated run: whose it is and how many examples it holds."""

    column: int
    owner: str
    node_id: int
    partition_id: int
    num_examples: int


@dataclass(frozen=True)
class Excluded:
    """A client the run left out, and why."""

    node_id: int
    owner: str | None
    reason: str

    @property
    def name(self) -> str:
        """How a reader names it: by owner where it named one, and by node id."""
        return f"owner {self.owner!r} (node {self.node_id})" if self.owner else f"node {self.node_id}"


#: Owners named one by one in :func:`coverage_line`; more are counted.
NAMED_OWNERS = 10


def coverage_line(owners: list[str], excluded: list[Excluded]) -> str:
    """Whose data a federated run's results cover, and who was left out, in one line."""
    names = ", ".join(repr(o) for o in owners[:NAMED_OWNERS])
    more = f" and {len(owners) - NAMED_OWNERS} more" if len(owners) > NAMED_OWNERS else ""
    line = f"the results cover {len(owners)} owner{'' if len(owners) == 1 else 's'}: {names}{more}"
    if excluded:
        line += f"; excluded: {', '.join(e.name for e in excluded)}"
    return line


@dataclass(frozen=True)
class Partition:
    """The simulation partition of the training set (``alpha`` for Dirichlet only; the
    centralized path also records each client's size)."""

    scheme: str
    alpha: float | None
    seed: int
    num_clients: int
    client_sizes: tuple[int, ...] | None = None

    @classmethod
    def of(cls, parts: DataPartition) -> Partition:
        """The block of the centralized path's partition, with each client's size."""
        return cls(parts.scheme, parts.alpha, parts.seed, parts.num_clients, tuple(len(c) for c in parts.clients))


@dataclass(frozen=True)
class Flips:
    """A mislabel experiment: which clients had which fraction of labels flipped."""

    fraction: float
    clients: tuple[int, ...]
    seed: int
    num_flipped: int
    file: str = "flipped.npy"

    @classmethod
    def of(cls, flips: FlipSpec, flipped: np.ndarray) -> Flips | None:
        """The block of a run's flips (``None`` when nothing was flipped)."""
        if not flips.active:
            return None
        return cls(flips.fraction, tuple(flips.clients), flips.seed, len(flipped))


@dataclass(frozen=True)
class Resumed:
    """A resumed run: its id and what it reused of the interrupted one."""

    run_id: str
    reused: tuple[str, ...]


@dataclass(frozen=True)
class Clients:
    """The federation's account of its clients: each client's record (the server's), the
    exclusions, bytes (payloads of every message: totals and per step), seconds and memory."""

    clients: tuple[Mapping[str, Any], ...]
    excluded: tuple[Excluded, ...]
    bytes_sent: int
    bytes_received: int
    bytes_per_step: Mapping[str, Any]
    client_seconds: Mapping[str, float]
    client_peak_memory_mb: Mapping[str, Any]


@dataclass(frozen=True)
class Privacy:
    """The privacy account of a federated run (the ``privacy`` block): what was released and what it
    cost. Without noise (``dp`` false) only ``kernel_source``, ``note`` and ``training`` are set.
    ``epsilon`` is the whole run's (``None``: unbounded), ``epsilon_attribution`` the attribution
    releases' alone; the secure-sum fields are set under secure aggregation only."""

    dp: bool
    kernel_source: str
    note: str = ""
    adjacency: str = ""
    noise_multiplier: float = 0.0
    budget_scales: str = ""
    budget: str = ""
    clip_norm: float = 0.0
    clip_norm_rule: str = ""
    clip_mode: str = ""
    delta: float = 0.0
    target_epsilon: float | None = None
    gram_weight: float = 1.0
    kernel_weighting: str = ""
    epsilon: float | None = None
    epsilon_prv: float | None = None
    accountant: str = ""
    ledger: tuple[Release, ...] = ()
    secure_aggregation: bool = False
    noise_per_client: str = ""
    not_covered: tuple[str, ...] = ()
    survivors: int | None = None
    gram_sigma_effective: float | None = None
    fraction_bits: int | None = None
    epsilon_if_only_threshold_honest: float | None = None
    owner_value_clip: float | None = None
    suspect_threshold: float | None = None
    training: str | None = None
    epsilon_attribution: float | None = None


@dataclass(frozen=True)
class Federated:
    """What only a federated run records: its id, owners and clients, the kernel's source, the
    privacy account, the secure sum's report, the training's privacy and what a resumed run reused."""

    run_id: str
    owners: tuple[Owner, ...]
    clients: Clients
    kernel_source: str
    privacy: Privacy
    training_privacy: Mapping[str, Any]
    secure_aggregation: Mapping[str, Any] | None = None
    resumed: Resumed | None = None
