"""Fixed-point encoding of float arrays into the group of integers mod 2^64.

``encode`` rounds ``x * 2^f`` to the nearest integer and wraps it into
uint64 (two's complement for negatives); sums of encodings, taken with numpy's
wrapping uint64 arithmetic, decode to the float sum. Each encoded value is off
by at most ``2^-(f+1)``, so a sum over n inputs is off by at most
``n * 2^-(f+1)`` per coordinate (:func:`quantization_bound`), as long as the
true sum stays inside ``(-2^(63-f), 2^(63-f))``.
"""

from __future__ import annotations

import numpy as np

from fedtrak.errors import FedtrakError

#: Default fractional bits: resolution 2^-24 (6e-8), sums up to 2^39 (5.5e11) in magnitude.
FRACTION_BITS = 24
#: The example count's slot is an integer: encoded without fraction bits, so it decodes exactly even
#: when the Grams' bits go negative (large clip norms under DP).
COUNT_FRACTION_BITS = 0


def encode(values: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """``values`` (finite floats) as uint64 fixed-point numbers mod 2^64.

    Raises:
        FedtrakError: on non-finite values or values too large to encode.
    """
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise FedtrakError("cannot encode NaN or infinity")
    scaled = np.rint(x * 2.0**fraction_bits)
    if scaled.size and np.abs(scaled).max() >= 2.0**62:
        raise FedtrakError(f"a value of magnitude {np.abs(x).max():.3g} does not fit {fraction_bits} "
                           "fractional bits in 64")
    return scaled.astype(np.int64).view(np.uint64)


def decode(encoded: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """The float values of uint64 fixed-point numbers (read as signed)."""
    return np.asarray(encoded, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**fraction_bits


def quantization_bound(num_inputs: int, fraction_bits: int = FRACTION_BITS) -> float:
    """The largest error of a decoded sum of ``num_inputs`` encodings, per coordinate."""
    return num_inputs * 2.0 ** -(fraction_bits + 1)
