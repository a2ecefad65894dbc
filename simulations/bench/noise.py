"""``fedtrak bench noise``: what drawing the privacy noise from a cryptographic stream costs.

Times one noised Gram (Gaussian noise on the upper triangle, on the release grid) and one client's
Skellam share of a secure sum (``k (k + 1) / 2`` values) from fedtrak's ChaCha20 source, against the
same draws from numpy's PCG64, which fedtrak no longer uses for noise.
"""

from __future__ import annotations

import time

import numpy as np

from fedtrak.privacy.distributed import NOISE_VARIANCE_TARGET, skellam_noise
from fedtrak.privacy.mechanisms import DPSettings, noised_gram
from fedtrak.privacy.sampling import SecureRandom


def bench_noise(proj_dim: int = 2048, repeats: int = 3) -> list[dict]:
    """Best-of-``repeats`` seconds per source for a noised Gram and a Skellam share at ``proj_dim``."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(proj_dim, proj_dim))
    gram = rows @ rows.T
    dp = DPSettings(noise_multiplier=1.0, clip_norm=5.0)
    out = []
    for name, make in (("chacha20 (fedtrak)", SecureRandom), ("numpy pcg64", np.random.default_rng)):
        source = make()
        times = {"gram": [], "skellam": []}
        for _ in range(repeats):
            start = time.perf_counter()
            noised_gram(gram, dp, source)
            times["gram"].append(time.perf_counter() - start)
            start = time.perf_counter()
            skellam_noise(proj_dim * (proj_dim + 1) // 2, NOISE_VARIANCE_TARGET, source)
            times["skellam"].append(time.perf_counter() - start)
        out.append({"source": name, "proj_dim": proj_dim, "noised_gram_seconds": round(min(times["gram"]), 3),
                    "skellam_share_seconds": round(min(times["skellam"]), 3)})
    return out


def format_table(rows: list[dict]) -> str:
    """The rows as a text table."""
    lines = [f"{'source':<20} {'k':>6} {'noised Gram s':>14} {'Skellam share s':>16}"]
    lines += [f"{r['source']:<20} {r['proj_dim']:>6} {r['noised_gram_seconds']:>14.3f} {r['skellam_share_seconds']:>16.3f}"
              for r in rows]
    return "\n".join(lines)
