"""The score step in query batches: a client never holds all of the preconditioned queries.

``U_m`` is ``Q x k`` per checkpoint (float32 on the wire): at 10,000 queries and
k = 2,048 that is 82 MB per checkpoint. The server sends it in batches of
rows (run setting ``query-batch``; by default as many as fit
:data:`BATCH_BYTES`), one score message per batch, and each client scores its
examples for one batch at a time. The first batch also carries what does not
depend on the queries (the kernel inverses for self-influence, the query
groups for owner values), so screening statistics and owner values are
computed and released once. Each batch's reply is checked as a whole request's
is, for its rows; the parts are then joined per client (owner totals and
scores along the queries), and owner values are checked against the joined
totals. A client that misses a batch is dropped from the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from fedtrak import wire

#: Float32 query bytes (over all checkpoints) one score message carries by default.
BATCH_BYTES = 64 * 2**20


def batch_rows(queries: int, dim: int, checkpoints: int, per_batch: int = 0) -> list[tuple[int, int]]:
    """The ``(start, stop)`` rows of each batch of ``queries`` preconditioned queries: ``per_batch``
    at a time, or (0) as many as fit :data:`BATCH_BYTES` as float32 over ``checkpoints``; one
    empty batch when there are no queries (the summary route)."""
    per = per_batch or max(1, BATCH_BYTES // (4 * dim * max(1, checkpoints)))
    return [(a, min(queries, a + per)) for a in range(0, queries, per)] or [(0, 0)]


def batch_request(request: wire.ScoreRequest, start: int, stop: int, count: int) -> wire.ScoreRequest:
    """Rows ``start:stop`` of ``request``'s queries as one batch of ``count``; inverses and query
    groups only in the first."""
    first = start == 0
    return replace(request, queries={m: u[start:stop] for m, u in request.queries.items()},
                   inverses=request.inverses if first else None, groups=request.groups if first else None,
                   query_offset=start, query_count=count)


def joined_releases(parts: list[Mapping[int, wire.ScoreRelease]], source: Callable[[int], str],
                    exclude: Callable[[int, str], None]) -> dict[int, wire.ScoreRelease]:
    """Each client's releases over every batch (``parts``, in order) as one: owner totals and
    scores joined along the queries, screening, values and self-influence from the first batch.
    A client missing from a batch is left out; one whose example indices change between batches
    is excluded by name."""
    joined = {}
    for node in parts[0]:
        batches = [p.get(node) for p in parts]
        if any(b is None for b in batches):
            continue  # dropped out of a later batch (the federation says why)
        first = batches[0]
        scores = idx = None
        if first.scores is not None:
            if any(b.indices is None or not np.array_equal(b.indices, first.indices) for b in batches):
                exclude(node, f"{source(node)}: its example indices change between query batches")
                continue
            scores, idx = np.concatenate([b.scores for b in batches]), first.indices
        joined[node] = replace(first, owner_totals=np.concatenate([b.owner_totals for b in batches]),
                               scores=scores, indices=idx)
    return joined

