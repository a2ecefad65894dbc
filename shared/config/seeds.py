"""Seeds every side derives from the run's one seed: per checkpoint, per round, per replica."""

from __future__ import annotations

import numpy as np


def derive_seed(base_seed: int, stream: int) -> int:
    """A 63-bit seed for stream ``stream`` (e.g. checkpoint m) of ``base_seed``.

    Each checkpoint gets its own projection (as traker does); the server sends
    the derived seed to clients so both sides build the same matrix.
    """
    state = np.random.SeedSequence([int(base_seed), int(stream)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))
