"""Array encodings both sides agree on for what crosses the wire.

A Gram matrix travels as its upper triangle (row-major, diagonal included):
``k (k + 1) / 2`` numbers instead of ``k^2``. Decoding validates what a
client sent: length, finiteness; symmetry then holds by construction.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.trak.kernel import check_symmetric


def pack_upper(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle of a square matrix as a 1-D float64 array.

    Raises:
        FedtrakError: if the matrix is not square or not symmetric.
    """
    m = np.asarray(matrix, dtype=np.float64)
    check_symmetric(m, "Gram matrix")
    return m[_upper(m.shape[0])]


def unpack_upper(packed: np.ndarray, dim: int, source: str = "payload") -> np.ndarray:
    """Rebuild the symmetric ``(dim, dim)`` matrix from :func:`pack_upper`'s output.

    Raises:
        FedtrakError: naming ``source`` if the length is wrong or a value is not finite.
    """
    v = np.asarray(packed)
    want = dim * (dim + 1) // 2
    if v.ndim != 1 or v.shape[0] != want:
        raise FedtrakError(f"{source}: Gram upper triangle has shape {v.shape}, expected ({want},) for k={dim}")
    if not np.all(np.isfinite(v)):
        raise FedtrakError(f"{source}: Gram contains NaN or infinity")
    out = np.empty((dim, dim), dtype=np.float64)
    rows, cols = _upper(dim)
    out[rows, cols] = v
    out[cols, rows] = v
    return out


def upper_indices(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each entry of a packed upper triangle (read-only, cached)."""
    return _upper(dim)


@lru_cache(maxsize=4)
def diagonal_positions(dim: int) -> np.ndarray:
    """Where the diagonal entries sit in a packed upper triangle (read-only, cached)."""
    i = np.arange(dim)
    out = i * dim - i * (i - 1) // 2
    out.setflags(write=False)
    return out


@lru_cache(maxsize=4)
def _upper(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The upper triangle's row and column indices (row-major), computed once per ``dim``."""
    rows, cols = (i.astype(np.int32) for i in np.triu_indices(dim))  # int32: half the memory traffic
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols
