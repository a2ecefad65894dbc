"""The server sums what clients release into the kernel of each checkpoint."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from shared.codecs import unpack_upper
from shared.errors import FedtrakError


def sum_gram_releases(releases: Iterable[tuple[str, np.ndarray, int]], dim: int) -> tuple[np.ndarray, int]:
    """Sum clients' packed Grams: ``releases`` yields ``(client id, upper triangle, count)``.

    Returns ``(Phi^T Phi, total example count)``.

    Raises:
        FedtrakError: naming the client whose release has the wrong length, a
            non-finite value or a negative count; or if nothing was released.
    """
    total = np.zeros((dim, dim), dtype=np.float64)
    count = 0
    seen = 0
    for client, packed, n in releases:
        if int(n) < 0:
            raise FedtrakError(f"client {client}: negative example count {n}")
        total += unpack_upper(packed, dim, source=f"client {client}")
        count += int(n)
        seen += 1
    if seen == 0:
        raise FedtrakError("no client released a Gram matrix")
    return total, count
