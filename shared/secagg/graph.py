"""Who shares keys and masks with whom: the SecAgg+ neighbour graph (Bell et al., CCS 2020).

In the original protocol every client shares with every other one, so the
work and the bytes per client grow with the federation. SecAgg+ replaces the
complete graph with a random regular graph of degree ``O(log n)``: a client
shares its secrets and pairwise masks only with its neighbours, and its
secrets are rebuilt from ``t`` of its neighbours' shares. fedtrak uses the
complete graph up to :data:`COMPLETE_UP_TO` clients and, above, a Harary
graph (a circulant: each client linked to the ``d/2`` clients before and after
it on a ring) over a uniformly random ordering of the clients, drawn from the
operating system's entropy by the server.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

from fedtrak.errors import FedtrakError

#: Federations up to this size use the complete graph (every client a neighbour of every other).
COMPLETE_UP_TO = 20
#: Degree of the sparse graph: the even number at or above ``DEGREE_FACTOR x log2(n)``, twice.
DEGREE_FACTOR = 1.5


def degree(n: int) -> int:
    """The number of neighbours each of ``n`` clients has."""
    if n <= COMPLETE_UP_TO:
        return n - 1
    return min(n - 1, 2 * math.ceil(DEGREE_FACTOR * math.log2(n)))


def threshold(n: int, fraction: float) -> int:
    """Shares needed to rebuild a client's secrets: ``ceil(fraction x (degree + 1))``, at least 2
    (``fraction``: the run's ``secagg-threshold``, a fraction of a neighbourhood: the client and its
    neighbours).

    Raises:
        FedtrakError: on fewer than 3 clients or a fraction outside (0.5, 1].
    """
    if n < 3:
        raise FedtrakError(f"secure aggregation needs at least 3 clients, got {n}")
    if not 0.5 < fraction <= 1:
        raise FedtrakError(f"secure-aggregation threshold fraction must lie in (0.5, 1], got {fraction}")
    return max(2, math.ceil(fraction * (degree(n) + 1)))


def neighbours(clients: Sequence[int]) -> dict[int, list[int]]:
    """Each client's neighbours (sorted, itself excluded): complete or a random regular graph."""
    ids = sorted(set(clients))
    n = len(ids)
    d = degree(n)
    if d == n - 1:
        return {c: [v for v in ids if v != c] for c in ids}
    ring = list(ids)
    for i in range(n - 1, 0, -1):  # Fisher-Yates with the OS's randomness, not a seed of the run
        j = secrets.randbelow(i + 1)
        ring[i], ring[j] = ring[j], ring[i]
    out: dict[int, set[int]] = {c: set() for c in ids}
    for pos, c in enumerate(ring):
        for step in range(1, d // 2 + 1):
            v = ring[(pos + step) % n]
            out[c].add(v)
            out[v].add(c)
    return {c: sorted(vs) for c, vs in out.items()}
