"""Random projections of per-example gradients, generated block by block from a seed.

The p x k projection matrix ``P`` is defined as the row-wise concatenation of
blocks of :data:`BLOCK_ROWS` rows; block ``j`` is generated from
``numpy.random.SeedSequence([seed, j])`` with the Philox bit generator, so any
machine with the same seed gets the same matrix without exchanging it, and
the matrix never has to exist whole. Entries are scaled by ``1/sqrt(k)`` so
that ``E[P P^T] = I`` and projected inner products estimate gradient inner
products (Johnson-Lindenstrauss).

Scale versus traker: traker's entries are +-1 / N(0, 1) and it divides every
projected gradient by ``sqrt(p)``. fedtrak's features are therefore
``sqrt(p / k)`` times traker's, and a lambda ``lam`` here corresponds to
``lam * k / p`` in traker (and ``lam / p`` for the identity projector, which is
not scaled; see :func:`fedtrak.trak.kernel.lambda_to_traker`).
"""

from __future__ import annotations

from abc import abstractmethod
from math import sqrt

import numpy as np
import torch

from fedtrak.errors import FedtrakError
from fedtrak.trak.projectors.base import BLOCK_ROWS, Projector, check_fits

#: Default memory budget for keeping the whole generated matrix in memory. Generating the blocks
#: again for every chunk costs little (measured: no slower on digits-mlp and fmnist-mlp at k = 2048),
#: so the budget is small enough for a device: a 0.8 GB matrix is not kept.
DEFAULT_CACHE_BYTES = 256 << 20

#: Released matrix buffers by shape, reused by the next cached projector.
_MATRIX_POOL: dict[tuple[int, int], list[np.ndarray]] = {}


class IdentityProjector(Projector):
    """No projection: features are the raw gradients (``k = p``). For exactness tests."""

    kind = "identity"

    def __init__(self, grad_dim: int, proj_dim: int | None = None, seed: int = 0) -> None:
        if proj_dim is not None and proj_dim != grad_dim:
            raise FedtrakError(
                f"the identity projector needs --proj-dim equal to the number of parameters "
                f"({grad_dim}), got {proj_dim}"
            )
        super().__init__(grad_dim, grad_dim, seed)

    def project(self, grads: torch.Tensor, more_to_come: bool = True) -> torch.Tensor:
        """Return the gradients unchanged (as float32)."""
        self._check_input(grads)
        return grads.to(torch.float32)

    def matrix(self) -> torch.Tensor:
        """The p x p identity."""
        return torch.eye(self.grad_dim)


class BlockRandomProjector(Projector):
    """Seeded dense random projection generated in blocks of :data:`BLOCK_ROWS` rows.

    ``project`` multiplies block by block, so memory is one block plus the
    batch. When the whole matrix fits ``cache_bytes`` and more than one call is
    expected (a data set of several chunks), it is generated once and kept,
    which makes the later calls as fast as a plain matrix product.
    """

    def __init__(
        self, grad_dim: int, proj_dim: int, seed: int, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        super().__init__(grad_dim, proj_dim, seed)
        check_fits(proj_dim, grad_dim)
        self.cache_bytes = int(cache_bytes)
        self._cache: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        """Number of row blocks of P."""
        return -(-self.grad_dim // BLOCK_ROWS)

    @abstractmethod
    def _fill(self, rng: np.random.Generator, out: np.ndarray) -> None:
        """Write the unscaled float32 entries of a ``(rows, k)`` block into ``out``."""

    def _block_into(self, j: int, out: np.ndarray) -> None:
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, j])))
        self._fill(rng, out)
        out *= np.float32(1.0 / sqrt(self.proj_dim))

    def _block_rows(self, j: int) -> int:
        if not 0 <= j < self.num_blocks:
            raise IndexError(f"block {j} out of range [0, {self.num_blocks})")
        return min(BLOCK_ROWS, self.grad_dim - j * BLOCK_ROWS)

    def block(self, j: int) -> torch.Tensor:
        """Rows ``[j * BLOCK_ROWS, (j + 1) * BLOCK_ROWS)`` of P as float32."""
        out = np.empty((self._block_rows(j), self.proj_dim), dtype=np.float32)
        self._block_into(j, out)
        return torch.from_numpy(out)

    def matrix(self) -> torch.Tensor:
        """All blocks stacked: the ``(p, k)`` matrix, generated in place."""
        if self._cache is not None:
            return self._cache
        pooled = _MATRIX_POOL.get((self.grad_dim, self.proj_dim))
        out = pooled.pop() if pooled else np.empty((self.grad_dim, self.proj_dim), dtype=np.float32)
        for j in range(self.num_blocks):
            start = j * BLOCK_ROWS
            self._block_into(j, out[start : start + self._block_rows(j)])
        return torch.from_numpy(out)

    def release(self) -> None:
        """Drop the cached matrix, keeping its memory for the next projector of
        the same shape (first-touching a large buffer costs seconds)."""
        if self._cache is not None:
            _MATRIX_POOL.setdefault((self.grad_dim, self.proj_dim), []).append(self._cache.numpy())
            _MATRIX_POOL[(self.grad_dim, self.proj_dim)][:-1] = []  # keep one buffer per shape
            self._cache = None

    def _fits_cache(self) -> bool:
        return self.grad_dim * self.proj_dim * 4 <= self.cache_bytes

    def project(self, grads: torch.Tensor, more_to_come: bool = True) -> torch.Tensor:
        """``grads @ P`` with the cached matrix, or block by block.

        The whole matrix is cached when it fits the budget and more calls are
        expected; a single call goes block by block (a fresh 700 MB cache costs
        more to first-touch than regenerating the blocks once).
        """
        self._check_input(grads)
        grads = grads.to(torch.float32)
        if self._cache is None and more_to_come and self._fits_cache():
            self._cache = self.matrix()
        if self._cache is not None:
            return grads @ self._cache
        out = torch.zeros(grads.shape[0], self.proj_dim, dtype=torch.float32)
        for j in range(self.num_blocks):
            start = j * BLOCK_ROWS
            blk = self.block(j)
            out.addmm_(grads[:, start : start + blk.shape[0]], blk)
        return out


class RademacherProjector(BlockRandomProjector):
    """Entries +-1/sqrt(k), each sign one Philox bit."""

    kind = "rademacher"

    #: Byte value -> its 8 bits (least significant first) as +-1.0 floats.
    _SIGNS = (
        np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
        .astype(np.float32) * 2.0 - 1.0
    )

    def _fill(self, rng: np.random.Generator, out: np.ndarray) -> None:
        count = out.size
        words = rng.bit_generator.random_raw(-(-count // 64))
        as_bytes = words.astype("<u8").view(np.uint8)
        if count % 8 == 0:
            np.take(self._SIGNS, as_bytes[: count // 8], axis=0, out=out.reshape(-1, 8))
        else:
            out.reshape(-1)[:] = self._SIGNS[as_bytes].reshape(-1)[:count]


class GaussianProjector(BlockRandomProjector):
    """Entries N(0, 1/k)."""

    kind = "gaussian"

    def _fill(self, rng: np.random.Generator, out: np.ndarray) -> None:
        rng.standard_normal(dtype=np.float32, out=out)
