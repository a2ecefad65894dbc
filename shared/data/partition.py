"""Partitioning a task's training set over owners (clients).

Every training example gets a stable global id ``(client, local)``: the client
that owns it and its position in that client's data. Within a client,
examples keep dataset order, so ``local`` is the rank of the dataset index
among the client's indices. The federated runs and the centralized reference
use the same partition, and all outputs are in global-id order (client
first, then local index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtrak.errors import FedtrakError

#: numpy structured dtype of ``example_ids.npy``.
EXAMPLE_ID_DTYPE = np.dtype([("client", "<i8"), ("local", "<i8"), ("index", "<i8")])


def example_ids(per_client: Sequence[np.ndarray]) -> np.ndarray:
    """Structured (client, local, index) ids of clients' examples, client 0's first.

    ``per_client[c]`` holds client c's dataset indices (or, on a device, its rows) in its own order.
    """
    ids = np.empty(sum(len(c) for c in per_client), dtype=EXAMPLE_ID_DTYPE)
    start = 0
    for cid, idx in enumerate(per_client):
        stop = start + len(idx)
        ids["client"][start:stop] = cid
        ids["local"][start:stop] = np.arange(len(idx))
        ids["index"][start:stop] = idx
        start = stop
    return ids


@dataclass(frozen=True)
class Partition:
    """Which training examples each client owns.

    Attributes:
        clients: one sorted int64 array of dataset indices per client.
        scheme: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (``None`` for IID).
        seed: the seed that produced it.
    """

    clients: tuple[np.ndarray, ...]
    scheme: str
    alpha: float | None
    seed: int

    @property
    def num_clients(self) -> int:
        """Number of clients (owners)."""
        return len(self.clients)

    def order(self) -> np.ndarray:
        """Dataset indices in global-id order (client 0's examples first)."""
        return np.concatenate(self.clients)

    def example_ids(self) -> np.ndarray:
        """Structured array (client, local, index) in global-id order."""
        return example_ids(self.clients)

    def owners(self) -> np.ndarray:
        """Client id of each example, in global-id order."""
        return self.example_ids()["client"]

    def describe(self) -> dict:
        """JSON-ready description, with per-client sizes."""
        return {
            "scheme": self.scheme,
            "alpha": self.alpha,
            "seed": self.seed,
            "num_clients": self.num_clients,
            "client_sizes": [len(c) for c in self.clients],
        }


def _natural(num_clients: int, groups: np.ndarray | None, n: int, seed: int) -> Partition:
    """Whole groups to clients, the largest group first to the client holding least (ties: the
    lower client); deterministic, whatever the seed."""
    if groups is None or len(groups) != n:
        raise FedtrakError("partition natural needs each example's owner group (a task's train_groups, e.g. the "
                           "collection a text comes from): this task has none, use iid or dirichlet")
    ids, sizes = np.unique(groups, return_counts=True)
    if num_clients > len(ids):
        raise FedtrakError(f"partition natural has {len(ids)} owner groups: use at most {len(ids)} clients")
    load, members = np.zeros(num_clients, dtype=np.int64), [[] for _ in range(num_clients)]
    for g in np.argsort(-sizes, kind="stable"):
        c = int(np.argmin(load))
        members[c].append(ids[g])
        load[c] += sizes[g]
    parts = tuple(np.flatnonzero(np.isin(groups, m)).astype(np.int64) for m in members)
    return Partition(parts, "natural", None, seed)


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    groups: np.ndarray | None = None,
) -> Partition:
    """Split ``len(labels)`` examples over ``num_clients`` owners.

    ``iid`` shuffles and splits into near-equal parts. ``dirichlet`` gives each
    class's examples to clients in proportions drawn from Dirichlet(alpha)
    (label skew; smaller alpha, more skew), redrawing until every client has at
    least ``min_size`` examples. Both are deterministic in ``seed``. ``natural``
    keeps the data's own owners (``groups``: each example's, e.g. the collection
    a text comes from): each group goes whole to one client, the largest first to
    the client holding least, so ``num_clients`` up to the number of groups.

    Raises:
        FedtrakError: on a non-positive client count, more clients than
            examples (or than groups), an unknown scheme, a non-positive alpha,
            or a natural partition of data without groups.
    """
    n = len(labels)
    if num_clients < 1:
        raise FedtrakError(f"number of clients must be at least 1, got {num_clients}")
    if num_clients * min_size > n:
        raise FedtrakError(f"cannot give {num_clients} clients {min_size} of {n} examples each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
        return Partition(tuple(np.sort(p).astype(np.int64) for p in parts), "iid", None, seed)
    if scheme == "natural":
        return _natural(num_clients, groups, n, seed)
    if scheme != "dirichlet":
        raise FedtrakError(f"unknown partition scheme {scheme!r}: use iid, dirichlet or natural")
    if not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise FedtrakError("partition dirichlet skews the owners' classes: these labels are real values "
                           "(a regression), use partition iid")
    if np.ndim(labels) != 1:
        raise FedtrakError("partition dirichlet skews the owners' classes: these labels are token sequences "
                           "(a language model), use partition iid or natural")
    if not alpha > 0:
        raise FedtrakError(f"Dirichlet alpha must be positive, got {alpha}")
    classes = np.unique(labels)
    for _ in range(1000):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for cid, piece in enumerate(np.split(idx, cuts)):
                buckets[cid].append(piece)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return Partition(tuple(parts), "dirichlet", float(alpha), seed)
    raise FedtrakError(
        f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} examples in 1000 "
        "draws: use fewer clients or a larger alpha"
    )
