"""Clients' Grams folded into running sums as they arrive, their costly check done per batch.

The server never holds more than one batch of Grams: each reply's packed
upper triangles get the O(k^2) checks at once
(:func:`fedtrak.server.validation.packed_gram_release`: shape, finiteness;
without noise, the diagonal and every 2 x 2 principal minor; under DP, the
diagonal, trace and entries against :func:`fedtrak.privacy.bounds.gram_limits`),
then wait in the batch. The costly check, positive semi-definiteness (a
Cholesky factorization, k^3/3), runs once per batch on the batch's sum, with
the noise allowance of that many clients under DP. A batch that passes is
added to the sums; one that fails has each of its Grams checked alone, and
the clients whose Gram fails are excluded by name.

What this accepts is what a secure sum accepts (there only the sum can be
checked): every batch sum is PSD within its noise, so the kernel is; a
client's Gram that is not PSD on its own can pass inside a batch whose other
Grams outweigh it, but never one that fails the 2 x 2 minors or the size
bounds.

The sums are compensated (Knuth's two-sum, a batch's Grams added block by
block so the running sum stays in cache), so the result does not depend on
the order in which replies arrive beyond the last bit of a few entries in a
billion: a rerun gives the same kernel. Everything is kept packed (half a
Gram's entries); only a batch's sum is unpacked, for its factorization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.privacy.bounds import GramLimits
from fedtrak.server.validation import check_gram_size, check_psd
from fedtrak.wire.codecs import unpack_upper

#: Memory one batch of pending Grams may take (packed float64), and the most Grams in a batch.
BATCH_BYTES = 256 * 2**20
MAX_BATCH = 64


def batch_size(dim: int, checkpoints: int) -> int:
    """Grams per batch: as many as fit in :data:`BATCH_BYTES`, between 1 and :data:`MAX_BATCH`."""
    packed = 8 * dim * (dim + 1) // 2 * max(1, checkpoints)
    return int(min(MAX_BATCH, max(1, BATCH_BYTES // packed)))


class CompensatedSum:
    """A running float64 sum of arrays with Knuth's two-sum compensation: the error of the sum
    is of the order of one rounding whatever the number or order of the terms."""

    #: Entries summed at a time: a block of the sum, its carry and the scratch stay in the core's
    #: cache while every term of a batch is added to it.
    BLOCK = 65536

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._sum, self._carry = np.zeros(shape).reshape(-1), np.zeros(shape).reshape(-1)
        self._shape = shape
        n = min(self.BLOCK, self._sum.size)
        self._scratch = (np.empty(n), np.empty(n), np.empty(n))

    def add(self, *terms: np.ndarray) -> None:
        """Add terms, in order, block by block: per entry t = s + x, z = t - s,
        carry += (s - (t - z)) + (x - z), s = t."""
        flat = [np.asarray(x, dtype=np.float64).reshape(-1) for x in terms]
        size = self._sum.size
        for a in range(0, size, self.BLOCK):
            b = min(size, a + self.BLOCK)
            s, carry = self._sum[a:b], self._carry[a:b]
            t, z, w = (buf[: b - a] for buf in self._scratch)
            for x in flat:
                x = x[a:b]
                np.add(s, x, out=t)
                np.subtract(t, s, out=z)
                np.subtract(t, z, out=w)
                np.subtract(s, w, out=w)
                np.subtract(x, z, out=z)
                np.add(w, z, out=w)
                np.add(carry, w, out=carry)
                s, t = t, s  # the new sum is t; s's buffer is the next scratch
            if len(flat) % 2:  # the block's sum ended in the scratch buffer
                self._sum[a:b] = s

    def value(self) -> np.ndarray:
        """The sum so far."""
        return (self._sum + self._carry).reshape(self._shape)


class GramFold:
    """Per-checkpoint sums of the clients' packed Grams, folded a batch at a time (see the module
    doc).

    ``limits(count, clients)``: the range of a sum of ``clients`` honest Grams of ``count``
    examples in all under DP, ``None`` without noise; ``exclude(node, reason)``: drops a client.
    """

    def __init__(self, checkpoints: Sequence[int], dim: int, limits: Callable[[float, int], GramLimits] | None,
                 exclude: Callable[[int, str], None], batch: int | None = None) -> None:
        self.checkpoints = list(checkpoints)
        self.dim = dim
        self.limits = limits
        self.exclude = exclude
        self.batch = batch or batch_size(dim, len(self.checkpoints))
        size = dim * (dim + 1) // 2
        self.sums = {m: CompensatedSum((size,)) for m in self.checkpoints}
        self.included: list[int] = []
        self.count = 0.0
        self._pending: list[tuple[int, str, float, dict[int, np.ndarray]]] = []
        self._batch_sum = {m: np.zeros(size) for m in self.checkpoints}

    def add(self, node: int, source: str, count: float, packed: dict[int, np.ndarray]) -> None:
        """Queue one client's packed Grams (already given the O(k^2) checks); checks and folds the
        batch when it is full."""
        self._pending.append((node, source, count, packed))
        for m in self.checkpoints:
            self._batch_sum[m] += packed[m]
        if len(self._pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Check the pending batch's sum; fold it whole if it passes, else client by client."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._check(self._batch_sum, sum(c for _, _, c, _ in pending), len(pending),
                        f"a batch of {len(pending)} clients' Grams", "the Gram sum")
            passed = pending
        except FedtrakError:
            passed = []
            for entry in pending:
                node, source, count, packed = entry
                try:
                    self._check(packed, count, 1, "its Gram", source)
                    passed.append(entry)
                except FedtrakError as exc:
                    self.exclude(node, str(exc))
        for m in self.checkpoints:
            self._batch_sum[m].fill(0.0)
        for m in self.checkpoints:
            self.sums[m].add(*(packed[m] for _, _, _, packed in passed))
        for node, _, count, _ in passed:
            self.included.append(node)
            self.count += count

    def _check(self, packed: dict[int, np.ndarray], count: float, clients: int, what: str, source: str) -> None:
        for m in self.checkpoints:
            total = unpack_upper(packed[m], self.dim, source)
            if self.limits is None:
                check_psd(total, f"{what} of checkpoint {m}", source, overwrite=True)
            else:
                check_gram_size(total, self.limits(count, clients), f"{what} of checkpoint {m}", source, overwrite=True)

    def result(self) -> list[np.ndarray]:
        """The sums, per checkpoint in order, after the last batch is checked."""
        self.flush()
        return [unpack_upper(self.sums[m].value(), self.dim, "the Gram sum") for m in self.checkpoints]
