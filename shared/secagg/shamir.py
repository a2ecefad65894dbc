"""Shamir t-of-n secret sharing of byte strings over the prime field of 2^521 - 1.

A secret of up to 64 bytes is one field element; ``split`` evaluates a random
polynomial of degree ``t - 1`` with that constant term at x = 1..n (its
coefficients drawn with :mod:`secrets`); any ``t`` shares give it back by
Lagrange interpolation at 0, fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from fedtrak.errors import FedtrakError

#: The field's prime (a Mersenne prime, larger than any 64-byte secret).
PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64


def split(secret: bytes, num_shares: int, threshold: int) -> list[tuple[int, int]]:
    """``num_shares`` shares ``(x, y)`` of ``secret``, any ``threshold`` of which recover it.

    Raises:
        FedtrakError: on a secret longer than 64 bytes or a threshold outside [1, num_shares].
    """
    if len(secret) > MAX_SECRET_BYTES:
        raise FedtrakError(f"a secret holds at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise FedtrakError(f"threshold {threshold} must lie in [1, {num_shares}]")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: Sequence[tuple[int, int]], length: int) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` distinct shares.

    With fewer shares than the threshold the result is a meaningless value, not
    an error: the scheme cannot tell. Callers check what they recover (a seed
    must reproduce the masks it committed to).

    Raises:
        FedtrakError: on no shares, repeated x values, or a result that does not fit ``length``.
    """
    xs = [x for x, _ in shares]
    if not shares or len(set(xs)) != len(xs):
        raise FedtrakError("need distinct shares to combine")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise FedtrakError("the shares do not combine to a secret of this length (too few or corrupt)")
    return secret.to_bytes(length, "big")
