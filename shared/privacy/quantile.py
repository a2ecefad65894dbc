"""Choosing the clip norm C from the data itself, under differential privacy.

Each client releases a histogram of its examples' projected-feature norms
over fixed log-spaced bins (:data:`NORM_EDGES`, shared by everyone, so
nothing about the data picks them), with Gaussian noise of standard deviation
``sigma`` on every bin. One example adds 1 to one bin (its largest norm over
the checkpoints, or its joint norm under joint clipping), so the histogram
has L2 sensitivity 1: one more Gaussian mechanism in the run's ledger. The
server sums the noised histograms and takes the requested quantile: the
upper edge of the first bin where the cumulative count (negative noised
bins counted as 0) reaches that fraction of the total.
"""

from __future__ import annotations

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.privacy.sampling import NoiseSource, add_gaussian

#: Bin edges of the norm histogram: 180 bins from 1e-3 to 1e6, each 12% wider than the last.
NORM_EDGES = np.logspace(-3, 6, 181)


def norm_histogram(norms: np.ndarray) -> np.ndarray:
    """Counts of ``norms`` per bin of :data:`NORM_EDGES` (values outside go to the end bins)."""
    idx = np.clip(np.searchsorted(NORM_EDGES, np.asarray(norms, dtype=np.float64), side="right") - 1,
                  0, len(NORM_EDGES) - 2)
    return np.bincount(idx, minlength=len(NORM_EDGES) - 1).astype(np.float64)


def noised_histogram(hist: np.ndarray, sigma: float, rng: NoiseSource) -> np.ndarray:
    """The histogram with ``N(0, sigma^2)`` on every bin (sensitivity 1), on the noise grid."""
    return add_gaussian(hist, sigma, rng)


def quantile_from_histogram(hist: np.ndarray, quantile: float) -> float:
    """The clip norm at ``quantile`` of a (summed, noised) histogram.

    Raises:
        FedtrakError: on a quantile outside (0, 1), a histogram of the wrong
            length, or one whose noised total is not positive.
    """
    if not 0 < quantile < 1:
        raise FedtrakError(f"clip quantile must lie in (0, 1), got {quantile}")
    hist = np.asarray(hist, dtype=np.float64)
    if hist.shape != (len(NORM_EDGES) - 1,) or not np.all(np.isfinite(hist)):
        raise FedtrakError(f"norm histogram must be {len(NORM_EDGES) - 1} finite counts, got shape {hist.shape}")
    counts = np.maximum(hist, 0.0)
    total = counts.sum()
    if not total > 0:
        raise FedtrakError("the noised norm histogram holds no mass: too few examples for this noise")
    bin_index = int(np.searchsorted(np.cumsum(counts), quantile * total, side="left"))
    return float(NORM_EDGES[min(bin_index, len(counts) - 1) + 1])
