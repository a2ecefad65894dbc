"""Where the privacy noise comes from: a cryptographic stream, and values on a grid.

:class:`SecureRandom` draws every number from a ChaCha20 key stream (the
``cryptography`` package) keyed with 32 bytes of the operating system's
entropy: unlike numpy's PCG64, its output reveals nothing about its state or
about later draws. It offers the two samplers the releases use, with numpy's
signatures: ``normal`` (Box-Muller on 53-bit uniforms) and ``poisson``
(Hormann's PTRS transformed rejection, numpy's own method for large means,
vectorized; inversion for small means), so a seeded numpy generator can stand
in for it in tests.

A Gaussian release added in floating point leaks its value through the low
bits of the result (Mironov, CCS 2012): the set of floats ``x + noise`` can
take depends on ``x``. :func:`add_gaussian` therefore works on a grid: the
value is rounded to a power-of-two grid, ``2^-GRID_BITS`` of the noise's
standard deviation (rounded down to a power of two), and the noise is a
Gaussian rounded to the same grid, so every result is a multiple of the grid
whatever ``x`` was. The grid depends on the standard deviation alone, never on
the values (a step that grew with ``max |x|`` would itself tell the size of
the data); values too large to be held on it exactly in float64 (``|x|`` of
``2^52`` steps or more) are refused, not put on a coarser grid. The rounding
moves a value by at most half a grid step, far below the noise; the rounded
Gaussian on so fine a grid is, to within that step, the continuous one the
accountant assumes. A standard deviation that is not a normal positive float
(zero, subnormal, NaN or infinite: say ``sigma`` times a sensitivity that
underflowed) is refused too, never answered with the exact value. Skellam
noise (secure aggregation) is integer-valued already.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.special import gammaln

from fedtrak.errors import FedtrakError

#: The grid is 2^-GRID_BITS of the noise's standard deviation (rounded down to a power of two).
GRID_BITS = 24
#: The values a grid can hold exactly: fewer than 2^VALUE_BITS steps in size, so that value plus noise
#: (under 2^53 steps) is an integer float64 represents exactly.
VALUE_BITS = 52
#: Below this mean, Poisson draws are by inversion; at or above it by PTRS.
PTRS_MIN_MEAN = 10.0


class NoiseSource(Protocol):
    """What the mechanisms draw from: :class:`SecureRandom`, or a seeded numpy generator in tests."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        """Gaussian draws."""

    def poisson(self, lam: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        """Poisson draws."""


class SecureRandom:
    """Random draws from a ChaCha20 key stream keyed by the operating system's entropy."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
        self._stream = cipher.encryptor()

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def uniform(self, size: int) -> np.ndarray:
        """``size`` uniforms in (0, 1), 53 bits each."""
        return ((self._words(size) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        """Gaussian draws (Box-Muller); a float when ``size`` is ``None``."""
        shape = () if size is None else (size,) if isinstance(size, int) else tuple(size)
        n = math.prod(shape)
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
        out = loc + scale * z.reshape(shape)
        return float(out) if size is None else out

    def poisson(self, lam: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        """Poisson draws of mean ``lam``: inversion below :data:`PTRS_MIN_MEAN`, else PTRS."""
        shape = () if size is None else (size,) if isinstance(size, int) else tuple(size)
        n = math.prod(shape)
        out = self._poisson_small(lam, n) if lam < PTRS_MIN_MEAN else self._poisson_ptrs(lam, n)
        return out.reshape(shape)

    def _poisson_small(self, lam: float, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.int64)
        if lam <= 0:
            return out
        u, p = self.uniform(n), np.full(n, math.exp(-lam))
        cdf = p.copy()
        active = u > cdf
        k = 0
        while active.any():
            k += 1
            p = p * lam / k
            cdf = cdf + p
            out[active] = k
            active &= u > cdf
            if k > 1000:  # beyond any float64 tail
                break
        return out

    def _poisson_ptrs(self, lam: float, n: int) -> np.ndarray:
        """Hormann (1993), "The transformed rejection method for generating Poisson random variables"."""
        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        vr = 0.9277 - 3.6224 / (b - 2)
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            m = todo.size
            u, v = self.uniform(m) - 0.5, self.uniform(m)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            ok = quick.copy()
            slow = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
            with np.errstate(divide="ignore", invalid="ignore"):
                lhs = np.log(v * invalpha / (a / (us * us) + b))
                rhs = -lam + k * loglam - gammaln(k + 1)
            ok |= slow & (lhs <= rhs)
            out[todo[ok]] = k[ok].astype(np.int64)
            todo = todo[~ok]
        return out


def grid_step(std: float, values: np.ndarray | float | None = None) -> float:
    """The power-of-two grid of a release of noise ``std``: ``2^(floor(log2 std) - GRID_BITS)``,
    from ``std`` alone.

    Raises:
        FedtrakError: if ``std`` is not a normal, finite, positive float, or the step is not a
            normal float; with ``values``, if they are not finite or if the largest is
            ``2^VALUE_BITS`` steps or more (float64 could not hold it on the grid exactly).
    """
    std = float(std)
    if not (math.isfinite(std) and std >= sys.float_info.min):
        raise FedtrakError(f"noise standard deviation {std!r} is not a normal, finite, positive float: "
                           "refusing to release the value without its noise")
    step = math.ldexp(1.0, math.frexp(std)[1] - 1 - GRID_BITS)  # frexp: std = m 2^e, 0.5 <= m < 1
    if step < sys.float_info.min:
        raise FedtrakError(f"noise standard deviation {std!r} gives the grid step {step!r}, not a normal float")
    if values is not None:
        x = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise FedtrakError("a value to be noised is NaN or infinite")
        ratio = float(np.abs(x).max(initial=0.0)) / step
        if ratio >= 2.0**VALUE_BITS:
            raise FedtrakError(f"a value to be noised is {ratio:.4g} grid steps (of noise std {std:.4g}) in size, "
                               f"beyond the 2^{VALUE_BITS} float64 holds exactly on the grid")
    return step


def add_gaussian(values: np.ndarray | float, std: float, rng: NoiseSource) -> np.ndarray:
    """``values`` plus Gaussian noise of ``std``, both on the grid :func:`grid_step` (see the module).

    Raises:
        FedtrakError: as :func:`grid_step` (a ``std`` that is not a normal positive float, values
            too large for the grid), or if the result overflows.
    """
    x = np.asarray(values, dtype=np.float64)
    step = grid_step(std, x)
    noise = np.rint(np.asarray(rng.normal(0.0, std / step, size=x.shape)))
    out = (np.rint(x / step) + noise) * step
    if not np.all(np.isfinite(out)):
        raise FedtrakError(f"a value plus noise of std {std:.4g} overflows float64")
    return out
