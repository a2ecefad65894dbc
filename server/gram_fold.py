"""Clients' Grams folded into running sums as they arrive, their costly check done per batch.

The server never holds more than one batch of Grams: each reply is decoded
and given the O(k^2) checks at once (shape, finiteness, symmetry by
construction; without noise, the diagonal and every 2 x 2 principal minor;
under DP, the diagonal, trace and entries against
:func:`fedtrak.privacy.bounds.gram_limits`), then waits in the batch. The
costly check, positive semi-definiteness (a Cholesky factorization, k^3/3),
runs once per batch on the batch's sum, with the noise allowance of that
many clients under DP. A batch that passes is added to the sums; one that
fails has each of its Grams checked alone, and the clients whose Gram fails
are excluded by name.

What this accepts is what a secure sum accepts (there only the sum can be
checked): every batch sum is PSD within its noise, so the kernel is; a
client's Gram that is not PSD on its own can pass inside a batch whose other
Grams outweigh it, but never one that fails the 2 x 2 minors or the size
bounds.

The sums are compensated (Neumaier), so the result does not depend on the
order in which replies arrive beyond the last bit of a few entries in a
billion: a rerun gives the same kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.privacy.bounds import GramLimits
from fedtrak.server.validation import check_gram_size, check_psd

#: Memory one batch of pending Grams may take (unpacked float64), and the most Grams in a batch.
BATCH_BYTES = 256 * 2**20
MAX_BATCH = 32


def batch_size(dim: int, checkpoints: int) -> int:
    """Grams per batch: as many as fit in :data:`BATCH_BYTES`, between 1 and :data:`MAX_BATCH`."""
    return int(min(MAX_BATCH, max(1, BATCH_BYTES // max(1, 8 * dim * dim * checkpoints))))


class CompensatedSum:
    """A running float64 sum of arrays with Neumaier's compensation: the error of the sum is of
    the order of one rounding whatever the number or order of the terms."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._sum = np.zeros(shape)
        self._carry = np.zeros(shape)

    def add(self, term: np.ndarray) -> None:
        """Add one term."""
        total = self._sum + term
        bigger = np.abs(self._sum) >= np.abs(term)
        self._carry += np.where(bigger, (self._sum - total) + term, (term - total) + self._sum)
        self._sum = total

    def value(self) -> np.ndarray:
        """The sum so far."""
        return self._sum + self._carry


class GramFold:
    """Per-checkpoint sums of the clients' Grams, folded a batch at a time (see the module doc).

    ``limits(count, clients)``: the range of a sum of ``clients`` honest Grams of ``count``
    examples in all under DP, ``None`` without noise; ``exclude(node, reason)``: drops a client.
    """

    def __init__(self, checkpoints: Sequence[int], dim: int, limits: Callable[[float, int], GramLimits] | None,
                 exclude: Callable[[int, str], None], batch: int | None = None) -> None:
        self.checkpoints = list(checkpoints)
        self.dim = dim
        self.limits = limits
        self.exclude = exclude
        self.batch = batch or batch_size(dim, max(1, len(self.checkpoints)))
        self.sums = {m: CompensatedSum((dim, dim)) for m in self.checkpoints}
        self.included: list[int] = []
        self.count = 0.0
        self._pending: list[tuple[int, str, float, dict[int, np.ndarray]]] = []

    def add(self, node: int, source: str, count: float, grams: dict[int, np.ndarray]) -> None:
        """Queue one client's Grams (already given the O(k^2) checks); checks and folds the batch
        when it is full."""
        self._pending.append((node, source, count, grams))
        if len(self._pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Check the pending batch's sum; fold it whole if it passes, else client by client."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._check([g for *_, g in pending], sum(c for _, _, c, _ in pending), "a batch of "
                        f"{len(pending)} clients' Grams", "the Gram sum")
            passed = pending
        except FedtrakError:
            passed = []
            for entry in pending:
                node, source, count, grams = entry
                try:
                    self._check([grams], count, "its Gram", source)
                    passed.append(entry)
                except FedtrakError as exc:
                    self.exclude(node, str(exc))
        for node, _, count, grams in passed:
            for m in self.checkpoints:
                self.sums[m].add(grams[m])
            self.included.append(node)
            self.count += count

    def _check(self, members: list[dict[int, np.ndarray]], count: float, what: str, source: str) -> None:
        for m in self.checkpoints:
            total = members[0][m] if len(members) == 1 else np.sum([g[m] for g in members], axis=0)
            if self.limits is None:
                check_psd(total, f"{what} of checkpoint {m}", source)
            else:
                check_gram_size(total, self.limits(count, len(members)), f"{what} of checkpoint {m}", source)

    def result(self) -> list[np.ndarray]:
        """The sums, per checkpoint in order, after the last batch is checked."""
        self.flush()
        return [self.sums[m].value() for m in self.checkpoints]
